"""ONNX export (parity with PyTorch on real digits, dynamic batch, failures) and the model zip
reloaded by ``transformers.pipeline`` in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import save_tiny_vit
from vitft_app import export
from vitft_app.export import ExportError, OnnxExport, OnnxPredictor, export_model_zip, export_onnx
from vitft_app.predict import Predictor

LABELS = ["0", "1", "7"]


@pytest.fixture
def digit_model(tmp_path) -> Path:
    """A tiny random ViT whose classes are the real digit names."""
    return save_tiny_vit(tmp_path / "m", labels=LABELS)


def digit_paths(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*.png"))


def test_onnx_export_matches_pytorch_on_real_digits(digit_model, digits_small):
    import onnx

    images = digit_paths(digits_small)
    result = export_onnx(digit_model, images=images)

    assert isinstance(result, OnnxExport)
    assert result.path == digit_model / "onnx" / "model.onnx" and result.path.is_file()
    assert result.num_images == len(images) == 60
    assert result.max_abs_prob_diff < 1e-4
    assert result.opset == 17
    # Self-describing folder, and nothing half-written left behind.
    onnx_dir = result.path.parent
    assert sorted(p.name for p in onnx_dir.iterdir()) == ["config.json", "model.onnx", "preprocessor_config.json"]
    assert json.loads((onnx_dir / "config.json").read_text())["id2label"] == {"0": "0", "1": "1", "2": "7"}
    graph = onnx.load(str(result.path))
    assert [(o.domain, o.version) for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [("", 17)]
    assert [i.name for i in graph.graph.input] == ["pixel_values"]
    assert [o.name for o in graph.graph.output] == ["logits"]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis

    torch_preds = Predictor(digit_model, device="cpu").predict(images, top_k=3)
    onnx_preds = OnnxPredictor(result.path.parent).predict(images, top_k=3)
    assert [p.labels[0] for p in onnx_preds] == [p.labels[0] for p in torch_preds]
    for ours, theirs in zip(onnx_preds, torch_preds):
        assert set(ours.labels) == set(LABELS)
        got = dict(zip(ours.labels, ours.scores))
        assert all(abs(got[label] - score) < 1e-4 for label, score in zip(theirs.labels, theirs.scores))


def test_onnx_batch_axis_is_dynamic(digit_model, digits_small):
    images = digit_paths(digits_small)[:5]
    export_onnx(digit_model, images=images)
    predictor = OnnxPredictor(digit_model)  # the model folder works too: its onnx/ is found

    for batch in (1, 5):
        pixels = export.load_pixels(images[:batch], predictor.transform).numpy()
        (logits,) = predictor.session.run(None, {"pixel_values": pixels})
        assert logits.shape == (batch, 3) and logits.dtype == np.float32

    one_by_one = predictor.predict(images, top_k=1, batch_size=1)
    all_at_once = predictor.predict(images, top_k=1, batch_size=5)
    assert [p.labels for p in one_by_one] == [p.labels for p in all_at_once]
    assert np.allclose([p.scores for p in one_by_one], [p.scores for p in all_at_once], atol=1e-6)
    assert len(predictor.predict(images[:1], top_k=10)[0].labels) == 3  # top_k clipped
    assert predictor.predict_proba([]).shape == (0, 3)


def test_dynamo_exporter_with_synthetic_images(digit_model, tmp_path):
    import onnx

    result = export_onnx(digit_model, output_dir=tmp_path / "out", exporter="dynamo")

    assert result.path == tmp_path / "out" / "model.onnx"
    assert result.num_images == export.SYNTHETIC_IMAGE_COUNT
    assert result.max_abs_prob_diff < 1e-4
    assert not list((tmp_path / "out").glob("*.data"))  # weights inside the one file
    # dynamo builds opset 18 and converts down; the result reports what was really written
    assert result.opset == export.graph_opset(onnx.load(str(result.path))) in (17, 18)
    preds = OnnxPredictor(tmp_path / "out").predict(export.synthetic_images(), top_k=1)
    assert len(preds) == 4 and all(p.labels[0] in LABELS for p in preds)


def test_export_errors_on_folder_without_model(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match="No saved model"):
        export_onnx(empty)
    with pytest.raises(ExportError, match="not a folder"):
        export_onnx(tmp_path / "missing")
    with pytest.raises(ExportError, match="No saved model"):
        export_model_zip(empty, tmp_path / "m.zip")
    with pytest.raises(FileNotFoundError, match="No model.onnx"):
        OnnxPredictor(empty)
    assert not (empty / "onnx").exists() and not (tmp_path / "m.zip").exists()


def test_unreadable_check_image_is_an_export_error(digit_model, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(ExportError, match="not an image"):
        export_onnx(digit_model, images=[broken])


def test_parity_failure_keeps_no_model(digit_model, monkeypatch):
    real = export._onnx_probabilities
    monkeypatch.setattr(export, "_onnx_probabilities", lambda session, pixels: real(session, pixels) + 0.01)

    with pytest.raises(ExportError, match="differs from PyTorch.*0.01"):
        export_onnx(digit_model)
    assert list((digit_model / "onnx").iterdir()) == []


def test_missing_onnx_packages_say_how_to_install(digit_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail

    with pytest.raises(ExportError, match=r"pip install onnx onnxruntime"):
        export_onnx(digit_model)
    with pytest.raises(ExportError, match=r"pip install onnx onnxruntime"):
        OnnxPredictor(digit_model)


def test_model_zip_reloads_with_transformers_pipeline(digit_model, digits_small, tmp_path):
    (digit_model / "README.md").write_text("# digits\n")
    export_onnx(digit_model)  # an onnx/ sub-folder that must stay out of the zip
    dest = export_model_zip(digit_model, tmp_path / "out" / "digits.zip")

    assert dest == tmp_path / "out" / "digits.zip"
    assert [p.name for p in dest.parent.iterdir()] == ["digits.zip"]  # no temp file left
    with zipfile.ZipFile(dest) as archive:
        names = sorted(archive.namelist())
        assert names == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
        archive.extractall(tmp_path / "unzipped")

    image = digit_paths(digits_small)[0]
    script = (
        "import json, sys\n"
        "from transformers import pipeline\n"
        "classify = pipeline('image-classification', model=sys.argv[1], device='cpu')\n"
        "print(json.dumps(classify(sys.argv[2], top_k=3)))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "unzipped"), image], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(r["label"] for r in results) == LABELS
    assert abs(sum(r["score"] for r in results) - 1.0) < 1e-4


def test_predict_tab_export_buttons(tmp_path, digits_small, tiny_vit):
    import zipfile

    from vitft_app.config import TrainConfig
    from vitft_app.runs import RunRecorder, RunStore
    from vitft_app.training import train
    from vitft_app.ui import predict_tab

    config = TrainConfig(data_dir=str(digits_small), model=str(tiny_vit), epochs=1, batch_size=16,
                         precision="fp32", output_dir=str(tmp_path / "runs"))
    run_dir = RunStore(config.output_dir).create_run(config)
    train(config, run_dir, RunRecorder(run_dir), device="cpu")
    assert predict_tab.export_zip(None) == (None, "Choose a run first.")
    path, message = predict_tab.export_zip(str(run_dir))
    assert "transformers.pipeline" in message
    with zipfile.ZipFile(path) as archive:
        assert "config.json" in archive.namelist()
    text = predict_tab.export_onnx_for_run(str(run_dir))
    assert text.startswith("✓") and "over 12 images" in text  # the run's validation images
    assert (run_dir / "model" / "onnx" / "model.onnx").exists()


def test_predict_tab_onnx_backend(tmp_path, digits_small, tiny_vit):
    import shutil

    from vitft_app.export import export_onnx
    from vitft_app.jobs import JobRunner
    from vitft_app.ui import predict_tab
    from vitft_app.ui.app import AppContext, AppSettings

    model = tmp_path / "model"
    shutil.copytree(tiny_vit, model)
    settings = AppSettings(data_root=tmp_path, runs_dir=tmp_path / "runs", example_dir=tmp_path, device="cpu")
    ctx = AppContext(settings=settings, runner=JobRunner(settings.runs_dir, device="cpu"))
    image = str(sorted((digits_small / "0").iterdir())[0])
    missing = predict_tab.predict_files(ctx, str(model), [image], 2, backend="onnx")
    assert "No ONNX export" in missing[0]["error"]
    export_onnx(model)
    onnx_result = predict_tab.predict_files(ctx, str(model), [image], 2, backend="onnx")[0]
    assert "scores" in onnx_result, onnx_result
    torch_result = predict_tab.predict_files(ctx, str(model), [image], 2, backend="torch")[0]
    assert onnx_result["scores"].keys() == torch_result["scores"].keys()
    # The tab's PyTorch predictor runs bf16 autocast where the CPU has it (precision "auto"); ONNX
    # runs fp32. Exact fp32 parity (1e-4) is checked by export_onnx itself (tests above).
    for label, score in torch_result["scores"].items():
        assert abs(onnx_result["scores"][label] - score) < 2e-2
