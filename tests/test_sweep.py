"""Sweeps: real Optuna studies whose trials are real (tiny) training runs on colors_root."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import optuna
import plotly.graph_objects as go
import pytest
from optuna.trial import TrialState

from vitft_app import sweep
from vitft_app.cli import main
from vitft_app.config import TrainConfig
from vitft_app.jobs import BusyError, JobRunner
from vitft_app.runs import read_metrics, read_status
from vitft_app.runs_table import read_meta, runs_table
from vitft_app.ui import sweep_tab
from vitft_app.ui.app import AppContext, AppSettings

optuna.logging.set_verbosity(optuna.logging.WARNING)


def base_config(data: Path, model: Path, runs: Path, **changes) -> TrainConfig:
    values = dict(data_dir=str(data), model=str(model), epochs=1, batch_size=8, lr=3e-3, augment="none",
                  precision="fp32", log_every_steps=5, output_dir=str(runs))
    return TrainConfig(**(values | changes))


def trial_dirs(runs: Path) -> list[Path]:
    return sorted(p for p in runs.iterdir() if (p / "meta.json").exists())


def wait_until(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_search_space_checks_and_grid(tmp_path):
    available = sweep.available_parameters()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {"lr", "weight_decay", "freeze_depth", "batch_size", "augment"} <= set(available) <= fields
    space = sweep.validate_space({"lr": {"low": "1e-5", "high": 1e-2, "log": True}, "batch_size": [16, 32.0],
                                  "freeze_depth": {"low": 0, "high": 2}})
    assert space["lr"] == {"low": 1e-5, "high": 1e-2, "log": True} and space["batch_size"] == [16, 32]
    assert sweep.grid_space(space) == {"lr": [1e-5, pytest.approx(3.16228e-4), 1e-2], "batch_size": [16, 32],
                                       "freeze_depth": [0, 1, 2]}
    assert sweep.grid_size(space) == 18
    dists = sweep.distributions(space)
    assert isinstance(dists["lr"], optuna.distributions.FloatDistribution) and dists["lr"].log
    assert isinstance(dists["freeze_depth"], optuna.distributions.IntDistribution)
    for bad, match in [({"seed": [1, 2]}, "cannot be searched"), ({"lr": {"low": 0, "high": 1, "log": True}}, "log range"),
                       ({"lr": {"low": 1, "high": 0.1}}, "greater than"), ({"batch_size": [1.5]}, "whole number"),
                       ({"augment": ["sepia"]}, "not among"), ({}, "empty"), ({"lr": []}, "at least one value")]:
        with pytest.raises(sweep.SweepError, match=match):
            sweep.validate_space(bad)
    # Parameters the other recipe work adds are offered only once TrainConfig has them.
    for name in ("label_smoothing", "mixup", "cutmix"):
        if name in fields:
            assert name in available and sweep.validate_space({name: {"low": 0.0, "high": 0.2}})
        else:
            assert name not in available
            with pytest.raises(sweep.SweepError, match=f"TrainConfig has no {name} field"):
                sweep.validate_space({name: {"low": 0.0, "high": 0.2}})

    yaml_file = tmp_path / "space.yaml"
    yaml_file.write_text("lr: {low: 1e-5, high: 1e-3, log: true}\nbatch_size: [8, 16]\n")
    assert sweep.load_space_file(yaml_file) == {"lr": {"low": 1e-5, "high": 1e-3, "log": True}, "batch_size": [8, 16]}
    bad_json = tmp_path / "space.json"
    bad_json.write_text("{not json")
    with pytest.raises(sweep.SweepError, match="Cannot read the search space"):
        sweep.load_space_file(bad_json)
    with pytest.raises(sweep.SweepError, match="sweep name"):
        sweep.check_sweep_name("../etc")


def test_three_trial_sweep_then_restart_continues_the_study(tmp_path, colors_root, tiny_vit):
    runs = tmp_path / "runs"
    runner = JobRunner(runs, device="cpu")
    config = base_config(colors_root, tiny_vit, runs)
    space = {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "weight_decay": {"low": 0.0, "high": 0.1}}
    job = sweep.start_sweep(runner, config, space, 3, name="colors")
    with pytest.raises(BusyError, match="already in progress"):  # one job at a time, sweep included
        runner.start(config)
    assert job.wait(300) and job.error is None, job.error
    result = job.result
    assert result.trials_run == 3 and result.total_trials == 3 and not result.stopped

    study = sweep.load_sweep(runs, "colors")
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len({t.params["lr"] for t in study.trials}) == 3  # TPE's seeded random start
    folders = trial_dirs(runs)
    assert len(folders) == 3 and (runs / "sweeps.db").is_file()
    for trial, folder in zip(study.trials, folders):
        assert read_meta(folder) == {"sweep": "colors", "trial": trial.number}
        assert folder.name.endswith(f"colors-t{trial.number}")
        assert trial.user_attrs["run_dir"] == str(folder)
        saved = json.loads((folder / "config.json").read_text())
        assert saved["lr"] == pytest.approx(trial.params["lr"]) and saved["batch_size"] == 8
        assert read_status(folder)["best_val_accuracy"] == pytest.approx(trial.value)
    assert set(runs_table(runs)["sweep"]) == {"colors"}
    assert result.best_run_dir == study.best_trial.user_attrs["run_dir"]

    # A crash mid-trial leaves a RUNNING trial behind; then the app restarts (new runner, new study
    # object from the same storage) and the sweep continues up to 5 trials in total.
    sweep.open_study(runs, "colors").ask()
    with pytest.raises(sweep.SweepError, match="already has 4 trial"):
        sweep.start_sweep(JobRunner(runs, device="cpu"), config, space, 4, name="colors")
    restarted = JobRunner(runs, device="cpu")
    job = sweep.start_sweep(restarted, config, space, 5, name="colors")
    assert job.wait(300) and job.error is None, job.error
    study = sweep.load_sweep(runs, "colors")
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert study.trials[3].state == TrialState.FAIL  # the crashed one
    assert study.trials[4].state == TrialState.COMPLETE
    assert trial_dirs(runs)[-1].name.endswith("colors-t4") and len(trial_dirs(runs)) == 4

    # Results for the UI: trials table, charts, best config.
    frame = sweep.trials_frame(study)
    assert frame["trial"].tolist() == [0, 1, 2, 3, 4] and {"lr", "weight_decay", "run_id"} <= set(frame.columns)
    history = sweep.figure_history(study)
    assert isinstance(history, go.Figure)
    # The trials' shared validation baseline: a dashed line on the chart, beside the best in the summary.
    baseline = sweep.sweep_baseline(study)
    assert baseline is not None and 0 < baseline.rate < 1
    assert [shape.y0 for shape in history.layout.shapes] == [baseline.rate]
    assert f"(always '{baseline.majority_class}': " in sweep.study_summary(study)
    assert isinstance(sweep.figure_importance(study), go.Figure)
    ctx = AppContext(settings=AppSettings(data_root=tmp_path, runs_dir=runs, example_dir=tmp_path / "ex",
                                          device="cpu"), runner=restarted)
    shown = sweep_tab.show_sweep(ctx, "colors")
    assert "5 trial(s)" in shown["summary"] and len(shown["trials"]) == 5 and shown["importance"] is not None
    best = sweep.best_config(study)
    assert best.lr == pytest.approx(study.best_params["lr"]) and best.run_name == "colors-best"
    message = sweep_tab.train_best_from_ui(ctx, "colors", 2)
    assert message.startswith("▶"), message
    assert restarted.current.wait(120)
    best_run = restarted.current.run_dir
    assert read_status(best_run)["status"] == "completed"
    assert read_meta(best_run) == {"sweep": "colors", "best_of_trial": study.best_trial.number}
    assert json.loads((best_run / "config.json").read_text())["epochs"] == 2


def test_median_pruner_stops_a_hopeless_trial(tmp_path, colors_root, tiny_vit):
    """Trial 0 (lr 3e-3) reaches 100% at epoch 1; trial 1 (lr 1e-9) stays near chance, below the
    median of epoch 1, so MedianPruner(n_startup_trials=1) prunes it and its run stops after epoch 1."""
    runs = tmp_path / "runs"
    runner = JobRunner(runs, device="cpu")
    space = {"lr": [3e-3, 1e-9]}
    study = sweep.open_study(runs, "prune", "tpe", space, pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    study.enqueue_trial({"lr": 3e-3})
    study.enqueue_trial({"lr": 1e-9})
    result = sweep.run_sweep(runner, base_config(colors_root, tiny_vit, runs, epochs=2), space, 2, name="prune",
                             study=study)
    assert result.trials_run == 2
    good, hopeless = study.trials
    assert good.state == TrialState.COMPLETE and good.intermediate_values[1] == 1.0, good.intermediate_values
    assert hopeless.state == TrialState.PRUNED and hopeless.intermediate_values[1] < 1.0
    assert list(hopeless.intermediate_values) == [1]  # no second epoch
    run_dir = Path(hopeless.user_attrs["run_dir"])
    assert read_status(run_dir)["status"] == "stopped"
    assert (read_metrics(run_dir)["kind"] == "eval").sum() == 1
    assert (read_metrics(Path(good.user_attrs["run_dir"]))["kind"] == "eval").sum() == 2
    with pytest.raises(sweep.SweepError, match="at least 2 completed trials"):
        sweep.figure_importance(study)


def test_stop_ends_the_sweep_after_the_current_trial(tmp_path, colors_root, tiny_vit):
    runs = tmp_path / "runs"
    runner = JobRunner(runs, device="cpu")
    job = sweep.start_sweep(runner, base_config(colors_root, tiny_vit, runs, epochs=500), {"lr": [1e-3, 3e-3]}, 3,
                            name="stopme")
    wait_until(lambda: job.run_dir != runs.resolve() and read_status(job.run_dir).get("status") == "running")
    assert runner.stop()
    assert job.wait(60) and job.error is None
    assert job.result.stopped and job.result.trials_run == 1
    study = sweep.load_sweep(runs, "stopme")
    assert len(study.trials) == 1 and study.trials[0].state == TrialState.FAIL
    assert study.trials[0].user_attrs["error"] == "stopped before it finished"
    assert read_status(job.run_dir)["status"] == "stopped" and len(trial_dirs(runs)) == 1


def test_cli_grid_sweep(tmp_path, colors_root, tiny_vit, capsys):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"batch_size": [8, 16]}))
    runs = tmp_path / "runs"
    code = main(["sweep", "--data", str(colors_root), "--model", str(tiny_vit), "--trials", "5", "--space", str(space),
                 "--sampler", "grid", "--name", "grid", "--epochs", "1", "--augment", "none", "--precision", "fp32",
                 "--output-dir", str(runs)])
    out, err = capsys.readouterr()
    assert code == 0, err
    study = sweep.load_sweep(runs, "grid")
    assert sorted(t.params["batch_size"] for t in study.trials) == [8, 16]  # 5 asked, the grid has 2
    assert Path(out.strip().splitlines()[-1]) == Path(study.best_trial.user_attrs["run_dir"])
    assert err.count("== ") == 2  # one header per trial
    assert main(["sweep", "--data", str(colors_root), "--trials", "1", "--space", str(tmp_path / "missing.json"),
                 "--output-dir", str(runs)]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_sweep_tab_messages(tmp_path, colors_root):
    ctx = AppContext(settings=AppSettings(data_root=colors_root.parent, runs_dir=tmp_path / "runs",
                                          example_dir=tmp_path / "ex", device="cpu"),
                     runner=JobRunner(tmp_path / "runs", device="cpu"))
    fixed = {"model": "vit-tiny-scratch", "image_size": 32, "epochs": 1, "batch_size": 8, "lr": 1e-3,
             "weight_decay": 0.0, "freeze_depth": 0, "augment": "none", "precision": "fp32", "seed": 42}
    nothing = {f"{p}.on": False for p in sweep.available_parameters()}
    message, _ = sweep_tab.start_from_form(ctx, str(colors_root), fixed, nothing, 3, "", "tpe", True)
    assert message.startswith("✗") and "search space is empty" in message
    space = nothing | {"freeze_depth.on": True, "freeze_depth.low": 0, "freeze_depth.high": 40}
    assert sweep_tab.space_from_form(space) == {"freeze_depth": {"low": 0, "high": 40, "log": False}}
    message, _ = sweep_tab.start_from_form(ctx, str(colors_root), fixed, space, 3, "", "tpe", True)
    assert "freeze_depth goes up to 40" in message and "12 blocks" in message
    lr_only = nothing | {"lr.on": True, "lr.low": 1e-4, "lr.high": 1e-2}
    assert "whole number" in sweep_tab.start_from_form(ctx, str(colors_root), fixed, lr_only, 2.5, "", "tpe", True)[0]
    assert "sweep name" in sweep_tab.start_from_form(ctx, str(colors_root), fixed, lr_only, 2, "a b", "tpe", True)[0]
    assert "outside the data root" in sweep_tab.start_from_form(ctx, "/etc", fixed, lr_only, 2, "", "tpe", True)[0]
    assert sweep_tab.show_sweep(ctx, None)["summary"].startswith("No sweep yet")
    assert sweep_tab.show_sweep(ctx, "nope")["summary"].startswith("✗")
    assert sweep_tab.stop_sweep(ctx) == "Nothing is running."
    assert sweep_tab.train_best_from_ui(ctx, None, None) == "Choose a sweep first."


def test_summary_names_the_objective_and_calls_a_best_near_the_baseline_weak(tmp_path):
    """The summary's best value: an accuracy beside its majority-class baseline (weak near it); the
    mAP of a multi-label sweep named as mAP, with no single-label baseline."""
    from vitft_app.runs import RunRecorder

    def study_with_best(name: str, value: float, status: dict) -> optuna.Study:
        run_dir = tmp_path / name
        run_dir.mkdir()
        RunRecorder(run_dir).write_status(**status)
        study = optuna.create_study(study_name=name, direction="maximize")
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs={"run_dir": str(run_dir)}))
        return study

    bees = {"majority_class": "bees", "majority_count": 83, "total": 153, "num_classes": 2}
    weak = study_with_best("weak", 0.55, {"status": "completed", "monitor": "val_accuracy", "val_baseline": bees})
    assert "best val accuracy **55.0% (always 'bees': 54.2%)**" in sweep.study_summary(weak)
    assert "weak" in sweep.study_summary(weak)
    strong = study_with_best("strong", 0.9, {"status": "completed", "monitor": "val_accuracy", "val_baseline": bees})
    assert "90.0% (always 'bees': 54.2%)" in sweep.study_summary(strong) and "weak" not in sweep.study_summary(strong)
    tags = study_with_best("tags", 0.42, {"status": "completed", "monitor": "val_map"})
    assert "best val mAP **0.4200**" in sweep.study_summary(tags) and "accuracy" not in sweep.study_summary(tags)
    assert sweep.sweep_baseline(tags) is None and not sweep.figure_history(tags).layout.shapes


def test_importance_of_trials_that_all_scored_the_same_is_a_plain_reason():
    """fANOVA raises "zero total variance" when every trial has one value; the tab shows why instead."""
    study = optuna.create_study(direction="maximize")
    for lr in (1e-4, 1e-3, 1e-2):
        study.add_trial(optuna.trial.create_trial(
            value=0.5, params={"lr": lr}, distributions={"lr": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)}))
    with pytest.raises(sweep.SweepError, match="all 3 scored 0.5000"):
        sweep.figure_importance(study)
