"""Every offline (scratch) model: trains one epoch on real digits above chance, saves, reloads with
``transformers.pipeline``, exports to ONNX within the parity bound and is explained; PVTv2's and MobileViT's
freeze depth and layer-decay ids."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from vitft_app.config import TrainConfig
from vitft_app.explain import explain_image
from vitft_app.export import export_onnx
from vitft_app.modeling import MODEL_CHOICES, build_model, freeze_layers, num_blocks, summarize_model
from vitft_app.optim import layer_ids
from vitft_app.predict import Predictor
from vitft_app.runs import RunStore
from vitft_app.scratch import RECOMMENDED_SCRATCH_MODEL, SCRATCH_MODELS, pvt_strides
from vitft_app.training import train

DIGITS = ("0", "1", "7")


@pytest.fixture(scope="module")
def digits3(tmp_path_factory, digits_root) -> Path:
    """3 digit classes x 100 real MNIST images (chance accuracy 1/3)."""
    target = tmp_path_factory.mktemp("digits3x100")
    for name in DIGITS:
        shutil.copytree(digits_root / name, target / name)
    return target


@pytest.fixture(scope="module", params=list(SCRATCH_MODELS))
def trained(request, tmp_path_factory, digits3):
    """One epoch of each scratch model at 32 px on the 3-class digits."""
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    # The plain ViT needs a gentler rate and more steps than the hybrid (README, "Offline models").
    plain_vit = SCRATCH_MODELS[name].family == "vit"
    config = TrainConfig(data_dir=str(digits3), model=name, image_size=32, epochs=1,
                         batch_size=8 if plain_vit else 16, lr=5e-4 if plain_vit else 2e-3,
                         warmup_ratio=0.1, augment="none", precision="fp32",
                         output_dir=str(tmp / "runs"))
    run_dir = RunStore(config.output_dir).create_run(config)
    result = train(config, run_dir, lambda event: None, device="cpu")
    return name, run_dir / "model", result, digits3


def test_one_epoch_learns_real_digits_above_chance(trained):
    name, _, result, _ = trained
    assert result.status == "completed"
    # chance is 1/3 (3 balanced classes, 60 validation images): 0.45 is 27 of 60, about 2 sd above it
    assert result.best_val_accuracy is not None and result.best_val_accuracy > 0.45, (name, result)


def test_saved_model_reloads_with_pipeline(trained):
    from transformers import pipeline

    name, folder, _, digits = trained
    classify = pipeline("image-classification", model=str(folder), device="cpu")
    paths = [str(p) for d in DIGITS for p in sorted((digits / d).iterdir())[:3]]
    results = [classify(path, top_k=3) for path in paths]
    assert all({r["label"] for r in result} == set(DIGITS) for result in results), name
    config_class = type(classify.model).__name__
    assert config_class == ("PvtV2ForImageClassification" if SCRATCH_MODELS[name].family == "pvt"
                            else "ViTForImageClassification")


def test_onnx_export_within_parity_bound(trained):
    name, folder, _, digits = trained
    images = [str(p) for d in DIGITS for p in sorted((digits / d).iterdir())[:8]]
    result = export_onnx(folder, images=images)
    assert result.path.is_file() and result.num_images == len(images)
    assert result.max_abs_prob_diff < 1e-4, name


def test_explanation_per_family(trained):
    name, folder, _, digits = trained
    explanation = explain_image(Predictor(folder, device="cpu"), sorted((digits / "7").iterdir())[0])
    expected = SCRATCH_MODELS[name].explanation
    assert explanation.method == expected
    assert explanation.grid.min() >= 0 and abs(float(explanation.grid.sum()) - 1) < 1e-4


def test_model_list_is_readable_data():
    assert RECOMMENDED_SCRATCH_MODEL in SCRATCH_MODELS and "vit-tiny-scratch" in SCRATCH_MODELS
    assert MODEL_CHOICES[: len(SCRATCH_MODELS)] == tuple(SCRATCH_MODELS)
    for name, spec in SCRATCH_MODELS.items():
        info = spec.as_dict()
        assert info["name"] == name and info["params"] and info["pretraining"] and info["expected"]
        summary = summarize_model(name, list(DIGITS), 0, image_size=32)
        assert summary.num_blocks == spec.blocks
        millions = float(spec.params.split()[0])
        ten_classes = summarize_model(name, [str(i) for i in range(10)], 0, image_size=32).total_params
        assert abs(ten_classes / 1e6 - millions) < 0.06, (name, ten_classes)


def test_pvt_strides_keep_16x16_tokens_in_the_first_stage():
    import math

    for size in (32, 48, 64, 96, 128, 224):
        strides = pvt_strides(size)["strides"]
        assert size // strides[0] >= 16 and size // math.prod(strides) >= 2, size


def test_pvt_freeze_depth_and_layer_ids():
    model = build_model(RECOMMENDED_SCRATCH_MODEL, list(DIGITS), image_size=32).model
    assert num_blocks(model) == 4
    ids = layer_ids(model)
    assert ids["pvt_v2.encoder.layers.0.patch_embedding.proj.weight"] == 0
    assert {ids[n] for n in ids if n.startswith("pvt_v2.encoder.layers.3.")} == {4}
    assert ids["classifier.weight"] == 5
    freeze_layers(model, 4)  # linear probe
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}
    freeze_layers(model, 1)
    assert not any(p.requires_grad for p in model.pvt_v2.encoder.layers[0].parameters())
    assert all(p.requires_grad for p in model.pvt_v2.encoder.layers[1].parameters())


def test_mobilevit_checkpoint_freeze_depth_and_frozen_batchnorm():
    """A MobileViT loaded by path (e.g. apple/mobilevit-small): stem + 5 stages + 1x1 conv."""
    from transformers import MobileViTConfig, MobileViTForImageClassification

    torch.manual_seed(0)
    model = MobileViTForImageClassification(MobileViTConfig(
        image_size=32, num_labels=3, hidden_sizes=[64, 80, 96], neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320],
        expand_ratio=2.0))
    assert num_blocks(model) == 5
    ids = layer_ids(model)
    assert ids["mobilevit.conv_stem.convolution.weight"] == 0
    assert {ids[n] for n in ids if n.startswith("mobilevit.encoder.layer.4.")} == {5}
    assert ids["classifier.weight"] == 6 and ids["mobilevit.conv_1x1_exp.convolution.weight"] == 6

    freeze_layers(model, 5)  # linear probe: stem, 5 stages and the final 1x1 conv frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}
    stem_bn = model.mobilevit.conv_stem.normalization
    before = stem_bn.running_mean.clone()
    model.train()
    model(pixel_values=torch.randn(4, 3, 32, 32))
    assert torch.equal(stem_bn.running_mean, before)  # frozen BatchNorm keeps its statistics

    freeze_layers(model, 2)  # stem + stages 1-2 frozen; stage 3 onwards trains and updates its BN
    assert not any(p.requires_grad for p in model.mobilevit.encoder.layer[1].parameters())
    assert all(p.requires_grad for p in model.mobilevit.encoder.layer[2].parameters())
    stage3_bn = model.mobilevit.encoder.layer[2].downsampling_layer.expand_1x1.normalization
    before3 = stage3_bn.running_mean.clone()
    model.train()
    model(pixel_values=torch.randn(4, 3, 32, 32))
    assert torch.equal(stem_bn.running_mean, before) and not torch.equal(stage3_bn.running_mean, before3)

    freeze_layers(model, 0)  # everything trains again, BatchNorm included
    model.train()
    model(pixel_values=torch.randn(4, 3, 32, 32))
    assert not torch.equal(stem_bn.running_mean, before)


def test_own_weights_transfer_with_a_freeze_depth(trained, colors_root, tmp_path):
    """Item 3 of issue 14: a model we trained is a checkpoint like any other: fine-tuning it on
    another dataset loads its weights, replaces the head and keeps the frozen stage bit-identical."""
    from safetensors.torch import load_file

    name, folder, _, _ = trained
    if SCRATCH_MODELS[name].family != "pvt":
        return  # the transfer path is the same code for every family; one is enough here
    config = TrainConfig(data_dir=str(colors_root), model=str(folder), freeze_depth=1, epochs=1, batch_size=16,
                         lr=2e-3, augment="none", precision="fp32", output_dir=str(tmp_path / "runs"))
    events = []
    run_dir = RunStore(config.output_dir).create_run(config)
    result = train(config, run_dir, events.append, device="cpu")
    assert result.status == "completed" and result.best_val_accuracy > 0.5  # 4 colours, chance 0.25
    before, after = load_file(str(folder / "model.safetensors")), load_file(str(run_dir / "model" / "model.safetensors"))
    stage0 = [k for k in before if k.startswith("pvt_v2.encoder.layers.0.")]
    assert stage0 and all(torch.equal(before[k], after[k]) for k in stage0)  # frozen: unchanged
    assert not torch.equal(before["pvt_v2.encoder.layers.3.blocks.0.mlp.dense1.weight"],
                           after["pvt_v2.encoder.layers.3.blocks.0.mlp.dense1.weight"])  # trained
    assert after["classifier.weight"].shape[0] == 4  # new head for the 4 colour classes
