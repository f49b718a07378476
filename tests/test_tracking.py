"""Tracking: the same metrics go to TensorBoard event files and to MLflow."""

from __future__ import annotations

import importlib.util

import pytest

from vitft_app.cli import build_parser
from vitft_app.config import TrainConfig
from vitft_app.events import EvalDone, RunFinished, StepLogged
from vitft_app.jobs import JobRunner
from vitft_app.runs import read_metrics, read_status
from vitft_app.tracking import MlflowTracker, TrackingUnavailable, check_report_to, create_tracker


def test_tensorboard_gets_the_loss_of_a_real_run(tmp_path, colors_root, tiny_vit):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runner = JobRunner(tmp_path / "runs", device="cpu")
    config = TrainConfig(data_dir=str(colors_root), model=str(tiny_vit), epochs=2, batch_size=8, lr=3e-3,
                         augment="none", precision="fp32", log_every_steps=5, output_dir=str(tmp_path / "runs"))
    job = runner.start(config, report_to="tensorboard")
    assert job.wait(120)
    assert read_status(job.run_dir)["status"] == "completed"
    files = list((job.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    events = EventAccumulator(str(job.run_dir / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "eval/val_accuracy", "eval/val_loss"} <= set(events.Tags()["scalars"])
    metrics = read_metrics(job.run_dir)
    train_rows = metrics[metrics["kind"] == "train"]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == train_rows["step"].tolist()  # the same rows as metrics.csv
    assert [e.value for e in loss] == pytest.approx(train_rows["loss"].tolist(), rel=1e-5)
    accuracy = events.Scalars("eval/val_accuracy")
    assert [e.value for e in accuracy] == pytest.approx(metrics.loc[metrics["kind"] == "eval", "val_accuracy"].tolist())


def test_mlflow_logs_params_and_metrics_in_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "20260101-000000-run"
    run_dir.mkdir()
    config = TrainConfig(data_dir="/data", lr=1e-3)
    tracker = create_tracker("mlflow", run_dir, config)
    assert isinstance(tracker, MlflowTracker) and tracker.tracking_uri.endswith("mlruns/mlflow.db")
    tracker(StepLogged(step=5, epoch=0.5, loss=1.25, lr=1e-3, images_per_sec=10.0, eta_s=3.0))
    tracker(StepLogged(step=10, epoch=1.0, loss=0.75, lr=5e-4, images_per_sec=10.0, eta_s=0.0))
    tracker(EvalDone(step=10, epoch=1, train_loss=0.9, train_accuracy=0.6, val_loss=0.8, val_accuracy=0.7,
                     best_val_accuracy=0.7, is_best=True))
    tracker(RunFinished(status="completed", best_val_accuracy=0.7, duration_s=1.0))
    tracker.close()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.001" and run.data.params["data_dir"] == "/data"
    history = client.get_metric_history(tracker.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(5, 1.25), (10, 0.75)]
    assert run.data.metrics["eval_val_accuracy"] == pytest.approx(0.7)


def test_report_to_is_checked_before_a_run_starts(tmp_path, monkeypatch):
    assert check_report_to(None) == "none" and check_report_to("TensorBoard") == "tensorboard"
    assert create_tracker("none", tmp_path) is None
    with pytest.raises(ValueError, match="report_to must be one of"):
        check_report_to("wandb")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(TrackingUnavailable, match="pip install tensorboard"):
        check_report_to("tensorboard")
    runner = JobRunner(tmp_path / "runs", device="cpu")
    with pytest.raises(TrackingUnavailable):
        runner.start(TrainConfig(data_dir=str(tmp_path)), report_to="tensorboard")
    assert list((tmp_path / "runs").iterdir()) == []  # refused before a run folder exists


def test_cli_flags():
    parser = build_parser()
    assert parser.parse_args(["train", "--data", "d", "--report-to", "mlflow"]).report_to == "mlflow"
    assert parser.parse_args(["train", "--data", "d"]).report_to == "none"
    args = parser.parse_args(["sweep", "--data", "d", "--trials", "4", "--report-to", "tensorboard"])
    assert args.report_to == "tensorboard" and args.trials == 4 and args.sampler == "tpe"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--data", "d", "--report-to", "wandb"])


def test_a_broken_tracker_never_fails_the_run(tmp_path, colors_root, tiny_vit, monkeypatch):
    from vitft_app import tracking

    class Broken(tracking.Tracker):
        def scalars(self, values, step):
            raise OSError("disk full")

    monkeypatch.setattr(tracking, "create_tracker", lambda *args: Broken())
    runner = JobRunner(tmp_path / "runs", device="cpu")
    config = TrainConfig(data_dir=str(colors_root), model=str(tiny_vit), epochs=1, batch_size=8, lr=3e-3,
                         augment="none", precision="fp32", output_dir=str(tmp_path / "runs"))
    job = runner.start(config, report_to="tensorboard")
    assert job.wait(120)
    assert read_status(job.run_dir)["status"] == "completed"
    assert "tracking (tensorboard) turned off after an error: OSError: disk full" in (job.run_dir / "train.log").read_text()
