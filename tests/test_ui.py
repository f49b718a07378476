"""UI logic: the handlers called directly (the browser test covers the wiring)."""

import shutil
import time
from pathlib import Path

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
import pytest

from vitft_app.jobs import JobRunner
from vitft_app.ui import data_tab, predict_tab, train_tab
from vitft_app.ui.app import AppContext, AppSettings, build_app
from vitft_app.plots import figure_accuracy, figure_class_counts, figure_loss


@pytest.fixture
def tiny_vit(tmp_path):
    """The tiny ViT inside the data root: a confined app accepts model folders only there or in
    the runs folder (issue 13)."""
    from conftest import save_tiny_vit

    return save_tiny_vit(tmp_path / "tiny-vit")


@pytest.fixture
def ctx(tmp_path, digits_small):
    settings = AppSettings(data_root=digits_small.parent, runs_dir=tmp_path / "runs",
                           example_dir=tmp_path / "example", device="cpu")
    return AppContext(settings=settings, runner=JobRunner(settings.runs_dir, device="cpu"))


def form(model, **changes):
    values = {"model": str(model), "image_size": 32, "freeze_depth": 0, "epochs": 2.0, "batch_size": 16.0,
              "lr": 3e-3, "weight_decay": 0.01, "warmup_ratio": 0.1, "grad_accum_steps": 1.0, "precision": "fp32",
              "augment": "none", "val_fraction": 0.2, "seed": 42.0, "log_every_steps": 2.0}
    values.update(changes)
    return values


def wait_for(run_dir, states=("completed", "stopped", "failed"), timeout=120):
    from vitft_app.runs import read_status

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = read_status(run_dir)
        if status.get("status") in states:
            return status
        time.sleep(0.2)
    raise AssertionError(f"run did not reach {states}: {read_status(run_dir)}")


def test_app_builds(ctx):
    demo = build_app(ctx.settings)
    assert isinstance(demo, gr.Blocks)


def test_path_box_accepts_only_the_data_root_and_the_example(ctx, tmp_path, digits_small):
    assert data_tab.resolve_data_path(str(digits_small), ctx.settings) == digits_small.resolve()
    assert data_tab.resolve_data_path(digits_small.name, ctx.settings) == digits_small.resolve()  # relative
    (tmp_path / "example").mkdir()
    assert data_tab.resolve_data_path(str(tmp_path / "example"), ctx.settings) == (tmp_path / "example").resolve()
    with pytest.raises(ValueError, match="outside the data root"):
        data_tab.resolve_data_path("/etc", ctx.settings)
    with pytest.raises(ValueError, match="outside the data root"):
        data_tab.resolve_data_path(str(digits_small / ".." / ".."), ctx.settings)
    with pytest.raises(ValueError, match="not found"):
        data_tab.resolve_data_path(str(digits_small / "missing"), ctx.settings)
    with pytest.raises(ValueError, match="Enter a dataset folder"):
        data_tab.resolve_data_path("  ", ctx.settings)


def test_scan_shows_table_chart_samples_and_warnings(ctx, digits_small):
    (digits_small / "7" / "broken.png").write_bytes(b"garbage")
    result = data_tab.scan_folder(str(digits_small), ctx.settings)
    assert result["classes"] == ["0", "1", "7"]
    assert isinstance(result["counts"], pd.DataFrame) and result["counts"]["total"].tolist() == [20, 20, 20]
    assert isinstance(result["figure"], go.Figure)
    assert {caption for _, caption in result["samples"]} == {"0", "1", "7"}
    assert "broken.png" in result["problems"] and "not an image" in result["problems"]
    assert result["suggested_image_size"] == 32


def test_scan_of_a_bad_path_is_a_message_not_an_exception(ctx):
    result = data_tab.scan_folder("/etc", ctx.settings)
    assert result["summary"].startswith("✗") and result["classes"] == []


def test_form_values_become_a_config_by_keyword(tmp_path):
    config = train_tab.config_from_form(form("vit-tiny-scratch", epochs=3.0), tmp_path)
    assert config.epochs == 3 and isinstance(config.epochs, int) and config.image_size == 32
    other = train_tab.config_from_form(form("google/vit-base-patch16-224"), tmp_path)
    assert other.image_size is None  # the size slider only applies to vit-tiny-scratch
    with pytest.raises(ValueError, match="whole number"):
        train_tab.config_from_form(form("m", epochs=2.5), tmp_path)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        train_tab.config_from_form(form("m", batch_size=0), tmp_path)


def test_start_busy_stop_and_live_view(ctx, digits_small, tiny_vit):
    message, run_dir = train_tab.start_run(ctx, form(tiny_vit, epochs=200), str(digits_small))
    assert message.startswith("▶") and run_dir
    busy, second = train_tab.start_run(ctx, form(tiny_vit), str(digits_small))
    assert "Busy" in busy and "already in progress" in busy and second is None
    wait_for(run_dir, states=("running",))
    assert train_tab.initial_run(ctx) == run_dir  # a reopened page shows the running job
    deadline = time.time() + 60
    while time.time() < deadline and "epoch" not in str(train_tab.poll(ctx, run_dir, None)[0]):
        time.sleep(0.2)
    live = dict(zip(train_tab.POLL_KEYS, train_tab.poll(ctx, run_dir, None)))
    # while it trains only Stop is on (a second Start would only answer "Busy")
    assert [live[k]["interactive"] for k in ("start", "stop", "resume")] == [False, True, False]
    assert "Stopping" in train_tab.stop_run(ctx)
    status = wait_for(run_dir)
    assert status["status"] == "stopped"
    assert ctx.runner.current.finished.wait(30)  # RunFinished reached the job (the thread may still run)
    live = dict(zip(train_tab.POLL_KEYS, train_tab.poll(ctx, run_dir, None)))
    text, loss, accuracy, signature = live["status"], live["loss"], live["accuracy"], live["signature"]
    assert "stopped" in text and isinstance(loss, go.Figure) and isinstance(accuracy, go.Figure)
    from vitft_app.checkpoint import has_checkpoint

    assert has_checkpoint(run_dir)  # stopped with its checkpoint: Start and Resume are on, Stop off
    assert [live[k]["interactive"] for k in ("start", "stop", "resume")] == [True, False, True]
    unchanged = train_tab.poll(ctx, run_dir, signature)
    assert all(isinstance(v, type(gr.skip())) for v in unchanged)
    assert ctx.runner.current.wait(30)  # the thread writes the model card after the "stopped" status
    assert train_tab.stop_run(ctx) == "Nothing is running."


def test_start_stop_and_resume_follow_the_shown_run(ctx, tmp_path):
    from vitft_app.run_status import as_run_status

    def states(run_dir, status):
        return [u["interactive"] for u in train_tab.button_states(ctx, run_dir, status)]

    assert states(None, None) == [True, False, False]  # no run yet: only Start
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    assert states(str(run_dir), as_run_status({"status": "completed"})) == [True, False, False]  # no checkpoint
    # trained by another process (vitft train in a terminal): shown, but this app's Stop cannot stop it
    assert states(str(run_dir), as_run_status({"status": "running"})) == [True, False, False]
    (run_dir / "checkpoint.pt").write_bytes(b"x")
    for ended in ("stopped", "failed", "interrupted"):
        assert states(str(run_dir), as_run_status({"status": ended})) == [True, False, True], ended


def test_a_damaged_status_json_is_one_line_in_the_live_view(ctx, tmp_path):
    """A status.json with the wrong types raised in every 1 s poll (an error toast each tick)."""
    run_dir = tmp_path / "runs" / "damaged"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    (run_dir / "status.json").write_text('{"status": 5, "step": "x", "total_steps": "y", "eta_s": "z"}')
    live = dict(zip(train_tab.POLL_KEYS, train_tab.poll(ctx, str(run_dir), None)))
    assert live["status"].startswith("✗ Run `damaged`: its status.json or metrics.csv is damaged")
    assert [live[k]["interactive"] for k in ("start", "stop", "resume")] == [True, False, False]


def test_failure_and_bad_input_show_messages(ctx, digits_small, tmp_path, tiny_vit, monkeypatch):
    from vitft_app import training

    def broken_model(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(training.setup, "build_model", broken_model)  # where the loop builds its model
    message, run_dir = train_tab.start_run(ctx, form(tiny_vit), str(digits_small))
    status = wait_for(run_dir)
    ctx.runner.current.wait(30)
    text = train_tab.status_markdown(status, Path(run_dir).name)
    assert "failed" in text and "simulated failure" in text and "Traceback" not in text
    monkeypatch.undo()
    missing, none = train_tab.start_run(ctx, form(tmp_path / "missing-model"), str(digits_small))
    assert missing.startswith("✗") and "missing-model" in missing and none is None
    fp16, _ = train_tab.start_run(ctx, form("vit-tiny-scratch", precision="fp16"), str(digits_small))
    assert "fp16 needs a CUDA GPU" in fp16
    shutil.rmtree(digits_small / "1")
    shutil.rmtree(digits_small / "7")  # one class left: refused before a run starts
    one, none = train_tab.start_run(ctx, form(tiny_vit), str(digits_small))
    assert one.startswith("✗") and "at least 2" in one and none is None
    bad, none = train_tab.start_run(ctx, form("vit-tiny-scratch", lr=-1), str(digits_small))
    assert bad.startswith("✗") and "lr must be > 0" in bad and none is None
    outside, _ = train_tab.start_run(ctx, form("vit-tiny-scratch"), "/etc")
    assert "outside the data root" in outside


def test_offline_model_shows_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    from vitft_app import modeling

    modeling._hub_config.cache_clear()
    _, text = train_tab.model_info("facebook/deit-tiny-patch16-224", 224, 0, ["a", "b"])
    assert "facebook/deit-tiny-patch16-224" in text and "cannot be reached" in text and "vit-tiny-scratch" in text


def test_parameter_counts_follow_freeze_depth(tiny_vit):
    update, text = train_tab.model_info("vit-tiny-scratch", 32, 12, ["a", "b"])
    assert update["maximum"] == 12 and "linear probe" in text
    update, text = train_tab.model_info(str(tiny_vit), None, 9, ["a", "b"])
    assert update["maximum"] == 2 and update["value"] == 2  # clipped to the model's depth


def test_predict_tab(ctx, digits_small, tiny_vit, tmp_path):
    assert "No trained model" in predict_tab.predict_files(ctx, None, [str(tmp_path / "x.png")], 3)[0]["error"]
    _, run_dir = train_tab.start_run(ctx, form(tiny_vit, epochs=1), str(digits_small))
    wait_for(run_dir)
    ctx.runner.current.wait(30)
    choices = predict_tab.run_choices(ctx)
    assert choices and choices[0][1] == run_dir
    assert predict_tab.refresh_runs(ctx, None)["value"] == run_dir
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    good = sorted((digits_small / "1").iterdir())[0]
    results = predict_tab.predict_files(ctx, run_dir, [str(good), str(bad)], 2)
    assert set(results[0]["scores"]) <= {"0", "1", "7"} and len(results[0]["scores"]) == 2
    assert 0 < sum(results[0]["scores"].values()) <= 1 + 1e-6  # top-2 of a softmax
    assert results[1]["error"] == "bad.png: not an image"

    # Prediction keeps working while another job trains.
    _, busy_run = train_tab.start_run(ctx, form(tiny_vit, epochs=200), str(digits_small))
    wait_for(busy_run, states=("running",))
    during = predict_tab.predict_files(ctx, run_dir, [str(good)], 3)
    assert ctx.runner.is_busy() and len(during[0]["scores"]) == 3
    train_tab.stop_run(ctx)
    wait_for(busy_run)


def test_figures_are_pure_functions_of_the_metrics():
    metrics = pd.DataFrame([
        {"kind": "train", "step": 5, "loss": 2.0},
        {"kind": "eval", "step": 10, "train_loss": 1.8, "train_accuracy": 0.3, "val_loss": 1.9, "val_accuracy": 0.25},
    ])
    loss = figure_loss(metrics)
    assert [list(t.y) for t in loss.data] == [[2.0], [1.9]]
    assert [list(t.y) for t in figure_accuracy(metrics).data] == [[0.3], [0.25]]
    counts = figure_class_counts(pd.DataFrame({"class": ["a"], "train": [3], "val": [1]}))
    assert [list(t.y) for t in counts.data] == [[3], [1]]
    assert figure_loss(pd.DataFrame()).data == ()


def test_accuracy_figure_draws_the_majority_baseline_and_says_when_curves_appear():
    from vitft_app.baseline import Baseline

    metrics = pd.DataFrame([
        {"kind": "train", "step": 5, "loss": 2.0},
        {"kind": "eval", "step": 10, "train_accuracy": 0.6, "val_accuracy": 0.6, "val_loss": 0.7},
    ])
    baseline = Baseline("seven", 9, 15, 2)  # always 'seven': 60.0%
    fig = figure_accuracy(metrics, baseline)
    assert [list(t.y) for t in fig.data] == [[0.6], [0.6]]  # the line is a shape, not a third curve
    lines = [shape for shape in fig.layout.shapes if shape.type == "line"]
    assert len(lines) == 1 and lines[0].y0 == lines[0].y1 == 0.6 and lines[0].line.dash == "dash"
    assert [a.text for a in fig.layout.annotations] == ["always 'seven': 60.0%"]
    # No baseline (a multi-label run, an older run): no line.
    assert not figure_accuracy(metrics).layout.shapes
    # Before the first validation: no curves, a note saying when they come, the baseline already there.
    early = figure_accuracy(metrics[metrics["kind"] == "train"], baseline)
    assert early.data == () and len(early.layout.shapes) == 1
    assert any("after the first epoch" in a.text for a in early.layout.annotations)
    assert not any("after the first epoch" in a.text for a in fig.layout.annotations)
    assert figure_accuracy(pd.DataFrame()).data == ()
    # One x axis for both plots, step 0 to the last step, so the one val point sits under the loss curve.
    assert tuple(fig.layout.xaxis.range) == tuple(figure_loss(metrics).layout.xaxis.range) == (0, 10 * 1.03)


def test_threshold_tta_and_batch_prediction(ctx, digits_small, tiny_vit, tmp_path):
    import zipfile

    import torch

    from vitft_app.predict import load_pixels

    good = str(sorted((digits_small / "1").iterdir())[0])
    sure = predict_tab.predict_files(ctx, str(tiny_vit), [good], 2, threshold=0.0)[0]
    assert sure["answer"] == max(sure["scores"], key=sure["scores"].get)
    unsure = predict_tab.predict_files(ctx, str(tiny_vit), [good], 2, threshold=0.999)[0]
    assert unsure["answer"] == "not sure"

    predictor = ctx.predictor(str(tiny_vit))
    pixels = load_pixels([good], predictor.transform)
    expected = (predictor.logits(pixels).softmax(-1) + predictor.logits(pixels.flip(-1)).softmax(-1)) / 2
    assert torch.allclose(predictor.predict_proba([good], tta=True), expected, atol=1e-6)

    (digits_small / "1" / "broken.png").write_bytes(b"nope")
    table, csv_path, message = predict_tab.predict_batch(ctx, str(tiny_vit), str(digits_small), None, 3, 0.0, False)
    assert message.startswith("✓") and len(table) == 61
    assert table.loc[table["file"] == "1/broken.png", "error"].item() == "not an image"
    assert Path(csv_path).read_text().splitlines()[0] == "file,top1,score,answer,top_k,error"
    archive = tmp_path / "imgs.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.write(good, "imgs/a.png")
    table, _, message = predict_tab.predict_batch(ctx, str(tiny_vit), None, str(archive), 3, 0.0, False)
    assert table["file"].tolist() == ["a.png"] and table["top1"].notna().all()
    _, _, outside = predict_tab.predict_batch(ctx, str(tiny_vit), "/etc", None, 3, 0.0, False)
    assert "outside the data root" in outside


# ---- the recipe in the Train tab ------------------------------------------------------------------


def test_preset_buttons_fill_the_form_by_field_name(tiny_vit):
    fields = ["freeze_depth", "augment", "mixup", "layer_decay", "ema_decay", "seed"]
    values, text = train_tab.preset_updates("best", str(tiny_vit), None, fields)
    by_name = dict(zip(fields, values))
    assert by_name["augment"] == "randaugment" and by_name["mixup"] == 0.8
    assert by_name["layer_decay"] == 0.75 and by_name["ema_decay"] == 0.999
    assert by_name["freeze_depth"] == 0  # a quarter of the tiny model's 2 blocks
    assert isinstance(by_name["seed"], type(gr.skip()))  # a preset leaves the seed alone
    assert "Preset **best**" in text
    values, text = train_tab.preset_updates("quick", "vit-tiny-scratch", 32, ["freeze_depth"])
    assert values == [12] and "smoke test" in text
    values, text = train_tab.preset_updates("best", "/no/such/model", None, ["augment"])
    assert text.startswith("✗")


def test_every_config_field_but_the_paths_is_in_the_form():
    """The form covers the whole recipe: a new TrainConfig field must get a control."""
    import dataclasses
    import inspect

    from vitft_app.config import TrainConfig

    source = inspect.getsource(train_tab.build)
    missing = [f.name for f in dataclasses.fields(TrainConfig)
               if f.name not in ("data_dir", "output_dir", "run_name") and f'"{f.name}":' not in source]
    assert missing == []


def test_augmentation_preview_shows_the_settings(ctx, digits_small):
    values = form("vit-tiny-scratch", augment="randaugment", mixup=0.8, cutmix=0.0, patch_mask_ratio=0.5)
    gallery, text = train_tab.augmentation_preview(values, str(digits_small), ctx.settings)
    assert len(gallery) == 12 and "3 training images" in text  # 4 versions of one image per class
    image = gallery[0][0]
    assert image.size == (32, 32)
    assert "mixed 2 images" in gallery[0][1]
    gallery, text = train_tab.augmentation_preview(values, "/etc", ctx.settings)
    assert gallery == [] and text.startswith("✗")


def test_resume_button_continues_a_stopped_run(ctx, digits_small, tiny_vit):
    from vitft_app.runs import read_metrics, read_status

    text, run_dir = train_tab.start_run(ctx, form(tiny_vit, epochs=30.0), str(digits_small))
    assert run_dir, text
    deadline = time.time() + 60
    while read_metrics(run_dir).query("kind == 'eval'").empty and time.time() < deadline:
        time.sleep(0.2)
    train_tab.stop_run(ctx)
    wait_for(run_dir, states=("stopped",))
    assert ctx.runner.current.wait(30)
    # Stop's "Stopping…" is cleared by a poll that finds the run ended; other messages are not.
    stopping = train_tab.STOPPING + " after the current step…"
    assert train_tab.poll_live(ctx, run_dir, None, stopping)[-1] == ""
    # ... also when an earlier poll (sent before Stop's message reached the page) already took the
    # redraw that shows "stopped": nothing changed in the folder since, and the message still clears.
    redrawn = train_tab.poll(ctx, run_dir, None)[-1]
    assert isinstance(redrawn, tuple)
    values = train_tab.poll_live(ctx, run_dir, redrawn, stopping)
    assert values[0] == gr.skip() and values[-1] == ""
    assert train_tab.poll_live(ctx, run_dir, None, "✗ some refusal")[-1] != ""
    # The Resume button's message survives the next poll, though the folder still says "stopped"
    # until the resumed thread writes.
    outputs = dict(zip(train_tab.BUTTON_KEYS, train_tab.button_outputs(*train_tab.resume_run(ctx, run_dir))))
    message, state, signature = outputs["message"], outputs["run"], outputs["signature"]
    assert state == run_dir and "Resumed" in message, message
    # at once, before the first poll: "starting", and only Stop on
    assert "starting" in outputs["status"] and outputs["stop"]["interactive"] and not outputs["start"]["interactive"]
    assert train_tab.poll_live(ctx, run_dir, signature, message)[-1] != ""
    assert train_tab.resume_run(ctx, run_dir)[0].startswith("⚠ Busy")
    train_tab.stop_run(ctx)
    assert ctx.runner.current.wait(60)
    status = read_status(run_dir)
    assert status["status"] == "stopped" and status.get("resumed_from_step") is not None
    assert train_tab.poll_live(ctx, run_dir, None, message)[-1] == ""  # the run ended: "Resumed run" is cleared
    # A refused Resume on an ended run keeps the page's run and signature, and its message stays.
    message, state, signature, *rest = train_tab.button_outputs(*train_tab.resume_run(ctx, str(digits_small)))
    assert message.startswith("✗") and "not a run folder" in message
    assert state == gr.skip() and signature == gr.skip() and all(v == gr.skip() for v in rest)
    assert train_tab.poll_live(ctx, run_dir, None, message)[-1] != ""
    steps = read_metrics(run_dir).query("kind == 'train'")["step"].tolist()
    assert steps == sorted(set(steps))


def test_status_line_counts_down_early_stopping():
    status = {"status": "running", "epoch": 3.0, "epochs": 10, "step": 30, "total_steps": 100,
              "early_stopping_patience": 3, "epochs_without_improvement": 1, "best_val_accuracy": 0.5}
    assert "early stopping after 2 more epoch(s)" in train_tab.status_markdown(status, "r")
    done = {**status, "status": "completed", "reason": "early stopping at epoch 7: no val_accuracy improvement"}
    assert "early stopping at epoch 7" in train_tab.status_markdown(done, "r")


def test_imbalance_warning_offers_balanced_class_weights(ctx, digits_small):
    for path in sorted((digits_small / "7").iterdir())[4:]:
        path.unlink()
    result = data_tab.scan_folder(str(digits_small), ctx.settings)
    assert result["balance_button"]["visible"] is True


def test_balanced_dataset_hides_the_class_weights_button(ctx, digits_small):
    assert data_tab.scan_folder(str(digits_small), ctx.settings)["balance_button"]["visible"] is False


def test_predict_offers_onnx_backends_only_once_exported(tmp_path):
    """Picking "onnx" before any export wiped the shown prediction for "No ONNX export of this
    model yet"; the choice now appears with the export (as onnx int8 already did)."""
    from vitft_app.ui import int8_panel

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    assert [value for _, value in int8_panel.backend_choices(str(run))] == ["torch"]
    (run / "onnx").mkdir()
    (run / "onnx" / "model.onnx").write_bytes(b"onnx")
    assert [value for _, value in int8_panel.backend_choices(str(run))] == ["torch", "onnx"]
    assert int8_panel.update_backend(str(tmp_path / "other"), "onnx")["value"] == "torch"


def test_the_buttons_follow_the_job_even_when_the_run_folder_no_longer_changes(tmp_path):
    """RunFinished is recorded in status.json before it reaches the job: a poll in between saw the
    run still trained here (Start off, Stop on), and later polls skipped the unchanged folder, so
    the buttons stayed that way after the run had stopped."""
    import threading
    from types import SimpleNamespace

    run_dir = tmp_path / "r1"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    (run_dir / "status.json").write_text('{"status": "stopped", "step": 3}')
    job = SimpleNamespace(run_dir=run_dir, running=True, finished=threading.Event())
    ctx = SimpleNamespace(runner=SimpleNamespace(current=job))
    first = dict(zip(train_tab.POLL_KEYS, train_tab.poll(ctx, str(run_dir), None)))
    assert [first[k]["interactive"] for k in ("start", "stop")] == [False, True]  # resumed, not yet written
    job.finished.set()
    later = dict(zip(train_tab.POLL_KEYS, train_tab.poll(ctx, str(run_dir), first["signature"])))
    assert [later[k]["interactive"] for k in ("start", "stop")] == [True, False]  # redrawn, though no file changed
