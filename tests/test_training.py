"""The keystone: real fine-tuning on CPU of a tiny ViT loaded by path, on real digit images."""

import json
import shutil
import os
import subprocess
import sys
import threading

import pytest
import torch

from vitft_app.config import TrainConfig
from vitft_app.events import EvalDone, RunFailed, RunFinished, RunStarted, StepLogged
from vitft_app.jobs import BusyError, JobRunner
from vitft_app.runs import RunRecorder, RunStore, read_metrics, read_status
from vitft_app.training import _window_sizes, optimizer_steps_per_epoch, train


def tiny_config(data, model, tmp_path, **changes) -> TrainConfig:
    values = dict(data_dir=str(data), model=str(model), epochs=15, batch_size=32, lr=3e-3, warmup_ratio=0.1,
                  augment="none", precision="fp32", log_every_steps=5, output_dir=str(tmp_path / "runs"))
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, digits_root, tiny_vit):
    """One full run shared by the keystone assertions (a few seconds on 2 CPU cores)."""
    tmp_path = tmp_path_factory.mktemp("keystone")
    config = tiny_config(digits_root, tiny_vit, tmp_path)
    run_dir = RunStore(config.output_dir).create_run(config)
    events = []
    recorder = RunRecorder(run_dir)

    def emit(event):
        events.append(event)
        recorder(event)

    result = train(config, run_dir, emit, device="cpu")
    return config, run_dir, events, result


def test_keystone_learns_real_digits(trained_run):
    _, _, events, result = trained_run
    assert result.status == "completed"
    # 10 classes: chance is 0.1.
    assert result.best_val_accuracy is not None and result.best_val_accuracy >= 0.5, result
    evals = [e for e in events if isinstance(e, EvalDone)]
    assert evals[-1].train_loss < evals[0].train_loss


def test_keystone_events_in_order(trained_run):
    config, _, events, result = trained_run
    kinds = [type(e).__name__ for e in events if not type(e).__name__ == "LogMessage"]
    assert kinds[0] == "RunStarted" and kinds[-1] == "RunFinished"
    assert kinds.count("EvalDone") == config.epochs
    steps = [e.step for e in events if isinstance(e, StepLogged)]
    assert steps == sorted(steps) and steps[-1] == result.steps
    started = events[0]
    assert isinstance(started, RunStarted) and started.total_steps == result.steps
    assert started.classes == [str(d) for d in range(10)]


def test_keystone_run_folder_is_complete(trained_run):
    config, run_dir, _, result = trained_run
    assert {"config.json", "status.json", "metrics.csv", "train.log", "model"} <= set(os.listdir(run_dir))
    assert TrainConfig.from_json_file(run_dir / "config.json") == config
    status = read_status(run_dir)
    assert status["status"] == "completed" and status["best_val_accuracy"] == result.best_val_accuracy
    metrics = read_metrics(run_dir)
    assert (metrics["kind"] == "eval").sum() == config.epochs
    assert metrics.loc[metrics["kind"] == "eval", "val_accuracy"].max() == pytest.approx(result.best_val_accuracy)
    model_config = json.loads((run_dir / "model" / "config.json").read_text())
    assert model_config["id2label"] == {str(i): str(i) for i in range(10)}
    assert (run_dir / "model" / "preprocessor_config.json").exists()
    assert not [p for p in os.listdir(run_dir) if p.startswith(".")]  # no temp leftovers


def test_saved_model_loads_with_transformers_pipeline_in_a_new_process(trained_run, digits_root):
    from vitft_app.data import scan_dataset

    config, run_dir, _, _ = trained_run
    report = scan_dataset(digits_root, val_fraction=config.val_fraction, seed=config.seed)
    val = report.val[::10][:40]  # validation images, all ten digits
    script = (
        "import json, sys\n"
        "from transformers import pipeline\n"
        f"classify = pipeline('image-classification', model={str(run_dir / 'model')!r})\n"
        "paths = json.loads(sys.stdin.read())\n"
        "print(json.dumps([classify(p, top_k=3) for p in paths]))\n"
    )
    output = subprocess.run([sys.executable, "-c", script], input=json.dumps([i.path for i in val]),
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert output.returncode == 0, output.stderr[-2000:]
    results = json.loads(output.stdout.strip().splitlines()[-1])
    assert all(len(r) == 3 for r in results)
    assert {r["label"] for result in results for r in result} <= set(report.classes)  # real class names
    accuracy = sum(result[0]["label"] == report.classes[item.label] for result, item in zip(results, val)) / len(val)
    assert accuracy >= 0.3, accuracy  # chance is 0.1


def test_stop_mid_run_ends_as_stopped_and_keeps_best_model(tmp_path, digits_root, tiny_vit):
    runner = JobRunner(tmp_path / "runs", device="cpu")
    seen = []
    stop_after_first_eval = threading.Event()

    def listener(event):
        seen.append(event)
        if isinstance(event, EvalDone):
            stop_after_first_eval.set()

    job = runner.start(tiny_config(digits_root, tiny_vit, tmp_path, epochs=50), listener=listener)
    assert stop_after_first_eval.wait(120)
    assert runner.stop()
    job.wait(60)
    assert not job.running
    assert isinstance(seen[-1], RunFinished) and seen[-1].status == "stopped"
    assert sum(isinstance(e, EvalDone) for e in seen) < 50
    assert read_status(job.run_dir)["status"] == "stopped"
    assert (job.run_dir / "model" / "model.safetensors").exists()
    assert runner.stop() is False  # nothing left to stop


def test_second_start_is_refused_while_busy(tmp_path, digits_root, tiny_vit):
    runner = JobRunner(tmp_path / "runs", device="cpu")
    job = runner.start(tiny_config(digits_root, tiny_vit, tmp_path, epochs=50))
    try:
        with pytest.raises(BusyError, match="already in progress"):
            runner.start(tiny_config(digits_root, tiny_vit, tmp_path))
    finally:
        runner.stop()
        job.wait(60)
    assert len(RunStore(tmp_path / "runs").list_runs()) == 1


def test_unloadable_model_is_refused_before_a_run_folder_exists(tmp_path, digits_root):
    from vitft_app.modeling import ModelLoadError

    runner = JobRunner(tmp_path / "runs", device="cpu")
    with pytest.raises(ModelLoadError, match="no-such-model"):
        runner.start(tiny_config(digits_root, tmp_path / "no-such-model", tmp_path))
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        runner.start(tiny_config(digits_root, "vit-tiny-scratch", tmp_path, precision="fp16"))
    with pytest.raises(FileNotFoundError):
        runner.start(tiny_config(tmp_path / "no-data", "vit-tiny-scratch", tmp_path))
    assert RunStore(tmp_path / "runs").list_runs() == []


def test_dataset_problems_are_refused_before_a_run_folder_exists(tmp_path, tiny_vit):
    from PIL import Image

    from vitft_app.training import DatasetError

    (tmp_path / "one" / "only").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 80, 0, 0)).save(tmp_path / "one" / "only" / f"{i}.png")
    (tmp_path / "one" / "other").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (0, i * 80, 0)).save(tmp_path / "one" / "other" / f"{i}.png")
    runner = JobRunner(tmp_path / "runs", device="cpu")
    with pytest.raises(ValueError, match="freeze_depth must be between 0 and 2"):
        runner.start(tiny_config(tmp_path / "one", tiny_vit, tmp_path, freeze_depth=5))
    import shutil

    shutil.rmtree(tmp_path / "one" / "other")
    with pytest.raises(DatasetError, match="at least 2"):
        runner.start(tiny_config(tmp_path / "one", tiny_vit, tmp_path))
    assert RunStore(tmp_path / "runs").list_runs() == []


def test_failure_in_the_thread_becomes_failed_status(tmp_path, digits_small, tiny_vit, monkeypatch):
    from vitft_app import training

    def broken_model(*args, **kwargs):
        raise RuntimeError("simulated failure while loading weights")

    monkeypatch.setattr(training.setup, "build_model", broken_model)  # where the loop builds its model
    runner = JobRunner(tmp_path / "runs", device="cpu")
    seen = []
    job = runner.start(tiny_config(digits_small, tiny_vit, tmp_path), listener=seen.append)
    assert job.wait(60)
    assert isinstance(seen[-1], RunFailed)
    status = read_status(job.run_dir)
    assert status["status"] == "failed"
    assert status["error"] == "RuntimeError: simulated failure while loading weights"
    assert "Traceback" in (job.run_dir / "train.log").read_text()


def test_crashed_process_reads_as_interrupted(tmp_path):
    store = RunStore(tmp_path / "runs")
    run_dir = store.create_run(TrainConfig(data_dir="d"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    RunRecorder(run_dir).write_status(status="running", pid=int(dead.stdout))
    assert read_status(run_dir)["status"] == "interrupted"


# ---- optimizer steps, schedule and accumulation -------------------------------------------


def test_steps_per_epoch_counts_the_leftover_window():
    assert optimizer_steps_per_epoch(10, 4) == 3
    assert optimizer_steps_per_epoch(8, 4) == 2
    assert _window_sizes(num_samples=70, batch_size=8, grad_accum_steps=4) == [32, 32, 6]


def test_training_takes_exactly_the_scheduled_steps_with_accumulation(tmp_path, digits_small, tiny_vit):
    # 60 images, val 0.2 -> 48 train; batch 10 -> 5 micro-batches; accumulation 2 -> 3 steps/epoch.
    config = tiny_config(digits_small, tiny_vit, tmp_path, epochs=2, batch_size=10, grad_accum_steps=2,
                         log_every_steps=1)
    run_dir = RunStore(config.output_dir).create_run(config)
    events = []
    result = train(config, run_dir, events.append, device="cpu")
    assert result.steps == 6
    logged = [e for e in events if isinstance(e, StepLogged)]
    assert [e.step for e in logged] == [1, 2, 3, 4, 5, 6]
    assert logged[-1].lr == pytest.approx(0.0, abs=1e-12)  # cosine reaches 0 at the last step


def test_accumulated_gradients_equal_one_large_batch(tiny_vit):
    """K micro-batches with the loss divided by the window's sample count give the same
    gradient as one batch of all the samples (the per-sample mean)."""
    import torch.nn.functional as F
    from vitft_app.modeling import build_model

    torch.manual_seed(0)
    model = build_model(str(tiny_vit), ["a", "b", "c"]).model.eval()
    pixels, labels = torch.randn(7, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0])

    F.cross_entropy(model(pixel_values=pixels).logits, labels).backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for chunk in (slice(0, 3), slice(3, 6), slice(6, 7)):  # uneven micro-batches, as at an epoch's end
        loss_sum = F.cross_entropy(model(pixel_values=pixels[chunk]).logits, labels[chunk], reduction="sum")
        (loss_sum / 7).backward()
    for big, accumulated in zip(full, (p.grad for p in model.parameters())):
        assert torch.allclose(big, accumulated, atol=1e-6)


def test_a_dataset_deleted_before_the_first_epoch_fails_the_run_with_the_reason(tmp_path, digits_small, tiny_vit):
    """Every image of the epoch gone (folder deleted, moved, unmounted): the run fails with a plain
    reason instead of "completing" on zero images with a made-up validation accuracy."""
    import shutil

    from vitft_app.training import DatasetError

    config = tiny_config(digits_small, tiny_vit, tmp_path, epochs=2)
    run_dir = RunStore(config.output_dir).create_run(config)

    def emit(event):
        if isinstance(event, RunStarted):  # the scan is done; the epoch reads the files next
            shutil.rmtree(digits_small)

    with pytest.raises(DatasetError, match=r"None of the \d+ images read in epoch 1 could be loaded"):
        train(config, run_dir, emit, device="cpu")


def test_validation_with_no_loadable_image_raises_instead_of_scoring_zero():
    from vitft_app.device import resolve_device_plan
    from vitft_app.training import DatasetError
    from vitft_app.training.evaluation import evaluate

    empty = [{"pixel_values": torch.empty(0), "labels": torch.empty(0, dtype=torch.long), "failed": torch.tensor(4)}]
    with pytest.raises(DatasetError, match="None of the validation images could be loaded"):
        evaluate(torch.nn.Linear(2, 2), empty, resolve_device_plan("fp32", "cpu"))


def test_relative_dataset_and_model_paths_are_stored_absolute_so_resume_reads_the_same_ones(
        tmp_path, digits_small, tiny_vit, monkeypatch):
    """``vitft train --data big --model tiny`` in one folder and ``--resume`` from another used to
    train the rest of the run on whatever ``big`` the second folder held, without a word."""
    import shutil

    from vitft_app.config import TrainConfig as Config

    work = tmp_path / "work"
    shutil.copytree(digits_small, work / "digits")
    shutil.copytree(tiny_vit, work / "tiny")
    monkeypatch.chdir(work)
    runner = JobRunner(tmp_path / "runs", device="cpu")
    job = runner.start(tiny_config("digits", "tiny", tmp_path, epochs=1))
    assert job.wait(120) and job.error is None, job.error
    saved = Config.from_json_file(job.run_dir / "config.json")
    assert saved.data_dir == str(work / "digits") and saved.model == str(work / "tiny")
    # A Hub model id is not a local folder: it stays an id.
    from vitft_app.jobs import absolute_paths

    hub = absolute_paths(tiny_config(work / "digits", "google/vit-base-patch16-224", tmp_path))
    assert hub.model == "google/vit-base-patch16-224"


def test_messages_promise_a_saved_model_only_when_one_exists(tmp_path, digits_small, tiny_vit):
    """A run that fails in its first epoch has no model: its message says so instead of "the best
    model saved so far is kept"; the Stop and Ctrl-C lines use the same rule (runs.kept_model_note)."""
    from vitft_app.runs import kept_model_note
    from vitft_app.training import NonFiniteLossError

    config = tiny_config(digits_small, tiny_vit, tmp_path, lr=1e300, warmup_ratio=0.0, max_grad_norm=0.0, epochs=3,
                         batch_size=2)
    run_dir = RunStore(config.output_dir).create_run(config)
    with pytest.raises(NonFiniteLossError, match="no epoch has finished yet, so no model is saved"):
        train(config, run_dir, lambda event: None, device="cpu")
    assert not (run_dir / "model").exists()
    assert kept_model_note(run_dir) == "no epoch has finished yet, so no model is saved"
    shutil.copytree(tiny_vit, run_dir / "model")
    assert kept_model_note(run_dir) == "the best model so far stays saved"
