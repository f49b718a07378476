"""Hardening (issue 13): hostile run folders, a full disk, hostile uploads, confinement, auth,
Ctrl-C and the smaller refusals. Each test fails on the code before the fix."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch


# ---- 1. a checkpoint never runs code -------------------------------------------------------------


class _Payload:
    """Unpickling this creates ``marker``: what a crafted checkpoint would do with ``os.system``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    from vitft_app.checkpoint import ResumeError, load_checkpoint

    marker = tmp_path / "pwned"
    torch.save({"version": 2, "loop": {}, "model": {}, "optimizer": {}, "scheduler": {}, "rng": {},
                "evil": _Payload(marker)}, tmp_path / "checkpoint.pt")
    with pytest.raises(ResumeError, match="nothing in it ran"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_checkpoint_round_trip_is_tensors_and_plain_data(tmp_path):
    from vitft_app.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint

    gen = torch.Generator().manual_seed(3)
    np.random.seed(5)
    random.seed(7)
    rng = capture_rng(gen)
    expected = (np.random.rand(), random.random(), torch.rand(1, generator=gen).item())
    save_checkpoint(tmp_path, {"loop": {"step": 4}, "model": {"w": torch.ones(2)}, "optimizer": {},
                               "scheduler": {}, "rng": rng})
    # the file loads with plain weights_only=True (no extra allowed types)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["loop"] == {"step": 4}
    restore_rng(load_checkpoint(tmp_path)["rng"], gen)
    assert (np.random.rand(), random.random(), torch.rand(1, generator=gen).item()) == expected


def test_checkpoint_of_the_previous_format_still_resumes(tmp_path):
    """Version 1 (before this fix) pickled NumPy's RNG keys as an ndarray: still read, with only
    the NumPy array types allowed."""
    from vitft_app.checkpoint import load_checkpoint, restore_rng

    gen = torch.Generator().manual_seed(1)
    np.random.seed(11)
    state = {"torch": torch.get_rng_state(), "cuda": [], "python": random.getstate(),
             "numpy": np.random.get_state(), "shuffle": gen.get_state()}
    expected = np.random.rand()
    torch.save({"version": 1, "loop": {"step": 1}, "model": {}, "optimizer": {}, "scheduler": {}, "rng": state},
               tmp_path / "checkpoint.pt")
    restore_rng(load_checkpoint(tmp_path)["rng"], gen)
    assert np.random.rand() == expected


# ---- 2. a full disk ends the run as failed, resumable -------------------------------------------


def _config(data, model, out, **overrides):
    from vitft_app.config import TrainConfig

    values = dict(data_dir=str(data), model=str(model), epochs=3, batch_size=16, lr=3e-3, precision="fp32",
                  augment="none", output_dir=str(out), num_workers=0, val_fraction=0.25)
    values.update(overrides)
    return TrainConfig(**values)


def test_disk_full_during_a_checkpoint_fails_the_run_cleanly_and_it_resumes(tmp_path, digits_small, tiny_vit,
                                                                            monkeypatch):
    from vitft_app.checkpoint import checkpoint_path, has_checkpoint, load_checkpoint
    from vitft_app.events import RunFailed, RunFinished
    from vitft_app.jobs import JobRunner
    from vitft_app.runs import read_status

    real_save, calls = torch.save, []

    def save_until_full(obj, handle, *args, **kwargs):
        calls.append(1)
        if len(calls) >= 2:  # the epoch-2 checkpoint hits a full disk half-way
            handle.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    runner = JobRunner(tmp_path / "runs", device="cpu")
    seen = []
    job = runner.start(_config(digits_small, tiny_vit, tmp_path / "runs"), listener=seen.append)
    assert job.wait(300)
    assert isinstance(seen[-1], RunFailed), seen[-1]
    assert seen[-1].error.startswith("disk full while writing the checkpoint (") and " MB free in " in seen[-1].error
    status = read_status(job.run_dir)
    assert status["status"] == "failed" and status["error"] == seen[-1].error
    assert not runner.is_busy() and runner.stop() is False
    assert not list(job.run_dir.glob(".*tmp*"))  # no temp file left behind
    assert has_checkpoint(job.run_dir) and load_checkpoint(job.run_dir)["loop"]["epoch"] == 1  # epoch 1's
    assert (job.run_dir / "model" / "model.safetensors").is_file()

    monkeypatch.setattr(torch, "save", real_save)  # space freed: Resume continues from epoch 2
    seen.clear()
    job = runner.resume(job.run_dir, listener=seen.append)
    assert job.wait(300)
    assert isinstance(seen[-1], RunFinished) and seen[-1].status == "completed", seen[-1]
    assert not checkpoint_path(job.run_dir).exists()


def test_a_failed_status_write_still_leaves_no_running_run(tmp_path, digits_small, tiny_vit, monkeypatch):
    """Even when the disk is so full that the RunFailed status write fails too, the run does not
    stay "running": the runner settles it as failed, and Resume is not refused as still running."""
    from vitft_app import runs as runs_module
    from vitft_app.jobs import JobRunner
    from vitft_app.runs import read_status

    real_write, state = runs_module.atomic_write_text, {"full": False}

    def write(path, text):
        if state["full"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, text)

    real_save = torch.save

    def save_then_fill(obj, handle, *args, **kwargs):
        state["full"] = True
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs_module, "atomic_write_text", write)
    monkeypatch.setattr(torch, "save", save_then_fill)
    runner = JobRunner(tmp_path / "runs", device="cpu")
    job = runner.start(_config(digits_small, tiny_vit, tmp_path / "runs", epochs=1))
    assert job.wait(300)
    status = read_status(job.run_dir)
    assert status["status"] == "failed" and "disk full" in status["error"]
    monkeypatch.setattr(torch, "save", real_save)


def test_low_disk_space_is_warned_before_training(tmp_path, digits_small, tiny_vit, monkeypatch):
    import shutil as shutil_module

    from vitft_app.jobs import JobRunner

    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: usage._replace(free=1024))
    runner = JobRunner(tmp_path / "runs", device="cpu")
    job = runner.start(_config(digits_small, tiny_vit, tmp_path / "runs", epochs=1))
    assert job.wait(300)
    log = (job.run_dir / "train.log").read_text()
    assert "warning: low disk space: about" in log
