"""The runs table and the Runs tab's handlers (called directly; run folders written by the real
RunStore and RunRecorder, no training)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
import pytest

from conftest import save_tiny_vit
from vitft_app.config import TrainConfig
from vitft_app.events import EvalDone, RunFailed, RunFinished, RunStarted, StepLogged
from vitft_app.jobs import JobRunner
from vitft_app.plots import figure_compare
from vitft_app.runs import RunRecorder, RunStore, atomic_write_text
from vitft_app.runs_table import RESULT_ROWS, compare_configs, filter_runs, metrics_by_run, read_meta, runs_table
from vitft_app.ui import runs_tab
from vitft_app.ui.app import AppContext, AppSettings


@pytest.fixture
def ctx(tmp_path):
    settings = AppSettings(data_root=tmp_path, runs_dir=tmp_path / "runs", example_dir=tmp_path / "example",
                           device="cpu")
    return AppContext(settings=settings, runner=JobRunner(settings.runs_dir, device="cpu"))


def dead_pid() -> int:
    """The pid of a process that has exited (what a crashed app leaves in status.json)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def fake_run(store: RunStore, name: str, status: str, epochs: int = 2, lr: float = 1e-3, accuracies=(0.5, 0.75),
             val_baseline: dict | None = None, **config) -> Path:
    """A run folder written through the real recorder, as a training run would leave it."""
    run_dir = store.create_run(TrainConfig(data_dir="/data/flowers", model="vit-tiny-scratch", epochs=epochs, lr=lr,
                                           run_name=name, **config))
    recorder = RunRecorder(run_dir)
    recorder(RunStarted(run_id=run_dir.name, run_dir=str(run_dir), classes=["a", "b"], num_train=8, num_val=4,
                        epochs=epochs, total_steps=4, device="cpu", precision="fp32", trainable_params=10,
                        total_params=10, val_baseline=val_baseline))
    best = None
    for epoch, accuracy in enumerate(accuracies, start=1):
        recorder(StepLogged(step=epoch * 2, epoch=epoch - 0.5, loss=1.0 / epoch, lr=lr, images_per_sec=10.0, eta_s=1.0))
        best = max(best or 0, accuracy)
        recorder(EvalDone(step=epoch * 2, epoch=epoch, train_loss=1.0 / epoch, train_accuracy=accuracy,
                          val_loss=1.1 / epoch, val_accuracy=accuracy, best_val_accuracy=best, is_best=True))
    if status in ("completed", "stopped"):
        recorder(RunFinished(status=status, best_val_accuracy=best, duration_s=65.0))
    elif status == "failed":
        recorder(RunFailed(error="boom", traceback="Traceback ..."))
    elif status == "crashed":  # still "running" on disk, but its process is gone
        recorder.write_status(status="running", pid=dead_pid())
    return run_dir


def test_runs_table_reflects_the_runs_folder_and_detects_interrupted(ctx):
    store = ctx.runner.store
    done = fake_run(store, "good", "completed", lr=3e-3, accuracies=(0.5, 0.9))
    (done / "eval" / "val").mkdir(parents=True)
    atomic_write_text(done / "eval" / "val" / "metrics.json", json.dumps({"macro_f1": 0.875, "accuracy": 0.9}))
    crashed = fake_run(store, "crashed", "crashed")
    failed = fake_run(store, "broken", "failed", accuracies=())
    (store.root / "not-a-run").mkdir()  # ignored: no config.json / status.json

    table = runs_table(store.root).set_index("run_id")
    assert set(table.index) == {done.name, crashed.name, failed.name}
    assert table.loc[done.name, "status"] == "completed"
    assert table.loc[crashed.name, "status"] == "interrupted"  # running on disk, dead pid
    assert table.loc[failed.name, "status"] == "failed"
    assert table.loc[done.name, "best_val_accuracy"] == pytest.approx(0.9)
    assert table.loc[done.name, "macro_f1"] == pytest.approx(0.875)
    assert pd.isna(table.loc[crashed.name, "macro_f1"])  # never evaluated: blank
    assert table.loc[done.name, "duration"] == "1:05"
    assert table.loc[done.name, "dataset"] == "flowers" and table.loc[done.name, "model"] == "vit-tiny-scratch"
    assert table.loc[done.name, "lr"] == pytest.approx(3e-3) and table.loc[done.name, "epochs"] == 2
    assert table.loc[done.name, "date"]

    assert filter_runs(runs_table(store.root), status="interrupted")["run_id"].tolist() == [crashed.name]
    assert filter_runs(runs_table(store.root), text="GOOD")["run_id"].tolist() == [done.name]
    by_accuracy = filter_runs(runs_table(store.root), sort_by="best_val_accuracy", descending=True)
    assert by_accuracy["run_id"].tolist()[0] == done.name and by_accuracy["run_id"].tolist()[-1] == failed.name

    shown, selected, compared = runs_tab.refresh(ctx, "", "all", "date", True, None, [])
    # headers in words: "best val accuracy", "macro-F1", "freeze depth", not the field names
    assert list(shown.columns) == [runs_tab.HEADERS.get(c, c) for c in runs_tab.SHOWN_COLUMNS] and len(shown) == 3
    assert {"best val accuracy", "macro-F1", "freeze depth", "run id"} <= set(shown.columns)
    assert not [c for c in shown.columns if "_" in c]
    assert {path for _, path in selected["choices"]} == {str(done), str(crashed), str(failed)}
    newest = [path for _, path in selected["choices"]][:2]
    assert compared["value"] == newest  # an empty comparison gets the two newest runs ...
    _, _, compared = runs_tab.refresh(ctx, "", "all", "date", True, str(failed), [])
    assert compared["value"][0] == str(failed) and len(compared["value"]) == 2  # ... the selected one first
    _, _, compared = runs_tab.refresh(ctx, "", "all", "date", True, None, [str(crashed)])
    assert compared["value"] == [str(crashed)]  # a choice the user made is kept
    assert runs_tab.run_from_row(ctx, shown, 0) == str(store.root / shown.iloc[0]["run id"])
    assert runs_tab.run_from_row(ctx, shown, 7) is None


def test_the_action_buttons_follow_the_selected_run(ctx):
    """Open in Evaluate, Resume, Delete... were on with no run selected, and Resume on for a
    completed run that could only answer "no checkpoint"."""
    store = ctx.runner.store

    def states(run_dir):
        return [u["interactive"] for u in runs_tab.selection_buttons(ctx, run_dir)]

    assert states(None) == [False] * 6
    done = fake_run(store, "done", "completed")
    assert states(str(done)) == [True, True, True, False, True, True]  # a completed run has no checkpoint
    stopped = fake_run(store, "stopped", "stopped")
    (stopped / "checkpoint.pt").write_bytes(b"x")
    assert states(str(stopped)) == [True] * 6


def test_rename_and_delete_handlers(ctx, tmp_path):
    store = ctx.runner.store
    run_dir = fake_run(store, "first", "completed")
    other = fake_run(store, "second", "stopped")

    assert "now shown as **baseline lr 1e-3**" in runs_tab.rename_selected(ctx, str(run_dir), "  baseline lr 1e-3 ")
    assert read_meta(run_dir)["name"] == "baseline lr 1e-3" and run_dir.is_dir()  # the folder keeps its name
    table = runs_table(store.root).set_index("run_id")
    assert table.loc[run_dir.name, "name"] == "baseline lr 1e-3"
    assert runs_tab.rename_selected(ctx, str(run_dir), "two\nlines").startswith("✗")
    assert runs_tab.rename_selected(ctx, None, "x").startswith("Choose a run")
    runs_tab.rename_selected(ctx, str(run_dir), "")  # blank: back to the run id
    assert runs_table(store.root).set_index("run_id").loc[run_dir.name, "name"] == run_dir.name

    # The running job cannot be deleted (a task job that holds the run as its current one).

    def hold(job):
        job.run_dir = run_dir
        job.stop_event.wait(30)

    job = ctx.runner.start_task("hold", hold)
    while job.run_dir != run_dir:
        job.wait(0.01)
    message, confirm = runs_tab.ask_delete(ctx, str(run_dir))
    assert message.startswith("✗") and "training right now" in message and confirm["visible"] is False
    message, _ = runs_tab.confirm_delete(ctx, str(run_dir))
    assert message.startswith("✗") and run_dir.is_dir()
    assert ctx.runner.stop() and job.wait(10)

    message, confirm = runs_tab.ask_delete(ctx, str(other))
    assert "cannot be undone" in message and confirm["visible"] is True
    message, confirm = runs_tab.confirm_delete(ctx, str(other))
    assert message.startswith("✓") and not other.exists() and confirm["visible"] is False
    assert runs_table(store.root)["run_id"].tolist() == [run_dir.name]

    outside = fake_run(RunStore(tmp_path / "elsewhere"), "x", "completed")
    message, _ = runs_tab.confirm_delete(ctx, str(outside))
    assert "not inside the runs folder" in message and outside.exists()
    crashed_elsewhere = fake_run(store, "live", "completed")
    RunRecorder(crashed_elsewhere).write_status(status="running")  # this (live) process's pid
    message, _ = runs_tab.confirm_delete(ctx, str(crashed_elsewhere))
    assert message.startswith("✗") and crashed_elsewhere.exists()


def test_compare_figure_has_one_trace_per_run_and_configs_side_by_side(ctx):
    store = ctx.runner.store
    half = {"majority_class": "a", "majority_count": 2, "total": 4, "num_classes": 2}
    runs = [fake_run(store, f"r{i}", "completed", lr=lr, accuracies=acc, val_baseline=half if i < 2 else None)
            for i, (lr, acc) in enumerate([(1e-3, (0.5, 0.6)), (3e-3, (0.4, 0.8)), (1e-2, (0.3,))])]
    metrics = metrics_by_run(runs)
    assert list(metrics) == [r.name for r in runs]
    accuracy = figure_compare(metrics, "val_accuracy")
    assert isinstance(accuracy, go.Figure) and len(accuracy.data) == 3
    assert [list(t.y) for t in accuracy.data] == [[0.5, 0.6], [0.4, 0.8], [0.3]]
    assert [t.name for t in accuracy.data] == [r.name for r in runs]
    assert len(figure_compare(metrics, "loss").data) == 3
    assert len(figure_compare({"empty": pd.DataFrame()}, "val_loss").data) == 1
    with pytest.raises(ValueError, match="metric must be one of"):
        figure_compare(metrics, "f1")

    table = compare_configs(runs[:2])
    by_setting = table.set_index("setting")
    assert bool(by_setting.loc["lr", "differs"]) and not bool(by_setting.loc["model", "differs"])
    assert by_setting.loc["lr", runs[0].name] == "0.001" and by_setting.loc["lr", runs[1].name] == "0.003"
    assert table["differs"].tolist() == sorted(table["differs"].tolist(), reverse=True)  # differing rows first

    loss, acc, styled, message = runs_tab.compare(ctx, [str(r) for r in runs])
    assert len(loss.data) == 3 and len(acc.data) == 3 and "differ" in message
    # The two runs on one split share one baseline line; the run without one adds none; loss has none.
    assert [(shape.y0, shape.line.dash) for shape in acc.layout.shapes] == [(0.5, "dash")]
    assert [a.text for a in acc.layout.annotations] == ["always 'a': 50.0%"]
    assert not loss.layout.shapes
    assert isinstance(styled, pd.io.formats.style.Styler)
    assert "background-color" in styled.to_html()
    assert runs_tab.compare(ctx, [str(runs[0])])[3] == "Choose at least two runs to compare."
    # the count names settings only: a differing accuracy or status is a result, not a setting
    differing = set(table.loc[table["differs"], "setting"])
    assert "best_val_accuracy" in differing
    settings = differing - set(RESULT_ROWS)
    assert f"2 runs; {len(settings)} setting(s) differ" in runs_tab.compare(ctx, [str(r) for r in runs[:2]])[3]


def test_open_in_evaluate_or_predict_and_resume_hook(ctx, monkeypatch):
    store = ctx.runner.store
    no_model = fake_run(store, "nomodel", "failed", accuracies=())
    with_model = fake_run(store, "withmodel", "stopped")
    save_tiny_vit(with_model / "model")

    update, message, switch = runs_tab.open_in(ctx, str(no_model), "evaluate")
    assert switch is False and "no saved model" in message
    update, message, switch = runs_tab.open_in(ctx, str(with_model), "predict")
    assert switch is True and update["value"] == str(with_model)
    assert str(with_model) in [path for _, path in update["choices"]]
    assert runs_tab.open_in(ctx, None, "evaluate")[2] is False

    # Resume needs a checkpoint (the real resume is tested in test_ui and test_recipe).
    assert "completed run deletes it" in runs_tab.resume_selected(ctx, str(fake_run(store, "done", "completed")))
    assert "no checkpoint" in runs_tab.resume_selected(ctx, str(with_model))
    assert runs_tab.resume_selected(ctx, None).startswith("Choose a run")


def test_tracking_switch(ctx, monkeypatch):
    value, message = runs_tab.set_tracking(ctx, "tensorboard")
    assert value == "tensorboard" and ctx.runner.report_to == "tensorboard" and "tensorboard" in message
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    value, message = runs_tab.set_tracking(ctx, "mlflow")
    assert value == "none" and ctx.runner.report_to == "none" and "pip install" in message


def test_app_has_runs_and_sweep_tabs(ctx):
    from vitft_app.ui.app import build_app

    demo = build_app(ctx.settings)
    labels = {block.label for block in demo.blocks.values() if isinstance(block, gr.Tab)}
    assert {"Data", "Train", "Evaluate", "Predict", "Runs", "Sweep"} <= labels


@pytest.mark.browser
def test_browser_open_in_evaluate_and_compare(tmp_path, tiny_vit):
    """The wiring only a browser shows: a row click selects the run, Open in Evaluate switches tabs
    with the run chosen, Compare draws the highlighted settings table."""
    import os
    import socket

    from playwright.sync_api import expect, sync_playwright
    from tests_helpers import CHROMIUM, CHROMIUM_ARGS

    store = RunStore(tmp_path / "runs")
    half = {"majority_class": "a", "majority_count": 2, "total": 4, "num_classes": 2}
    first = fake_run(store, "alpha", "completed", lr=1e-3, val_baseline=half)
    second = fake_run(store, "beta", "stopped", lr=3e-3, val_baseline=half)
    for run_dir in (first, second):
        save_tiny_vit(run_dir / "model")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "VITFT_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    root = Path(__file__).resolve().parents[1]
    with open(tmp_path / "app.log", "w") as log:
        process = subprocess.Popen([sys.executable, str(root / "app.py"), "--port", str(port), "--data-root",
                                    str(tmp_path), "--runs-dir", str(store.root), "--no-browser"],
                                   cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1300, "height": 1500})
            page.set_default_timeout(30_000)
            for _ in range(360):
                try:
                    page.goto(f"http://127.0.0.1:{port}")
                    break
                except Exception:  # noqa: BLE001 - not listening yet
                    assert process.poll() is None, (tmp_path / "app.log").read_text()[-3000:]
                    page.wait_for_timeout(500)
            page.get_by_role("tab", name="Runs").click()
            expect(page.locator("#runs-table")).to_contain_text("beta")
            cells = page.locator("#runs-table").get_by_text(first.name, exact=True).all()
            next(cell for cell in cells if cell.is_visible()).click()  # the name column (run_id is off to the right)
            expect(page.locator("#runs-selected input")).to_have_value(first.name, timeout=120_000)
            page.locator("#runs-open-evaluate").click()
            # Playwright's 5 s default was too short for the tab switch under the full suite (CI-like load)
            expect(page.locator("#evaluate-button")).to_be_visible(timeout=120_000)
            expect(page.locator("#eval-run input")).to_have_value(re.compile(re.escape(first.name)), timeout=120_000)
            page.get_by_role("tab", name="Runs").click()
            page.get_by_text("Compare runs").click()
            # The two runs are already chosen (an empty comparison gets the two newest).
            for name in ("alpha", "beta"):
                expect(page.locator("#runs-compare")).to_contain_text(name)
            page.locator("#runs-compare-button").click()
            expect(page.locator("#runs-compare-table")).to_contain_text("run_name")
            highlighted = page.locator("#runs-compare-table").evaluate(  # style_differences' #fff3bf
                "t => [...t.querySelectorAll('*')].filter(e => getComputedStyle(e).backgroundColor"
                " === 'rgb(255, 243, 191)').map(e => e.textContent.trim()).filter(Boolean)")
            assert "lr" in highlighted and "model" not in highlighted
            # The validation-accuracy curves over the runs' shared majority-class baseline line.
            plot = page.locator("#runs-compare-accuracy")
            expect(plot).to_contain_text("always 'a': 50.0%")
            page.set_viewport_size({"width": 1400, "height": 900})
            plot.scroll_into_view_if_needed()
            artifacts = root / "test-artifacts"
            artifacts.mkdir(exist_ok=True)
            page.screenshot(path=str(artifacts / "runs-compare.png"))
            browser.close()
    finally:
        process.terminate()
        process.wait(20)
