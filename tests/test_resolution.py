"""Higher-resolution fine-tuning of a pretrained ViT: a tiny ViT saved at 32 px, fine-tuned at 48 px."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import save_tiny_vit
from vitft_app.config import TrainConfig
from vitft_app.data import processor_spec
from vitft_app.modeling import build_model
from vitft_app.resolution import resize_processor
from vitft_app.runs import RunRecorder, RunStore
from vitft_app.training import preflight, train


@pytest.fixture(scope="module")
def vit32(tmp_path_factory):
    return save_tiny_vit(tmp_path_factory.mktemp("vit32"), image_size=32)


@pytest.fixture(scope="module")
def run48(tmp_path_factory, digits_root, vit32):
    """One epoch at 48 px on 3 real digit classes."""
    tmp_path = tmp_path_factory.mktemp("run48")
    data = tmp_path / "digits3"
    for name in ("0", "1", "7"):
        (data / name).mkdir(parents=True)
        for path in sorted((digits_root / name).iterdir())[:20]:
            (data / name / path.name).write_bytes(path.read_bytes())
    config = TrainConfig(data_dir=str(data), model=str(vit32), image_size=48, epochs=1, batch_size=8, lr=3e-3,
                         augment="none", precision="fp32", output_dir=str(tmp_path / "runs"))
    preflight(config, device="cpu")
    run_dir = RunStore(config.output_dir).create_run(config)
    events = []
    recorder = RunRecorder(run_dir)
    result = train(config, run_dir, lambda e: (events.append(e), recorder(e)), device="cpu")
    assert result.status == "completed"
    return config, run_dir, events


def test_interpolated_table_equals_transformers_on_the_fly_interpolation(vit32):
    """Resizing once at load gives exactly the logits of the 32 px model run at 48 px with
    transformers' ``interpolate_pos_encoding=True``."""
    from transformers import AutoModelForImageClassification

    original = AutoModelForImageClassification.from_pretrained(vit32).eval()
    loaded = build_model(str(vit32), ["LABEL_0", "LABEL_1"], image_size=48)
    resized = loaded.model.eval()
    pixels = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = original(pixel_values=pixels, interpolate_pos_encoding=True).logits
        got = resized(pixel_values=pixels).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert resized.config.image_size == 48
    assert resized.vit.embeddings.position_embeddings.shape[1] == 1 + (48 // 8) ** 2
    assert processor_spec(loaded.processor).output_size == (48, 48)
    assert any("position embeddings interpolated" in note for note in loaded.notes)


def test_saved_model_and_processor_say_48(run48):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    _, run_dir, events = run48
    saved = json.loads((run_dir / "model" / "config.json").read_text())
    assert saved["image_size"] == 48
    processor = AutoImageProcessor.from_pretrained(run_dir / "model")
    assert processor_spec(processor).output_size == (48, 48)
    model = AutoModelForImageClassification.from_pretrained(run_dir / "model")
    assert model.vit.embeddings.position_embeddings.shape[1] == 1 + 36
    started = events[0]
    assert any("Image size 48 px (the checkpoint's is 32)" in note for note in started.notes)


def test_pipeline_runs_at_48(run48, digits_root):
    from transformers import pipeline

    _, run_dir, _ = run48
    classify = pipeline("image-classification", model=str(run_dir / "model"), device="cpu")
    image = sorted((digits_root / "7").iterdir())[0]
    top = classify(str(image))
    assert top[0]["label"] in {"0", "1", "7"} and 0 <= top[0]["score"] <= 1


def test_onnx_export_parity_at_48(run48):
    import onnx

    from vitft_app.export import OnnxPredictor, export_onnx

    config, run_dir, _ = run48
    images = sorted(str(p) for p in (run_dir.parent.parent / "digits3").rglob("*.png"))[:24]
    result = export_onnx(run_dir, images=images)
    assert result.max_abs_prob_diff < 1e-4
    graph = onnx.load(str(result.path))
    dims = [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim[1:]]
    assert dims == [3, 48, 48]
    predictions = OnnxPredictor(result.path.parent).predict(images[:3], top_k=1)
    assert len(predictions) == 3


def test_resize_processor_keeps_the_resize_crop_ratio():
    from transformers import DeiTImageProcessor

    deit = DeiTImageProcessor(size={"height": 256, "width": 256}, crop_size={"height": 224, "width": 224})
    resized = resize_processor(deit, 384)
    assert (resized.crop_size["height"], resized.crop_size["width"]) == (384, 384)
    assert resized.size["height"] == round(256 * 384 / 224) == 439
    assert processor_spec(resized).output_size == (384, 384)
    assert processor_spec(deit).output_size == (224, 224)  # the original is untouched


def test_deit_with_distillation_token_is_resized(tmp_path):
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher, DeiTImageProcessor

    config = DeiTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        image_size=32, patch_size=8, num_labels=2)
    model = DeiTForImageClassificationWithTeacher(config)
    model.config.architectures = ["DeiTForImageClassificationWithTeacher"]
    model.save_pretrained(tmp_path)
    DeiTImageProcessor(size={"height": 36, "width": 36}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    loaded = build_model(str(tmp_path), ["LABEL_0", "LABEL_1"], image_size=64)
    assert loaded.model.deit.embeddings.position_embeddings.shape[1] == 2 + 64
    with torch.no_grad():
        assert loaded.model(pixel_values=torch.zeros(1, 3, 64, 64)).logits.shape == (1, 2)
    assert processor_spec(loaded.processor).output_size == (64, 64)


def test_refusals(tmp_path, digits_small, vit32):
    with pytest.raises(ValueError, match="multiple of the model's patch size 8, got 44"):
        preflight(TrainConfig(data_dir=str(digits_small), model=str(vit32), image_size=44), device="cpu")
    with pytest.raises(ValueError, match="image_size must be between 32 and 1024"):
        TrainConfig(data_dir=str(digits_small), model=str(vit32), image_size=2048)
