"""Evaluation: metrics against scikit-learn on hand-made predictions, cell selection, the CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from vitft_app.evaluate import Evaluation, compute_metrics, evaluate_run, expected_calibration_error

CLASSES = ["ant", "bee", "cat"]
Y_TRUE = np.array([0, 0, 1, 1, 2, 2, 2, 0])
PROBS = np.array([
    [0.8, 0.1, 0.1],
    [0.3, 0.6, 0.1],  # ant -> bee, confident mistake
    [0.2, 0.7, 0.1],
    [0.1, 0.5, 0.4],
    [0.1, 0.2, 0.7],
    [0.5, 0.1, 0.4],  # cat -> ant
    [0.05, 0.05, 0.9],
    [0.4, 0.35, 0.25],
], dtype=np.float32)


def test_metrics_match_scikit_learn():
    m = compute_metrics(Y_TRUE, PROBS, CLASSES, top_k=2)
    y_pred = PROBS.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(Y_TRUE, y_pred)) == pytest.approx(6 / 8)
    assert m["top_k"] == 2 and m["top_k_accuracy"] == pytest.approx(skm.top_k_accuracy_score(Y_TRUE, PROBS, k=2))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(Y_TRUE, y_pred, average="macro"))
    assert m["weighted_recall"] == pytest.approx(skm.recall_score(Y_TRUE, y_pred, average="weighted"))
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 2]]
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(Y_TRUE, PROBS, multi_class="ovr"))
    assert [c["support"] for c in m["per_class"]] == [3, 2, 3]
    assert m["per_class"][1]["precision"] == pytest.approx(2 / 3)


def test_binary_roc_auc_uses_the_positive_class():
    y = np.array([0, 1, 1, 0])
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert compute_metrics(y, p, ["no", "yes"])["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p[:, 1]))


def test_roc_and_pr_legends_list_every_class_under_the_plot():
    """Beside a 360-pixel plot the legend of ten digits was cut after '8'; under it, in rows, with
    the figure growing by a row per two classes, every class is listed."""
    from vitft_app.plots import figure_precision_recall, figure_roc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 300)
    p = rng.dirichlet(np.ones(10), 300)
    names = [str(i) for i in range(10)]
    for fig, entries in ((figure_roc(y, p, names), 11), (figure_precision_recall(y, p, names), 10)):
        assert len(fig.data) == entries and [t.name.split(" ")[0] for t in fig.data][:10] == names
        assert fig.layout.legend.orientation == "h" and fig.layout.legend.y < 0
        assert fig.layout.height == 360 + 20 * -(-entries // 2)


def test_expected_calibration_error_by_hand():
    # Two bins used: confidence 0.95 (both right) and 0.55 (one of two right).
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    ece, bins = expected_calibration_error(y, p, bins=10)
    assert ece == pytest.approx(0.5 * abs(1.0 - 0.95) + 0.5 * abs(0.5 - 0.55))
    assert sum(b["count"] for b in bins) == 4


def test_confusion_cell_and_top_losses_select_the_right_images():
    paths = [f"img{i}.png" for i in range(len(Y_TRUE))]
    ev = Evaluation("val", CLASSES, paths, Y_TRUE, PROBS, compute_metrics(Y_TRUE, PROBS, CLASSES))
    assert ev.cell_images(0, 1)["path"].tolist() == ["img1.png"]
    assert ev.cell_images(2, 2)["path"].tolist() == ["img6.png", "img4.png"]  # most confident first
    assert ev.top_losses()["path"].tolist() == ["img1.png", "img5.png"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, digits_root, tiny_vit):
    from vitft_app.config import TrainConfig
    from vitft_app.runs import RunRecorder, RunStore
    from vitft_app.training import train

    tmp = tmp_path_factory.mktemp("eval")
    data = tmp / "digits"
    for digit in ("0", "1", "7"):
        shutil.copytree(digits_root / digit, data / digit)
        (data / "test" / digit).mkdir(parents=True)
        for path in sorted((data / digit).iterdir())[-10:]:
            shutil.move(path, data / "test" / digit / path.name)  # held out, never trained on
    config = TrainConfig(data_dir=str(data), model=str(tiny_vit), epochs=4, batch_size=32, lr=3e-3,
                         augment="none", precision="fp32", output_dir=str(tmp / "runs"))
    run_dir = RunStore(config.output_dir).create_run(config)
    train(config, run_dir, RunRecorder(run_dir), device="cpu")
    return run_dir


def test_evaluate_run_writes_metrics_and_figures(finished_run):
    calls = []
    result = evaluate_run(finished_run, split="val", device="cpu", progress=lambda *call: calls.append(call))
    out = finished_run / "eval" / "val"
    saved = json.loads((out / "metrics.json").read_text())
    assert {"accuracy", "macro_f1", "per_class", "confusion_matrix", "roc_auc", "ece"} <= set(saved)
    assert saved["accuracy"] == pytest.approx(result.metrics["accuracy"])
    status = json.loads((finished_run / "status.json").read_text())
    assert saved["accuracy"] == pytest.approx(status["best_val_accuracy"])  # same split, same model
    assert (out / "confusion_matrix.html").exists() and (out / "plotly.min.js").exists()
    assert len((out / "predictions.csv").read_text().splitlines()) == saved["num_images"] + 1
    # the tab's progress bar: each stage ends at its total, in order; every validation image predicted
    last = {stage: (done, total) for stage, done, total in calls}
    assert list(last) == ["Checking images", "Predicting", "Writing figures"]
    assert all(done == total for done, total in last.values())
    assert last["Predicting"][1] == saved["num_images"] and last["Writing figures"][1] == 5


def test_a_run_is_evaluated_in_the_precision_it_validated_in(tmp_path, digits_small, tiny_vit):
    """An "auto" run validates in bf16 autocast on a CPU with native bf16; Evaluate ran fp32 and
    showed 96.8% beside the Train tab's 96.6% for one model. Both now use the run's precision."""
    from vitft_app.config import TrainConfig
    from vitft_app.runs import RunRecorder, RunStore
    from vitft_app.training import train

    config = TrainConfig(data_dir=str(digits_small), model=str(tiny_vit), epochs=1, batch_size=8, augment="none",
                         precision="auto", output_dir=str(tmp_path / "runs"))
    run_dir = RunStore(config.output_dir).create_run(config)
    train(config, run_dir, RunRecorder(run_dir), device="cpu")
    status = json.loads((run_dir / "status.json").read_text())
    metrics = evaluate_run(run_dir, split="val", device="cpu").metrics
    assert metrics["precision"] == status["precision"]  # bf16 here; fp32 on a CPU without native bf16
    assert metrics["accuracy"] == pytest.approx(status["best_val_accuracy"])


def test_test_split_is_evaluated_apart(finished_run):
    result = evaluate_run(finished_run, split="test", device="cpu")
    assert result.metrics["num_images"] == 30
    assert all("/test/" in p for p in result.paths)


def test_cli_evaluate(finished_run, tmp_path, vitft_here):
    done = subprocess.run([sys.executable, "-m", "vitft_app.cli", "evaluate", str(finished_run), "--split", "test"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "accuracy" in done.stdout and Path(done.stdout.strip().splitlines()[-1]) == finished_run / "eval" / "test"
    missing = vitft_here("evaluate", str(tmp_path), cwd=tmp_path)  # the refusal in this process (no ~7 s of imports)
    assert missing.returncode == 2 and "--data" in missing.stderr and "Traceback" not in missing.stderr


def test_test_folder_is_never_a_training_class(finished_run):
    from vitft_app.data import scan_dataset
    from vitft_app.config import TrainConfig

    data = TrainConfig.from_json_file(finished_run / "config.json").data_dir
    report = scan_dataset(data)
    assert report.classes == ["0", "1", "7"]
    assert not any("/test/" in i.path for i in report.train + report.val)
    model_config = json.loads((finished_run / "model" / "config.json").read_text())
    assert sorted(model_config["id2label"].values()) == ["0", "1", "7"]


def test_the_split_radio_offers_test_only_when_the_dataset_has_a_test_folder(finished_run, tmp_path):
    from vitft_app.ui import evaluate_tab

    assert evaluate_tab.split_choices(str(finished_run))["choices"] == ["val", "test"]  # its data has test/
    no_test = tmp_path / "run-without-test"
    no_test.mkdir()
    (no_test / "config.json").write_text(json.dumps({"data_dir": str(tmp_path)}))
    update = evaluate_tab.split_choices(str(no_test))
    assert update["choices"] == ["val"] and update["value"] == "val" and "no test/ folder" in update["info"]
    assert evaluate_tab.split_choices(None)["info"] == evaluate_tab.TEST_SPLIT_INFO  # no run chosen: no claim
    (no_test / "config.json").write_text(json.dumps({"data_dir": str(tmp_path / "gone")}))
    assert "not there any more" in evaluate_tab.split_choices(str(no_test))["info"]


def test_evaluate_tab_handlers(finished_run, tmp_path):
    import plotly.graph_objects as go

    from vitft_app.jobs import JobRunner
    from vitft_app.ui import evaluate_tab
    from vitft_app.ui.app import AppContext, AppSettings

    settings = AppSettings(data_root=tmp_path, runs_dir=finished_run.parent, example_dir=tmp_path, device="cpu")
    ctx = AppContext(settings=settings, runner=JobRunner(settings.runs_dir, device="cpu"))
    assert evaluate_tab.run_evaluation(ctx, None, "val", 5)["summary"].startswith("Choose a run")
    assert evaluate_tab.run_evaluation(ctx, str(tmp_path), "test", 5)["summary"].startswith("✗")
    result = evaluate_tab.run_evaluation(ctx, str(finished_run), "test", 5)
    assert "accuracy" in result["summary"] and isinstance(result["matrix"], go.Figure)
    assert list(result["matrix_table"].columns) == ["true \\ predicted", "0", "1", "7"]
    evaluation = result["evaluation"]
    row, column = 2, 3  # true "7", predicted "7"
    items, caption = evaluate_tab.cell_gallery(evaluation, row, column)
    expected = evaluation.cell_images(2, 2)
    assert len(items) == len(expected) == result["matrix_table"].iloc[2, 3]
    assert "true **7**, predicted **7**" in caption
    assert evaluate_tab.cell_gallery(evaluation, 0, 0)[0] == []  # the label column
