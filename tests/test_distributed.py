"""Data-parallel training: two CPU processes (gloo) under torchrun against one process with the
same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitft_app.distributed import DistContext, shard_micro_batch
from vitft_app.runs import read_metrics, read_status

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_args(data, model, out, batch_size):
    return ["train", "--data", str(data), "--model", str(model), "--epochs", "2", "--batch-size", str(batch_size),
            "--grad-accum-steps", "2", "--augment", "none", "--precision", "fp32", "--lr", "3e-3",
            "--freeze-depth", "1", "--gradual-unfreeze", "1", "--output-dir", str(out), "--log-every-steps", "1"]


def test_shards_of_a_global_batch_partition_it():
    order = list(range(30))
    shards = [shard_micro_batch(order, 2, 7, DistContext(rank=r, world_size=2)) for r in range(2)]
    assert shards == [list(range(28, 30)), []]  # the epoch's tail: rank 1 has nothing, and still steps
    first = [shard_micro_batch(order, 0, 7, DistContext(rank=r, world_size=2)) for r in range(2)]
    assert first[0] + first[1] == list(range(14))


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, digits_small, tiny_vit):
    """48 train images; 2 processes x batch 7 = global 14 (the last micro-batch leaves rank 1
    empty), accumulation 2, gradual unfreezing (DDP re-wrapped after epoch 1). Same per-step
    losses, validation metrics and final weights as one process with batch 14."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    single = subprocess.run([sys.executable, "-m", "vitft_app.cli", *train_args(digits_small, tiny_vit, tmp_path / "one", 14)],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    multi = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "vitft_app.cli", *train_args(digits_small, tiny_vit, tmp_path / "two", 7)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )
    assert multi.returncode == 0, multi.stderr[-3000:]

    runs = list((tmp_path / "two").iterdir())
    assert len(runs) == 1, runs  # only rank 0 creates and writes the run folder
    two, one = runs[0], next((tmp_path / "one").iterdir())
    assert multi.stdout.strip().splitlines()[-1] == str(two)
    assert {p.name for p in two.iterdir()} >= {"config.json", "status.json", "metrics.csv", "train.log", "model"}
    assert not (two / "checkpoint.pt").exists()
    assert read_status(two)["status"] == "completed"

    a, b = read_metrics(one), read_metrics(two)
    train_a, train_b = a.query("kind == 'train'"), b.query("kind == 'train'")
    assert train_a["step"].tolist() == train_b["step"].tolist() == list(range(1, 5))  # 2 windows x 2 epochs
    assert train_a["loss"].tolist() == pytest.approx(train_b["loss"].tolist(), abs=1e-4)
    eval_a, eval_b = a.query("kind == 'eval'"), b.query("kind == 'eval'")
    assert eval_a["val_accuracy"].tolist() == pytest.approx(eval_b["val_accuracy"].tolist(), abs=1e-6)
    assert eval_a["val_loss"].tolist() == pytest.approx(eval_b["val_loss"].tolist(), abs=1e-4)
    assert eval_a["train_loss"].tolist() == pytest.approx(eval_b["train_loss"].tolist(), abs=1e-4)
    wa, wb = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-4), name


def test_the_app_runner_launches_a_data_parallel_run_and_stops_it(tmp_path, digits_small, tiny_vit):
    """What the app does with several GPUs, here on CPU (accelerate launch --multi_gpu falls back to
    gloo): the run folder is made first, the launched rank 0 fills it, Stop (a STOP file) ends
    every process cleanly."""
    import time

    from vitft_app.config import TrainConfig
    from vitft_app.jobs import JobRunner

    runner = JobRunner(tmp_path / "runs", device=None)
    config = TrainConfig(data_dir=str(digits_small), model=str(tiny_vit), epochs=200, batch_size=4,
                         augment="none", precision="fp32", output_dir=str(tmp_path / "runs"), log_every_steps=1)
    job = runner.start_launched(config, 2)  # the app's launcher: accelerate launch
    deadline = time.time() + 180
    while time.time() < deadline and read_metrics(job.run_dir).query("kind == 'eval'").empty:
        time.sleep(0.5)
    status = read_status(job.run_dir)
    assert status["status"] == "running"
    assert status["total_steps"] == 6 * 200  # 48 images / (2 processes x batch 4) per epoch
    assert runner.stop()
    assert job.wait(180)
    status = read_status(job.run_dir)
    assert status["status"] == "stopped", (job.run_dir / "launch.log").read_text()[-2000:]
    assert (job.run_dir / "checkpoint.pt").exists() and (job.run_dir / "model").is_dir()
    assert len(list((tmp_path / "runs").iterdir())) == 1
