"""The first ten minutes: the chosen dataset survives a reload, honest numbers, plain screens."""

import json
from pathlib import Path

import gradio as gr

from vitft_app.app_state import APP_SETTINGS_FILE, dataset_markdown, default_augment, read_app_settings
from vitft_app.baseline import Baseline
from vitft_app.config import TrainConfig
from vitft_app.data import scan_dataset
from vitft_app.jobs import JobRunner
from vitft_app.runs import RunRecorder, RunStore
from vitft_app.events import EvalDone, RunFinished, RunStarted
from vitft_app.ui import data_tab, evaluate_tab, predict_tab, runs_tab, train_tab
from vitft_app.ui.app import AppContext, AppSettings

UI = Path(__file__).resolve().parents[1] / "vitft_app" / "ui"


def make_ctx(root: Path, runs: Path) -> AppContext:
    """A fresh app context over the same runs folder: what a page reload or an app restart sees."""
    example = root / "example"
    example.mkdir(exist_ok=True)
    settings = AppSettings(data_root=root, runs_dir=runs, example_dir=example, device="cpu")
    return AppContext(settings=settings, runner=JobRunner(runs, device="cpu"))


def test_the_chosen_dataset_survives_a_reload_and_a_restart(tmp_path, digits_small):
    runs = tmp_path / "runs"
    ctx = make_ctx(digits_small.parent, runs)
    assert data_tab.saved_dataset_path(ctx) == str(ctx.settings.example_dir)  # first visit: the example
    outputs = dict(zip(data_tab.OUTPUT_KEYS, data_tab.scan_folder_outputs_fn(ctx)(str(digits_small))))
    chosen = outputs["dataset"]
    assert chosen["path"] == str(digits_small) and chosen["classes"] == ["0", "1", "7"]
    assert (chosen["num_train"], chosen["num_val"]) == (48, 12)
    assert read_app_settings(runs)["dataset"] == chosen  # server-side, in the runs folder
    assert json.loads((runs / APP_SETTINGS_FILE).read_text())["dataset"]["name"] == "digits3"
    line = dataset_markdown(chosen)
    assert "digits3" in line and "3 classes" in line and "48 train / 12 val images" in line and "0 warning" in line

    # A failed scan (a typo) keeps the chosen dataset.
    failed = dict(zip(data_tab.OUTPUT_KEYS, data_tab.scan_folder_outputs_fn(ctx)(str(digits_small / "nope"))))
    assert isinstance(failed["dataset"], type(gr.skip())) and read_app_settings(runs)["dataset"] == chosen

    # Reload / restart: a new page (a new context) shows the same dataset, scanned.
    reloaded = make_ctx(digits_small.parent, runs)
    path, *values = data_tab.load_outputs_fn(reloaded)()
    assert path == str(digits_small)
    assert dict(zip(data_tab.OUTPUT_KEYS, values))["dataset"] == chosen

    # A dataset that disappeared falls back to the example, without an error.
    for item in sorted(digits_small.rglob("*"), reverse=True):
        item.unlink() if item.is_file() else item.rmdir()
    digits_small.rmdir()
    assert data_tab.saved_dataset_path(make_ctx(tmp_path, runs)) == str(tmp_path / "example")


def test_augmentation_default_follows_the_data(digits_small, colors_root):
    augment, reason = default_augment(scan_dataset(digits_small))
    assert augment == "none" and "grayscale" in reason  # digits: no flips
    assert default_augment(scan_dataset(colors_root))[0] == "basic"  # colour images: crop and flip
    summary = train_tab.augment_summary("none", {"augment": "none", "augment_reason": reason})
    assert "only resized" in summary and "Suggested for this dataset: **none**" in summary


def test_preset_summaries(tiny_vit):
    fields = ["freeze_depth", "augment", "epochs"]
    values, note = train_tab.preset_updates("quick", str(tiny_vit), None, fields)
    depth = values[0]
    assert depth == 2 and values[1] == "none"
    # The parameter summary the preset's follow-up event shows: the head only.
    slider, text = train_tab.model_info(str(tiny_vit), None, depth, ["a", "b"])
    assert "linear probe" in text and not text.startswith("**23,970 / 23,970")
    assert "only resized" in train_tab.augment_summary(values[1])
    values, _ = train_tab.preset_updates("balanced", str(tiny_vit), None, fields)
    _, text = train_tab.model_info(str(tiny_vit), None, values[0], ["a", "b"])
    assert "(100.0%)" not in text  # half the blocks frozen
    assert "random resized crop" in train_tab.augment_summary(values[1])


def fake_run(store: RunStore, accuracy: float, status: str = "completed", pid_alive: bool = True) -> Path:
    """A run folder written through the real recorder: 83 of 153 validation images are bees."""
    run_dir = store.create_run(TrainConfig(data_dir="/data/hymenoptera"))
    recorder = RunRecorder(run_dir)
    recorder(RunStarted(run_id=run_dir.name, run_dir=str(run_dir), classes=["ants", "bees"], num_train=244,
                        num_val=153, epochs=3, total_steps=24, device="cpu", precision="fp32",
                        trainable_params=10, total_params=10, notes=["attention: sdpa"],
                        val_baseline=Baseline("bees", 83, 153, 2).to_dict()))
    recorder(EvalDone(step=8, epoch=1, train_loss=0.7, train_accuracy=0.5, val_loss=0.69, val_accuracy=accuracy,
                      best_val_accuracy=accuracy, is_best=True))
    if status == "interrupted":
        recorder.write_status(pid=2**22 + 12345)  # a process that does not exist: the app restarted
    else:
        recorder(RunFinished(status=status, best_val_accuracy=accuracy, duration_s=30.0, step=14))
    return run_dir


def test_every_accuracy_comes_with_its_baseline(tmp_path, tiny_vit):
    import shutil

    from vitft_app.report import write_model_card
    from vitft_app.runs import read_status

    ctx = make_ctx(tmp_path, tmp_path / "runs")
    weak = fake_run(ctx.runner.store, 0.5556)
    status = train_tab.status_markdown(read_status(weak), weak.name)
    assert "best val accuracy 55.6% (always 'bees': 54.2%)" in status
    assert "about what always answering 'bees' gives" in status and "pretrained" in status
    assert "cpu" not in status  # device notes are folded away ...
    assert "attention: sdpa" in train_tab.status_details(read_status(weak))  # ... into the run details
    table = runs_tab.table_view(ctx)
    row = table[table["run_id"] == weak.name].iloc[0]
    assert row["best_val_accuracy"] == "55.6% (weak)" and row["val_baseline"] == "54.2% ('bees')"
    assert predict_tab.model_warning(str(weak)).startswith("Weak model: 55.6%")
    shutil.copytree(tiny_vit, weak / "model")
    label = next(text for text, path in predict_tab.run_choices(ctx) if path == str(weak))
    assert "val accuracy 55.6% (always 'bees': 54.2%)" in label  # the dropdowns of Evaluate and Predict
    card = write_model_card(weak).read_text()
    assert "Validation accuracy 55.6% (always 'bees': 54.2%); chance (1/2) is 50.0%" in card
    assert "Weak model" in card
    good = fake_run(ctx.runner.store, 131 / 153)
    assert predict_tab.model_warning(str(good)) is None
    assert "Weak" not in train_tab.status_markdown(read_status(good), good.name)


def test_stop_and_restart_status(tmp_path, tiny_vit):
    import shutil

    ctx = make_ctx(tmp_path, tmp_path / "runs")
    stopped = fake_run(ctx.runner.store, 0.9, status="stopped")
    from vitft_app.runs import read_status

    text = train_tab.status_markdown(read_status(stopped), stopped.name)
    assert "stopped** after step 14 of 24, epoch 1.00 of 3" in text and "Resume** continues from step 14" in text
    # After an app restart the newest run is the interrupted one, shown with its Resume, not "No run yet".
    interrupted = fake_run(ctx.runner.store, 0.9, status="interrupted")
    shutil.copytree(tiny_vit, interrupted / "model")
    restarted = make_ctx(tmp_path, tmp_path / "runs")
    live = dict(zip(train_tab.POLL_KEYS, train_tab.poll(restarted, None, None)))
    assert "interrupted** at step 8 of 24" in live["status"] and "**Resume** continues it" in live["status"]
    assert interrupted.name in live["status"] and "No run yet" not in live["status"]
    assert live["after_run"]["visible"] is True and "8 / 24 steps" in live["progress"]
    assert "**Resume**" in live["banner"] and interrupted.name in live["banner"]


def test_evaluate_error_clears_stale_results(tmp_path):
    ctx = make_ctx(tmp_path, tmp_path / "runs")
    result = evaluate_tab.run_evaluation(ctx, str(tmp_path / "missing"), "val", 5)
    assert result["summary"].startswith("✗")
    assert result["cell_images"] == [] and result["cell_caption"] == ""
    assert result["results"]["visible"] is False and result["per_class"] is None


def test_status_marks_render_without_an_emoji_font():
    """Debian's chromium has no colour-emoji font: every mark must be a plain symbol the DejaVu
    fonts have (an emoji such as U+2705 or U+1F7E2 rendered as an empty box in screenshots)."""
    allowed = set("·–—•…→←↑↓↻■▶○●⚖⚠✏✓✗×≥≤²")
    for path in sorted(UI.glob("*.py")) + [UI.parent / "baseline.py", UI.parent / "app_state.py"]:
        odd = {ch for ch in path.read_text(encoding="utf-8") if ord(ch) > 127 and ch not in allowed}
        assert not odd, f"{path.name}: {sorted(odd)}"
    assert set(train_tab.STATUS_MARKS.values()) <= allowed


def test_train_again_uses_the_runs_settings_and_dataset(tmp_path):
    ctx = make_ctx(tmp_path, tmp_path / "runs")
    run_dir = ctx.runner.store.create_run(TrainConfig(data_dir="/data/hymenoptera", epochs=7, augment="none"))
    values, data_dir, message = train_tab.train_again(str(run_dir), ["epochs", "augment", "lr"])
    assert values[:2] == [7, "none"] and data_dir == "/data/hymenoptera" and "Start" in message


def test_cli_summary_shows_the_baseline(capsys):
    from vitft_app.cli import progress_listener

    listener = progress_listener({"bar": None})
    listener(RunStarted(run_id="r", run_dir="r", classes=["ants", "bees"], num_train=244, num_val=153, epochs=3,
                        total_steps=24, device="cpu", precision="fp32", trainable_params=1, total_params=1,
                        val_baseline=Baseline("bees", 83, 153, 2).to_dict()))
    listener(RunFinished(status="completed", best_val_accuracy=0.5556, duration_s=3.0, step=24))
    err = capsys.readouterr().err
    assert "best val accuracy 55.6% (always 'bees': 54.2%)" in err
    assert "about what always answering 'bees' gives" in err
