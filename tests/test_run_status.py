"""RunStatus: the typed status.json, and run folders written before it existed.

The fixture ``tests/fixtures/run-before-runstatus`` is a real run folder made with the code before
the typed status (a tiny ViT on 3 digit classes, stopped at step 8 of 12): its ``config.json``,
``status.json`` (the free dict of that version, nulls included), ``metrics.csv``, ``train.log``
and ``checkpoint.pt``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vitft_app.config import TrainConfig
from vitft_app.events import EvalDone, StepLogged, metrics_columns, metrics_row
from vitft_app.run_status import RunStatus, as_run_status
from vitft_app.runs import METRICS_COLUMNS, RunRecorder, RunStore, read_metrics, read_status
from vitft_app.runs_table import runs_table
from vitft_app.training import resume_run
from vitft_app.ui import train_tab

FIXTURE = Path(__file__).parent / "fixtures" / "run-before-runstatus"


@pytest.fixture
def old_run(tmp_path, digits_small, tiny_vit) -> Path:
    """A copy of the fixture run in ``tmp_path/runs``, its dataset and model pointed at this
    session's copies of the same digits and tiny ViT (the recorded paths were temporary)."""
    run_dir = tmp_path / "runs" / "20261202-123735-before-runstatus"
    shutil.copytree(FIXTURE, run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    config.update(data_dir=str(digits_small), model=str(tiny_vit), output_dir=str(tmp_path / "runs"))
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    return run_dir


def test_an_old_status_json_reads_into_attributes_and_keeps_unknown_keys(old_run):
    raw = json.loads((old_run / "status.json").read_text())
    raw["written_by_a_newer_vitft"] = {"x": 1}
    (old_run / "status.json").write_text(json.dumps(raw))
    status = read_status(old_run)
    assert isinstance(status, RunStatus)
    assert (status.status, status.step, status.total_steps, status.classes) == ("stopped", 8, 12, ["0", "1", "7"])
    assert status.best_val_accuracy == pytest.approx(raw["best_val_accuracy"])
    assert status.val_map is None and status.extra == {"written_by_a_newer_vitft": {"x": 1}}
    # Written back: every key that had a value, the unknown one too (nulls are left out).
    assert status.to_dict() == {k: v for k, v in raw.items() if v is not None}
    assert RunStatus.from_json(status.to_json()) == status
    # The former dict interface still answers, for code written against it.
    assert status["status"] == "stopped" and status.get("val_map", "none") == "none" and "step" in status


def test_an_old_run_lists_in_the_runs_table_and_the_status_line(old_run):
    frame = runs_table(old_run.parent)
    row = frame.iloc[0]
    assert (row["run_id"], row["status"]) == (old_run.name, "stopped")
    assert row["best_val_accuracy"] == pytest.approx(read_status(old_run).best_val_accuracy)
    [info] = RunStore(old_run.parent).list_runs()
    assert info.status == "stopped"
    text = train_tab.status_markdown(read_status(old_run), old_run.name)
    assert "**stopped** after step 8 of 12" in text and "Resume" in text
    assert TrainConfig.from_json_file(old_run / "config.json").epochs == 2


def test_an_old_run_resumes_and_its_metrics_continue(old_run):
    assert list(read_metrics(old_run).columns) == METRICS_COLUMNS  # the same columns as before
    recorder = RunRecorder(old_run)
    seen = []
    result = resume_run(old_run, lambda e: (seen.append(e), recorder(e)), device="cpu")
    assert result.status == "completed"
    assert min(e.step for e in seen if isinstance(e, StepLogged)) == 9
    status = read_status(old_run)
    assert (status.status, status.step, status.resumed_from_step) == ("completed", 12, 8)
    assert status.run_id == old_run.name and status.started_at == "2026-12-02T12:37:36"  # kept from the old file
    steps = read_metrics(old_run).query("kind == 'train'")["step"].tolist()
    assert steps == list(range(1, 13))


def test_metrics_columns_come_from_the_event_fields():
    assert metrics_columns() == METRICS_COLUMNS == [
        "kind", "step", "epoch", "loss", "lr", "images_per_sec", "train_loss", "train_accuracy", "val_loss",
        "val_accuracy", "val_f1_macro", "val_map", "time_s"]
    row = metrics_row(StepLogged(step=3, epoch=1.234567, loss=0.5, lr=1e-3, images_per_sec=12.3456, eta_s=4.0))
    assert row == {"kind": "train", "step": 3, "epoch": 1.2346, "loss": 0.5, "lr": 1e-3, "images_per_sec": 12.35}
    row = metrics_row(EvalDone(step=6, epoch=1, train_loss=0.9, train_accuracy=0.5, val_loss=0.8, val_accuracy=0.6,
                               best_val_accuracy=0.6, is_best=True, val_f1_macro=0.55))
    assert row == {"kind": "eval", "step": 6, "epoch": 1, "train_loss": 0.9, "train_accuracy": 0.5, "val_loss": 0.8,
                   "val_accuracy": 0.6, "val_f1_macro": 0.55, "val_map": None}


def test_a_damaged_or_missing_status_reads_as_an_empty_status(tmp_path):
    assert not read_status(tmp_path) and read_status(tmp_path).status is None
    (tmp_path / "status.json").write_text("[1, 2]")
    assert not read_status(tmp_path)
    assert as_run_status({"status": "running", "step": 2}).step == 2
    assert as_run_status(None) == RunStatus()
