"""Int8 ONNX export: the real quantization of a trained tiny ViT checked on its validation split,
the refusal of a large drop (no file left behind) and --force."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitft_app import quantize
from vitft_app.cli import main
from vitft_app.config import TrainConfig
from vitft_app.export import OnnxPredictor
from vitft_app.quantize import INT8_CHECK_FILE, INT8_FILE_NAME, has_int8, read_int8_check
from vitft_app.runs import RunRecorder, RunStore
from vitft_app.training import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, digits_root, tiny_vit) -> Path:
    """A tiny ViT trained for a few epochs on the 1,000 real digits (accuracy well above chance)."""
    tmp_path = tmp_path_factory.mktemp("int8")
    config = TrainConfig(data_dir=str(digits_root), model=str(tiny_vit), epochs=6, batch_size=32, lr=3e-3,
                         augment="none", precision="fp32", output_dir=str(tmp_path / "runs"))
    run_dir = RunStore(config.output_dir).create_run(config)
    assert train(config, run_dir, RunRecorder(run_dir), device="cpu").status == "completed"
    return run_dir


def onnx_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "model" / "onnx").iterdir())


def test_int8_export_checked_on_the_validation_split(trained_run, capsys):
    assert main(["export", str(trained_run), "--format", "onnx-int8"]) == 0
    out, err = capsys.readouterr()
    path = Path(out.strip().splitlines()[-1])
    assert path == trained_run / "model" / "onnx" / INT8_FILE_NAME and path.is_file()
    assert onnx_files(trained_run) == ["config.json", INT8_CHECK_FILE, "model.onnx", INT8_FILE_NAME,
                                       "preprocessor_config.json"]
    check = read_int8_check(trained_run)
    status = json.loads((trained_run / "status.json").read_text())
    assert check.num_images == status["num_val"] == 200
    assert check.fp32_accuracy > 0.25  # a trained model, well above the 10% majority rate
    assert check.fp32_accuracy == pytest.approx(status["best_val_accuracy"], abs=0.011)
    assert abs(check.drop) <= 0.01 + 1e-9 and check.agreement >= 0.95 and not check.forced  # 2 of 200 images: 0.0100...09
    assert check.int8_bytes < check.fp32_bytes and check.fp32_latency_ms > 0 and check.int8_latency_ms > 0
    assert check.baseline["total"] == 200
    assert "top-1 agreement" in err and "fp32" in err and "int8" in err and "always '" in err
    assert has_int8(trained_run)
    # the int8 graph predicts through the same backend class and the CLI
    predictions = OnnxPredictor(trained_run, file_name=INT8_FILE_NAME).predict(
        [str(next((Path(json.loads((trained_run / "config.json").read_text())["data_dir"]) / "3").iterdir()))], top_k=2)
    assert len(predictions[0].labels) == 2
    image = next((Path(json.loads((trained_run / "config.json").read_text())["data_dir"]) / "7").iterdir())
    assert main(["predict", "--model", str(trained_run), "--backend", "onnx-int8", str(image)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["predictions"]


def test_large_drop_is_refused_and_force_keeps_it(trained_run, monkeypatch, capsys):
    (trained_run / "model" / "onnx" / INT8_FILE_NAME).unlink(missing_ok=True)
    (trained_run / "model" / "onnx" / INT8_CHECK_FILE).unlink(missing_ok=True)
    real_top1 = quantize._top1_names

    def broken_int8(backend, pixels):
        """The int8 model answers the next class: a forced large drop (the fp32 answers are real)."""
        names = real_top1(backend, pixels)
        if backend.file_name == "model.onnx":
            return names
        labels = [backend.id2label[i] for i in sorted(backend.id2label)]
        return [labels[(labels.index(n) + 1) % len(labels)] for n in names]

    monkeypatch.setattr(quantize, "_top1_names", broken_int8)
    assert main(["export", str(trained_run), "--format", "onnx-int8"]) == 2
    err = capsys.readouterr().err
    assert "int8 model refused" in err and "no int8 file was written" in err and "--force" in err
    assert "top-1 agreement 0.0%" in err
    assert onnx_files(trained_run) == ["config.json", "model.onnx", "preprocessor_config.json"]  # nothing left behind
    assert not has_int8(trained_run)

    assert main(["export", str(trained_run), "--format", "onnx-int8", "--force"]) == 0
    assert "kept despite the drop (--force)" in capsys.readouterr().err
    check = read_int8_check(trained_run)
    assert check.forced and check.drop > 0.2 and check.agreement == 0.0


def test_int8_needs_a_run_folder(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format", "onnx-int8"]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_export_help_lists_int8(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = capsys.readouterr().out
    assert "onnx-int8" in out and "--force" in out
