"""Label issues: cleanlab wiring on crafted features, outliers, and the real run -> CSV path (CLI)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vitft_app.label_issues import (
    FILTERS, LabelIssuesError, cross_validated_probs, find_outliers, find_run_label_issues, rank_label_issues,
)


def _clusters(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """3 well-separated Gaussian clusters of 30 points in 8 dimensions; labels = cluster."""
    rng = np.random.default_rng(seed)
    centers = np.eye(3, 8) * 10
    features = np.concatenate([c + rng.normal(0, 1, (30, 8)) for c in centers]).astype(np.float32)
    labels = np.repeat(np.arange(3), 30)
    return features, labels


@pytest.mark.parametrize("filter_by", FILTERS)
def test_a_flipped_label_is_flagged_first_with_the_right_suggestion(filter_by):
    features, labels = _clusters()
    labels = labels.copy()
    features[5] = np.eye(3, 8)[0] * 10  # the centre of cluster 0...
    labels[5] = 2  # ...labelled 2
    probs = cross_validated_probs(features, labels, num_classes=3, folds=5, seed=0)
    assert probs.shape == (90, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    flagged, self_confidence = rank_label_issues(labels, probs, filter_by)
    assert flagged.tolist() == [5]
    assert probs[5].argmax() == 0 and self_confidence[5] < 0.5
    assert self_confidence[5] == pytest.approx(probs[5, 2])


def test_ranking_is_by_self_confidence_and_clean_data_has_no_issues():
    features, labels = _clusters(1)
    assert rank_label_issues(labels, cross_validated_probs(features, labels, 3))[0].tolist() == []
    labels = labels.copy()
    centers = np.eye(3, 8) * 10
    features[[3, 40, 70]] = centers  # three images in the middle of their clusters...
    labels[[3, 40, 70]] = [1, 2, 0]  # ...with the wrong labels
    probs = cross_validated_probs(features, labels, 3)
    flagged, confidence = rank_label_issues(labels, probs)
    assert sorted(flagged.tolist()) == [3, 40, 70]
    assert list(confidence[flagged]) == sorted(confidence[flagged])  # most suspicious first


def test_unknown_filter_is_refused_and_the_cli_offers_the_engine_filters():
    from vitft_app.cli import build_parser

    features, labels = _clusters()
    with pytest.raises(LabelIssuesError, match="Unknown filter 'nope'"):
        rank_label_issues(labels, cross_validated_probs(features, labels, 3), "nope")
    assert FILTERS[0] == "low_self_confidence"
    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["label-issues"]._actions
                  if a.dest == "filter_by")
    assert tuple(action.choices) == FILTERS and action.default == FILTERS[0]


def test_cross_validation_needs_two_images_per_class():
    features, labels = _clusters()
    labels = labels.copy()
    labels[0] = 3  # a class with one image
    with pytest.raises(LabelIssuesError, match="at least 2 images"):
        cross_validated_probs(features, labels, 4)


def test_an_image_far_from_every_class_is_an_outlier():
    features, labels = _clusters()
    far = np.full((1, 8), -40.0, dtype=np.float32)
    far[0, 7] = 60  # a direction no cluster points to (cosine distance)
    flagged, distance = find_outliers(np.concatenate([features, far]))
    assert flagged[0] == 90 and distance[90] == distance.max() and len(flagged) <= 3


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory, digits_root, tiny_vit):
    """A tiny ViT trained on 3 digit classes where three training images sit in the wrong folder."""
    from vitft_app.config import TrainConfig
    from vitft_app.runs import RunRecorder, RunStore
    from vitft_app.training import train

    tmp = tmp_path_factory.mktemp("issues")
    data = tmp / "digits"
    for part, sl in (("train", slice(0, 40)), ("val", slice(40, 55))):
        for digit in ("0", "1", "7"):
            (data / part / digit).mkdir(parents=True)
            for path in sorted((digits_root / digit).iterdir())[sl]:
                shutil.copy(path, data / part / digit / path.name)
    flipped = []
    for src, dst in (("0", "1"), ("1", "7"), ("7", "0")):
        path = sorted((data / "train" / src).iterdir())[0]
        shutil.move(path, data / "train" / dst / path.name)
        flipped.append(str(data / "train" / dst / path.name))
    config = TrainConfig(data_dir=str(data), model=str(tiny_vit), epochs=3, batch_size=32, lr=3e-3,
                         augment="none", precision="fp32", output_dir=str(tmp / "runs"))
    run_dir = RunStore(config.output_dir).create_run(config)
    train(config, run_dir, RunRecorder(run_dir), device="cpu")
    return run_dir, flipped


def test_run_label_issues_writes_the_csv(noisy_run):
    run_dir, flipped = noisy_run
    result = find_run_label_issues(run_dir, device="cpu")
    assert result.num_images == 120 + 45 and "fine-tuned model" in result.method
    frame = pd.read_csv(run_dir / "label_issues.csv")
    assert list(frame.columns) == ["path", "split", "given_label", "suggested_label", "score"]
    assert len(frame) == len(result.issues) and frame["score"].is_monotonic_increasing
    assert (frame["given_label"] != frame["suggested_label"]).all()
    assert set(frame["split"]) <= {"train", "val"}
    summary = json.loads((run_dir / "label_issues.json").read_text())
    assert summary["filter_by"] == "low_self_confidence" and "filter_by=low_self_confidence" in summary["method"]
    assert "Out-of-sample probabilities: fine-tuned model" in result.summary()


def test_cli_label_issues(noisy_run, tmp_path, vitft_here):
    run_dir, _ = noisy_run
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # The real entry point once (a new process, its imports and exit code) ...
    done = subprocess.run([sys.executable, "-m", "vitft_app.cli", "label-issues", str(run_dir), "--show", "3"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "suspected label error(s)" in done.stdout and "label_issues.csv" in done.stdout
    # ... and the refusals through cli.main in this process (each new process costs ~7 s of CPU
    # importing torch and transformers; the messages and exit codes are the same).
    for args, message in ((["label-issues", str(tmp_path)], "not a run folder"),
                          (["label-issues", str(run_dir), "--folds", "1"], "--folds must be >= 2"),
                          (["label-issues", str(run_dir), "--data", str(tmp_path / "nope")], "not found"),
                          (["label-issues", str(run_dir), "--filter-by", "nope"], "invalid choice")):
        bad = vitft_here(*args, cwd=tmp_path)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_linear_probe_run_uses_k_fold_on_every_image(tmp_path, digits_small, tiny_vit):
    from vitft_app.config import TrainConfig
    from vitft_app.runs import RunRecorder, RunStore
    from vitft_app.training import train

    config = TrainConfig(data_dir=str(digits_small), model=str(tiny_vit), epochs=1, batch_size=32, lr=3e-3,
                         freeze_depth=2, augment="none", precision="fp32", output_dir=str(tmp_path / "runs"))
    run_dir = RunStore(config.output_dir).create_run(config)
    train(config, run_dir, RunRecorder(run_dir), device="cpu")
    result = find_run_label_issues(run_dir, device="cpu", folds=3, write=False)
    assert result.method.startswith("frozen backbone (linear probe): 3-fold")
    assert result.num_images == 60 and not (Path(run_dir) / "label_issues.csv").exists()


def test_panel_handlers_edit_undo_and_retrain(noisy_run, tmp_path):
    """The Evaluate panel's handlers on a real run: find, select, move, exclude, undo, retrain."""
    from vitft_app.jobs import JobRunner
    from vitft_app.runs_table import read_meta, runs_table
    from vitft_app.ui import label_issues_panel as panel
    from vitft_app.ui.app import AppContext, AppSettings

    run_dir, _ = noisy_run
    data = Path(json.loads((run_dir / "config.json").read_text())["data_dir"])
    runs = tmp_path / "runs"
    outside = AppContext(settings=AppSettings(data_root=tmp_path, runs_dir=runs, example_dir=tmp_path, device="cpu"),
                         runner=JobRunner(runs, device="cpu"))
    message, changed = panel.apply_edit(outside, str(run_dir), [str(next((data / "train" / "0").iterdir()))], "exclude")
    assert message.startswith("✗") and "outside the data folders" in message and changed == []

    ctx = AppContext(settings=AppSettings(data_root=data.parent, runs_dir=runs, example_dir=tmp_path, device="cpu"),
                     runner=JobRunner(runs, device="cpu"))
    items, paths, summary = panel.find_issues(ctx, str(run_dir))
    assert len(items) == len(paths) and "suspected label error" in summary and "Method: fine-tuned" in summary
    assert panel.run_classes(str(run_dir)) == ["0", "1", "7"]
    a, b = sorted((data / "train" / "1").iterdir())[:2]
    update, known = panel.add_to_selection(ctx, str(run_dir), [], [], str(a))
    update, known = panel.add_to_selection(ctx, str(run_dir), known, update["value"], str(b))
    assert known == [str(a), str(b)] and update["value"] == [str(a), str(b)]
    assert update["choices"] == [(f"train/1/{a.name}", str(a)), (f"train/1/{b.name}", str(b))]
    message, changed = panel.apply_edit(ctx, str(run_dir), [str(a)], "move", "7")
    assert message.startswith("✓ Moved 1") and (data / "train" / "7" / a.name).is_file()
    message, _ = panel.apply_edit(ctx, str(run_dir), [str(b)], "exclude")
    assert message.startswith("✓ Excluded 1") and (data / "_excluded" / "train" / "1" / b.name).is_file()
    assert list(panel.journal_view(ctx, str(run_dir))["action"]) == ["exclude", "move"]
    assert panel.undo(ctx, str(run_dir), everything=False).startswith("✓ Undid edit 2")
    assert b.is_file()

    started = panel.retrain(ctx, str(run_dir))
    assert started.startswith("▶ Started"), started
    job = ctx.runner.current
    assert job.wait(300)
    meta = read_meta(job.run_dir)
    assert meta["retrained_from"] == run_dir.name and meta["name"].endswith("(fixed data)")
    table = runs_table(runs)
    assert table.loc[table["run_id"] == job.run_dir.name, "retrained_from"].item() == run_dir.name
    assert panel.undo(ctx, str(run_dir), everything=True) == "✓ Undid 1 edit(s)."
    assert a.is_file() and panel.undo(ctx, str(run_dir), everything=True) == "Nothing to undo."
