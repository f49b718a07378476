"""Every model family through the real code: a tiny random checkpoint of each (saved with
save_pretrained, as a Hub download is) is loaded with a new head and real class names, frozen,
given layer-decay ids, trained for one epoch on real digits, explained, exported to ONNX and
reloaded by transformers' pipeline()."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from family_checkpoints import CASES, PRETRAIN_LABELS, save_family_checkpoint
from vitft_app import families
from vitft_app.config import TrainConfig
from vitft_app.events import LogMessage, RunStarted
from vitft_app.families import family_of, feature_cache_blocker, freeze_groups, layer_ids
from vitft_app.modeling import build_model, count_parameters, freeze_layers, num_blocks, summarize_model
from vitft_app.optim import create_optimizer

CLASSES = ["0", "1", "7"]  # the digits_small fixture's folders
HEAD_PREFIX = {"timm-vit": "timm_model.head.", "timm-convnext": "timm_model.head.fc."}

#: case -> a parameter of the stem, of the last freeze unit, of the final norm (None: none of its own).
MARKERS = {
    "vit": ("vit.embeddings.cls_token", "vit.layers.1.", "vit.layernorm.weight"),
    "deit": ("deit.embeddings.distillation_token", "deit.layers.1.", "deit.layernorm.weight"),
    "deit-distilled": ("deit.embeddings.distillation_token", "deit.layers.1.", "deit.layernorm.weight"),
    "beit": ("beit.embeddings.cls_token", "beit.layers.1.", "beit.pooler.layernorm.weight"),
    "dinov2": ("dinov2.embeddings.cls_token", "dinov2.encoder.layer.1.", "dinov2.layernorm.weight"),
    "swin": ("swin.embeddings.patch_embeddings.projection.weight", "swin.encoder.layers.1.", "swin.layernorm.weight"),
    "swinv2": ("swinv2.embeddings.patch_embeddings.projection.weight", "swinv2.encoder.layers.1.",
               "swinv2.layernorm.weight"),
    "mobilevit": ("mobilevit.conv_stem.convolution.weight", "mobilevit.encoder.layer.4.",
                  "mobilevit.conv_1x1_exp.convolution.weight"),
    "timm-vit": ("timm_model.cls_token", "timm_model.blocks.1.", None),
    "timm-convnext": ("timm_model.stem.0.weight", "timm_model.stages.3.", "timm_model.head.norm.weight"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One saved tiny checkpoint per case."""
    root = tmp_path_factory.mktemp("families")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {case: save_family_checkpoint(case, root / case) for case in CASES}


def head_names(case: str, model) -> set[str]:
    prefix = HEAD_PREFIX.get(case, "classifier.")
    return {n for n, _ in model.named_parameters() if n.startswith(prefix)}


@pytest.mark.parametrize("case", list(CASES))
def test_loads_with_a_new_head_and_real_class_names(case, checkpoints):
    loaded = build_model(str(checkpoints[case]), CLASSES)
    model = loaded.model
    family, units, _ = CASES[case]

    assert family_of(model).name == family
    assert model.config.id2label == {0: "0", 1: "1", 2: "7"}
    assert model.config.label2id == {"0": 0, "1": 1, "7": 2}
    assert loaded.head_reinitialized and any(f"checkpoint predicts {len(PRETRAIN_LABELS)} classes" in n
                                             for n in loaded.notes)
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=torch.randn(2, 3, 32, 32)).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    if case == "deit-distilled":  # one head on the CLS token; the distillation head is dropped
        assert type(model).__name__ == "DeiTForImageClassification"
        assert not hasattr(model, "distillation_classifier")
        assert model.deit.embeddings.distillation_token is not None
        assert any("distillation head is dropped" in n for n in loaded.notes)


def test_label2id_maps_names_to_indices(checkpoints):
    model = build_model(str(checkpoints["vit"]), ["cat", "dog"]).model
    assert model.config.label2id == {"cat": 0, "dog": 1}


@pytest.mark.parametrize("case", list(CASES))
def test_freeze_depth_and_layer_ids_follow_the_family(case, checkpoints):
    model = build_model(str(checkpoints[case]), CLASSES).model
    _, units, unit_kind = CASES[case]
    stem_name, last_unit, final_name = MARKERS[case]
    params = dict(model.named_parameters())
    heads = head_names(case, model)
    assert heads and num_blocks(model) == units

    freeze_layers(model, 0)
    assert all(p.requires_grad for p in model.parameters())

    freeze_layers(model, 1)  # stem and the first unit frozen, the last unit trains
    assert not params[stem_name].requires_grad
    assert all(params[n].requires_grad for n in params if n.startswith(last_unit))
    first_unit = {n for n, _ in freeze_groups(model).units[0]}
    assert first_unit and all(not params[n].requires_grad for n in first_unit)

    freeze_layers(model, units)  # linear probe: only the head trains
    assert {n for n, p in params.items() if p.requires_grad} == heads
    if final_name is not None:
        assert not params[final_name].requires_grad
    with pytest.raises(ValueError, match=f"between 0 and {units}"):
        freeze_layers(model, units + 1)

    ids = layer_ids(model)
    assert set(ids) == set(params)
    assert ids[stem_name] == 0
    assert {ids[n] for n in params if n.startswith(last_unit)} == {units}
    assert {ids[n] for n in heads} == {units + 1}
    assert sorted(set(ids.values())) == list(range(units + 2))
    freeze_layers(model, 0)
    optimizer = create_optimizer(model, 1e-3, 0.05, layer_decay=0.5)
    lrs = {g["layer_id"]: g["lr"] for g in optimizer.param_groups}
    assert lrs[units + 1] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-3 * 0.5 ** (units + 1))

    # The Train tab's summary (meta device, no weights) counts the same and names the unit.
    summary = summarize_model(str(checkpoints[case]), CLASSES, 1)
    freeze_layers(model, 1)
    assert (summary.num_blocks, summary.trainable_params, summary.total_params) == (units, *count_parameters(model))
    assert ("stages" if unit_kind == "stage" or case == "timm-convnext" else "encoder blocks") in summary.describe()
    # PatchDropout only where a CLS token stays and no position bias is tied to the full grid.
    assert summary.has_cls_token == (CASES[case][0] in ("vit", "deit", "dinov2"))


@pytest.mark.parametrize("case", ["vit", "deit-distilled", "dinov2"])
@pytest.mark.parametrize("depth", [1, 2])
def test_feature_cache_is_exact_where_it_is_allowed(case, depth, checkpoints):
    from vitft_app.feature_cache import split_frozen_model

    model = build_model(str(checkpoints[case]), CLASSES).model
    freeze_layers(model, depth)
    assert feature_cache_blocker(model) is None and families.frozen_depth(model) == depth
    prefix, suffix = split_frozen_model(model, depth)
    model.eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(suffix(prefix(pixels)), model(pixel_values=pixels).logits, atol=1e-5)


def test_feature_cache_is_refused_where_the_frozen_part_is_random(tmp_path):
    folder = save_family_checkpoint("dinov2", tmp_path / "dino", drop_path_rate=0.2)
    model = build_model(str(folder), CLASSES).model
    freeze_layers(model, 1)
    assert "drop path p=0.2" in feature_cache_blocker(model)
    folder = save_family_checkpoint("vit", tmp_path / "vit", hidden_dropout_prob=0.1)
    model = build_model(str(folder), CLASSES).model
    freeze_layers(model, 2)
    assert "dropout p=0.1" in feature_cache_blocker(model)
    freeze_layers(model, 0)
    assert feature_cache_blocker(model) == "nothing is frozen"


def _digit_images(root, per_class=2):
    return [str(p) for name in CLASSES for p in sorted((root / name).iterdir())[:per_class]]


@pytest.mark.parametrize("case", list(CASES))
def test_one_epoch_then_explain_export_and_pipeline(case, checkpoints, digits_small, tmp_path):
    from transformers import pipeline

    from vitft_app.explain import explain_image
    from vitft_app.export import PARITY_TOLERANCE, OnnxPredictor, export_onnx
    from vitft_app.predict import Predictor
    from vitft_app.runs import RunStore
    from vitft_app.training import train

    family = families.FAMILIES[CASES[case][0]]
    config = TrainConfig(data_dir=str(digits_small), model=str(checkpoints[case]), epochs=1, batch_size=16,
                         lr=1e-3, augment="none", precision="fp32", freeze_depth=1, output_dir=str(tmp_path / "runs"))
    run_dir = RunStore(config.output_dir).create_run(config)
    events = []
    result = train(config, run_dir, events.append, device="cpu")
    assert result.status == "completed"
    logs = " | ".join(e.text for e in events if isinstance(e, LogMessage))
    plan = " | ".join(next(e for e in events if isinstance(e, RunStarted)).notes)  # the run plan's reasons
    if family.pooling is None:  # the cache rule says why it is off
        assert f"frozen-feature cache: off ({family.title}: " in plan
    else:  # frozen stem and block 0 computed once, the rest trains on the stored features
        assert "frozen-feature cache: off" not in plan and "frozen blocks cached" in logs
    model_dir = run_dir / "model"

    predictor = Predictor(model_dir, device="cpu")
    images = _digit_images(digits_small)
    explanation = explain_image(predictor, images[0])
    assert explanation.method == family.explain
    expected = (32 // 8, 32 // 8) if family.explain == "attention rollout" else (32, 32)
    assert explanation.grid.shape == expected
    assert explanation.grid.sum() == pytest.approx(1.0, abs=1e-4) and (explanation.grid >= 0).all()
    assert explanation.label in CLASSES

    exported = export_onnx(model_dir, images=images)
    assert exported.max_abs_prob_diff <= PARITY_TOLERANCE
    onnx_top = [p.labels[0] for p in OnnxPredictor(exported.path.parent).predict(images, top_k=1)]
    assert onnx_top == [p.labels[0] for p in predictor.predict(images, top_k=1)]

    classify = pipeline("image-classification", model=str(model_dir), device="cpu")
    ours = predictor.predict(images[:2], top_k=3)
    for path, mine in zip(images[:2], ours):
        theirs = classify(path, top_k=3)
        assert sorted(r["label"] for r in theirs) == CLASSES
        got = {r["label"]: r["score"] for r in theirs}
        # Same preprocessing (MobileViT's BGR flip and timm's crop_pct included), up to resize rounding.
        assert max(abs(got[label] - score) for label, score in zip(mine.labels, mine.scores)) < 2e-2


@pytest.mark.parametrize("case", ["mobilevit", "timm-vit", "dinov2"])
def test_eval_transform_matches_the_image_processor(case, checkpoints, digits_small):
    from PIL import Image
    from transformers import AutoImageProcessor

    from vitft_app.data import build_transforms

    processor = AutoImageProcessor.from_pretrained(str(checkpoints[case]))
    digit = np.asarray(Image.open(_digit_images(digits_small)[0]).convert("RGB").resize((40, 40)), dtype=np.float32)
    image = Image.fromarray((digit * np.array([1.0, 0.5, 0.2]) + np.array([0, 40, 90])).astype(np.uint8))  # tinted
    ours = build_transforms(processor, train=False)(image).numpy()
    theirs = np.asarray(processor(image, return_tensors="pt")["pixel_values"][0])
    assert ours.shape == theirs.shape == (3, 32, 32)
    assert np.abs(ours - theirs).mean() < 0.05  # resize implementations differ by rounding
    if case == "mobilevit":  # BGR: swapping our channels back would not match
        assert np.abs(ours[::-1] - theirs).mean() > np.abs(ours - theirs).mean()
