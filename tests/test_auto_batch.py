"""``--batch-size auto``: out-of-memory errors simulated in the model's forward, through the real
accelerate retry path and the real training loop."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import ViTForImageClassification

from vitft_app.auto_batch import halving_search, resolve_auto_batch_size
from vitft_app.cli import build_parser, config_from_args
from vitft_app.config import TrainConfig
from vitft_app.runs import RunRecorder, RunStore, read_status
from vitft_app.training import train


def fake_memory_limit(monkeypatch, limit: int, seen: list[int]) -> None:
    """Makes every ViT forward with more than ``limit`` images raise CUDA's out-of-memory error."""
    original = ViTForImageClassification.forward

    def forward(self, pixel_values=None, *args, **kwargs):
        seen.append(int(pixel_values.shape[0]))
        if pixel_values.shape[0] > limit:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {pixel_values.shape[0]} GiB (simulated)")
        return original(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(ViTForImageClassification, "forward", forward)


def test_training_halves_until_it_fits_and_keeps_the_effective_batch(tmp_path, digits_small, tiny_vit, monkeypatch):
    seen: list[int] = []
    fake_memory_limit(monkeypatch, 8, seen)
    config = TrainConfig(data_dir=str(digits_small), model=str(tiny_vit), epochs=1, batch_size=32, grad_accum_steps=1,
                         auto_batch_size=True, augment="none", precision="fp32", output_dir=str(tmp_path / "runs"))
    run_dir = RunStore(config.output_dir).create_run(config)
    result = train(config, run_dir, RunRecorder(run_dir), device="cpu")

    assert result.status == "completed"
    note = "batch size auto: 8 images per micro-batch x 4 accumulated = 32 effective (32, 16 ran out of memory)"
    assert note in (run_dir / "train.log").read_text()
    status = read_status(run_dir)
    assert note in status["notes"]
    # 48 training images in micro-batches of 8 -> 6 micro-batches -> 2 optimizer steps of 4 (a short last one)
    assert status["total_steps"] == 2
    assert seen[:3] == [32, 16, 8]  # the probe: two simulated OOMs, then the size that fits
    assert max(seen[3:]) == 8  # training and evaluation never asked for more
    # the saved config keeps what the user asked for, so a resume probes again
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["auto_batch_size"] is True and saved["batch_size"] == 32


def test_other_errors_are_not_retried():
    calls = []

    def step(batch_size):
        calls.append(batch_size)
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        halving_search(step, 16)
    assert calls == [16]


def test_nothing_fits_is_one_clear_error():
    def step(batch_size):
        raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")

    config = TrainConfig(data_dir="x", batch_size=4, auto_batch_size=True)
    with pytest.raises(RuntimeError, match="even 1 image per micro-batch runs out of memory"):
        resolve_auto_batch_size(config, step)


def test_odd_start_rounds_the_accumulation_up():
    config = TrainConfig(data_dir="x", batch_size=24, grad_accum_steps=2, auto_batch_size=True)
    resolved, note = resolve_auto_batch_size(config, lambda b: (_ for _ in ()).throw(
        RuntimeError("CUDA out of memory. x")) if b > 5 else None)
    assert (resolved.batch_size, resolved.grad_accum_steps) == (3, 16)  # 24 -> 12 -> 6 -> 3; 48 effective
    assert "3 images per micro-batch x 16 accumulated = 48 effective (24, 12, 6 ran out of memory)" in note


def test_cli_batch_size_auto_and_config_round_trip(tmp_path):
    args = build_parser().parse_args(["train", "--data", str(tmp_path), "--batch-size", "auto"])
    config = config_from_args(args)
    assert config.auto_batch_size is True and config.batch_size == TrainConfig.batch_size
    assert TrainConfig.from_json_file(_write(tmp_path / "c.json", config.to_json())) == config
    args = build_parser().parse_args(["train", "--data", str(tmp_path), "--batch-size", "16"])
    assert config_from_args(args).batch_size == 16 and not config_from_args(args).auto_batch_size
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", str(tmp_path), "--batch-size", "lots"])
    # a config.json of an older version (no auto_batch_size) still loads, with the fixed size
    old = {k: v for k, v in TrainConfig(data_dir=str(tmp_path)).to_dict().items() if k != "auto_batch_size"}
    assert TrainConfig.from_json_file(_write(tmp_path / "old.json", json.dumps(old))).auto_batch_size is False


def test_train_help_lists_auto(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--batch-size SIZE" in help_text and "'auto' (CLI) starts here and halves on out-of-memory" in help_text


def _write(path, text):
    path.write_text(text)
    return path
