"""Honest numbers: the majority-class baseline, computed from the split, and live progress."""


import pytest

from vitft_app import training
from vitft_app.baseline import (
    Baseline, accuracy_with_baseline, format_accuracy, headline, majority_baseline, run_baseline,
    weak_model_warning,
)
from vitft_app.config import TrainConfig
from vitft_app.data import scan_dataset
from vitft_app.events import RunStarted, StepLogged, StepProgress
from vitft_app.runs import RunRecorder, RunStore, read_metrics, read_status


def test_majority_rate_of_a_split():
    # hymenoptera's validation split: 70 ants, 83 bees.
    baseline = majority_baseline([0] * 70 + [1] * 83, ["ants", "bees"])
    assert baseline == Baseline("bees", 83, 153, 2)
    assert baseline.rate == pytest.approx(83 / 153) and baseline.chance == 0.5
    assert headline(131, 153, baseline) == (
        "131 of 153 validation images right (85.6%); always guessing 'bees' gets 54.2%")
    assert accuracy_with_baseline(0.5556, baseline) == "55.6% (always 'bees': 54.2%)"
    warning = weak_model_warning(0.5556, baseline)
    assert "about what always answering 'bees' gives" in warning and "pretrained" in warning
    assert weak_model_warning(131 / 153, baseline) is None
    assert "worse than" in weak_model_warning(0.40, baseline)
    # ties go to the first class in class order; empty splits have no baseline
    assert majority_baseline([1, 0], ["a", "b"]).majority_class == "a"
    assert majority_baseline([], ["a"]) is None
    assert format_accuracy(None) == "–" and format_accuracy(0.8559) == "85.6%"
    assert run_baseline({"val_baseline": baseline.to_dict()}) == baseline
    assert run_baseline({}) is None and run_baseline({"val_baseline": {"total": "x"}}) is None


def test_log_interval_gives_a_curve_in_the_first_epoch():
    assert training.log_interval(10, 8) == 2  # hymenoptera at batch 32: 8 steps per epoch
    assert training.log_interval(10, 400) == 10
    assert training.log_interval(10, 2) == 1
    assert training.log_interval(3, 100) == 3


def test_run_records_the_validation_baseline_and_progress_every_step(tmp_path, digits_small, tiny_vit, monkeypatch):
    # Make the 7s the majority: 20 images of 7, 8 of 0, 8 of 1; automatic stratified split.
    for name in ("0", "1"):
        for path in sorted((digits_small / name).iterdir())[8:]:
            path.unlink()
    config = TrainConfig(data_dir=str(digits_small), model=str(tiny_vit), epochs=2, batch_size=4, augment="none",
                         precision="fp32", log_every_steps=50, output_dir=str(tmp_path / "runs"))
    run_dir = RunStore(config.output_dir).create_run(config)
    events, recorder = [], RunRecorder(run_dir)

    def emit(event):
        events.append(event)
        recorder(event)

    # an engine option (no module-level switch): a StepProgress every optimizer step
    result = training.train(config, run_dir, emit, device="cpu", options=training.EngineOptions(progress_interval_s=0.0))
    report = scan_dataset(digits_small, val_fraction=config.val_fraction, seed=config.seed)
    val_labels = [item.label for item in report.val]
    expected = max(val_labels.count(i) for i in range(3)) / len(val_labels)
    baseline = run_baseline(read_status(run_dir))
    assert baseline is not None and baseline.majority_class == "7"
    assert baseline.rate == pytest.approx(expected) and baseline.total == len(report.val)
    started = next(e for e in events if isinstance(e, RunStarted))
    assert started.val_baseline == baseline.to_dict()
    progress = [e.step for e in events if isinstance(e, StepProgress)]
    assert progress == list(range(1, result.steps + 1))  # every step, independent of log_every_steps
    assert all(e.images_per_sec > 0 for e in events if isinstance(e, StepProgress))
    logged = [e.step for e in events if isinstance(e, StepLogged)]
    assert logged[0] == 1  # the loss plot has a point from the first step
    steps_per_epoch = result.steps // 2
    assert len([s for s in logged if s <= steps_per_epoch]) >= 4  # a curve in the first epoch
    assert read_metrics(run_dir).query("kind == 'train'")["step"].tolist() == logged


def test_a_resumed_run_shows_its_checkpoint_step_at_once(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recorder = RunRecorder(run_dir)
    recorder(RunStarted(run_id="run", run_dir=str(run_dir), classes=["a", "b"], num_train=8, num_val=2, epochs=3,
                        total_steps=24, device="cpu", precision="fp32", trainable_params=1, total_params=1,
                        resumed_from_step=14))
    status = read_status(run_dir)
    assert status["step"] == 14 and status["epoch"] == pytest.approx(1.75)
    recorder(StepProgress(step=15, epoch=1.875, images_per_sec=12.5, eta_s=9.0))
    status = read_status(run_dir)
    assert (status["step"], status["images_per_sec"], status["eta_s"]) == (15, 12.5, 9.0)


def test_evaluation_opens_with_the_plain_headline():
    import numpy as np

    from vitft_app.evaluate import compute_metrics, evaluation_headline, summary_text

    y_true = np.array([0] * 70 + [1] * 83)  # hymenoptera's validation split
    probs = np.tile([0.3, 0.7], (153, 1))
    probs[:48] = [0.8, 0.2]  # 48 ants right, 22 ants wrong, 83 bees right: 131 of 153
    metrics = {**compute_metrics(y_true, probs, ["ants", "bees"]), "split": "val"}
    assert metrics["correct"] == 131 and metrics["baseline"]["majority_count"] == 83
    assert evaluation_headline(metrics) == "131 of 153 validation images right (85.6%); always guessing 'bees' gets 54.2%"
    assert summary_text(metrics).splitlines()[0] == evaluation_headline(metrics)
    weak = {**compute_metrics(y_true, np.tile([0.4, 0.6], (153, 1)), ["ants", "bees"]), "split": "test"}
    assert evaluation_headline(weak).startswith("83 of 153 test images right (54.2%)")
    assert "about what always answering 'bees' gives" in evaluation_headline(weak)
