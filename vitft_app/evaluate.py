"""Evaluation of a trained model: metrics (scikit-learn), confusion matrix, calibration, mistakes.

``vitft evaluate RUN_DIR [--data DIR] [--split val|test]`` and the Evaluate tab both call
:func:`evaluate_run`, which writes ``RUN_DIR/eval/<split>/`` (``metrics.json``,
``predictions.csv`` and plotly HTML figures).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from .baseline import Baseline, format_accuracy, headline, majority_baseline, weak_model_warning
from .config import TrainConfig
from .data import ImageItem, scan_dataset
from .metrics import MULTI_LABEL_THRESHOLD, core_metrics
from .model_card import write_model_card
from .runs import atomic_write_text, is_run_dir
from . import plots
from .predict import Predictor

Split = Literal["val", "test"]
#: Bins of the expected calibration error (Guo et al. 2017, "On Calibration of Modern Neural
#: Networks", equal-width confidence bins).
ECE_BINS = 15


class EvaluationError(ValueError):
    """The evaluation cannot run (no model, no such split, classes the model does not know)."""


@dataclass
class Evaluation:
    """Predictions and metrics of one model on one split.

    Attributes:
        split: ``"val"`` or ``"test"``.
        classes: the model's class names in index order.
        paths: evaluated image files, ``(N,)``.
        y_true: int64 class indices ``(N,)``, or multi-hot int64 ``(N, C)`` for a multi-label model.
        probs: float32 softmax probabilities ``(N, C)`` (per-label sigmoids when multi-label).
        metrics: the dict written to ``metrics.json`` (see :func:`compute_metrics`).
        out_dir: where the files were written, when they were.
    """

    split: str
    classes: list[str]
    paths: list[str]
    y_true: np.ndarray
    probs: np.ndarray
    metrics: dict[str, Any]
    out_dir: Path | None = None

    @property
    def multi_label(self) -> bool:
        """True when ``y_true`` is multi-hot."""
        return self.y_true.ndim == 2

    @property
    def y_pred(self) -> np.ndarray:
        """Top-1 predicted class indices ``(N,)``, or multi-hot ``(N, C)`` at threshold 0.5."""
        if self.multi_label:
            return (self.probs >= MULTI_LABEL_THRESHOLD).astype(np.int64)
        return self.probs.argmax(1)

    def predictions_frame(self) -> pd.DataFrame:
        """One row per image: path, true, predicted, confidence (top-1 probability), correct, loss
        (cross-entropy of the true class). Multi-label: true and predicted are ``;``-joined label
        sets (predicted = every label scoring at least 0.5), confidence is the highest label
        score, correct means the two sets are equal, loss is the mean binary cross-entropy over
        the labels."""
        if self.multi_label:
            pred = self.y_pred
            names = lambda row: ";".join(c for c, on in zip(self.classes, row) if on)  # noqa: E731
            p = np.clip(self.probs, 1e-12, 1 - 1e-12)
            bce = -(self.y_true * np.log(p) + (1 - self.y_true) * np.log(1 - p)).mean(1)
            return pd.DataFrame({
                "path": self.paths,
                "true": [names(r) for r in self.y_true],
                "predicted": [names(r) for r in pred],
                "confidence": self.probs.max(1).round(6),
                "correct": (pred == self.y_true).all(1),
                "loss": bce.round(6),
            })
        conf = self.probs.max(1)
        true_prob = self.probs[np.arange(len(self.y_true)), self.y_true]
        return pd.DataFrame({
            "path": self.paths,
            "true": [self.classes[i] for i in self.y_true],
            "predicted": [self.classes[i] for i in self.y_pred],
            "confidence": conf.round(6),
            "correct": self.y_true == self.y_pred,
            "loss": (-np.log(np.clip(true_prob, 1e-12, 1.0))).round(6),
        })

    def cell_images(self, true_class: int, predicted_class: int) -> pd.DataFrame:
        """The images behind one confusion-matrix cell, most confident first (single-label)."""
        frame = self.predictions_frame()
        mask = (self.y_true == true_class) & (self.y_pred == predicted_class)
        return frame[mask].sort_values("confidence", ascending=False)

    def top_losses(self, n: int = 12) -> pd.DataFrame:
        """The worst mistakes: wrong predictions sorted by confidence (single-label) or by loss
        (multi-label), highest first."""
        frame = self.predictions_frame()
        key = "loss" if self.multi_label else "confidence"
        return frame[~frame["correct"]].sort_values(key, ascending=False).head(n)


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """Expected calibration error of the top-1 confidence (Guo et al. 2017).

    ``ECE = sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)|`` over ``bins`` equal-width
    confidence bins ``(lo, hi]``.

    Returns:
        ``(ece, bins)`` where each bin is ``{"lo", "hi", "count", "accuracy", "confidence"}``
        (accuracy and confidence None for empty bins): the reliability diagram's data.
    """
    conf = probs.max(1)
    correct = probs.argmax(1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece, table = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        count = int(mask.sum())
        if count:
            acc, mean_conf = float(correct[mask].mean()), float(conf[mask].mean())
            ece += count / len(conf) * abs(acc - mean_conf)
        else:
            acc = mean_conf = None
        table.append({"lo": float(lo), "hi": float(hi), "count": count, "accuracy": acc, "confidence": mean_conf})
    return float(ece), table


def _baseline(y_true: np.ndarray, classes: list[str]) -> dict[str, Any] | None:
    baseline = majority_baseline(np.asarray(y_true).tolist(), classes)
    return None if baseline is None else baseline.to_dict()


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str], top_k: int = 5) -> dict[str, Any]:
    """All metrics of the Evaluate tab, computed with scikit-learn.

    Args:
        y_true: int class indices ``(N,)``.
        probs: probabilities ``(N, C)``, rows summing to 1.
        classes: ``C`` class names.
        top_k: k of the top-k accuracy (clipped to ``C - 1``: a larger k is always right).

    Returns:
        ``accuracy``, ``top_k``, ``top_k_accuracy``, ``macro_precision``, ``macro_recall``,
        ``macro_f1``, ``weighted_precision``, ``weighted_recall``, ``weighted_f1``, ``per_class``
        (list of ``{class, precision, recall, f1, support}``), ``confusion_matrix`` (rows = true,
        columns = predicted), ``roc_auc`` (binary: of the positive class; more classes: one-vs-rest
        macro average; None when a class is absent from ``y_true``), ``ece``, ``reliability``,
        ``num_images``, ``correct`` (images right) and ``baseline`` (the majority-class rate of
        these labels, :meth:`vitft_app.baseline.Baseline.to_dict`, or None).
    """
    labels = list(range(len(classes)))
    core = core_metrics(y_true, probs, multi_label=False)  # the numbers the training loop's validation reports
    y_pred, accuracy = core["y_pred"], core["accuracy"]
    k = max(1, min(top_k, len(classes) - 1))  # k >= C would make top-k accuracy trivially 1
    result: dict[str, Any] = {
        "num_images": int(len(y_true)),
        "accuracy": accuracy,
        "correct": int((y_pred == np.asarray(y_true)).sum()),
        "baseline": _baseline(y_true, classes),
        "top_k": k,
        "top_k_accuracy": float(skm.top_k_accuracy_score(y_true, probs, k=k, labels=labels)) if k > 1 else accuracy,
    }
    for average in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, average=average, zero_division=0)
        result |= {f"{average}_precision": float(p), f"{average}_recall": float(r), f"{average}_f1": float(f)}
    p, r, f, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    result["macro_f1"] = core["macro_f1"]  # the same value, computed in the one shared place
    result["per_class"] = [
        {"class": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
        for i, c in enumerate(classes)
    ]
    result["confusion_matrix"] = skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    present = set(np.unique(y_true).tolist())
    if present != set(labels):
        result["roc_auc"] = None
    elif len(classes) == 2:
        result["roc_auc"] = float(skm.roc_auc_score(y_true, probs[:, 1]))
    else:
        result["roc_auc"] = float(skm.roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=labels))
    result["ece"], result["reliability"] = expected_calibration_error(y_true, probs)
    return result


def compute_multilabel_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: list[str], threshold: float = MULTI_LABEL_THRESHOLD
) -> dict[str, Any]:
    """Metrics of a multi-label model, computed with scikit-learn.

    Args:
        y_true: multi-hot int ``(N, C)``.
        probs: per-label sigmoid scores ``(N, C)``.
        classes: ``C`` label names.
        threshold: a label is predicted when its score is at or above this.

    Returns:
        ``multi_label`` (True), ``num_images``, ``threshold``, ``subset_accuracy`` (every label
        right; also under ``accuracy``), ``micro_f1``, ``macro_f1``, ``micro_precision``,
        ``micro_recall``, ``map`` (mean over labels with a positive of
        ``average_precision_score``), ``per_class`` (``{class, precision, recall, f1, ap,
        support}``; ap None for a label without positives).
    """
    core = core_metrics(y_true, probs, multi_label=True, threshold=threshold)  # as the loop's validation
    y_pred, aps, subset = core["y_pred"], core["ap"], core["accuracy"]
    p, r, f, support = skm.precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    micro = skm.precision_recall_fscore_support(y_true, y_pred, average="micro", zero_division=0)
    return {
        "multi_label": True,
        "num_images": int(len(y_true)),
        "threshold": threshold,
        "accuracy": subset,
        "subset_accuracy": subset,
        "micro_precision": float(micro[0]),
        "micro_recall": float(micro[1]),
        "micro_f1": core["micro_f1"],
        "macro_f1": core["macro_f1"],
        "map": core["map"],
        "per_class": [
            {"class": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "ap": aps[i],
             "support": int(support[i])}
            for i, c in enumerate(classes)
        ],
    }


def test_split_dir(data_dir: str | os.PathLike) -> Path | None:
    """The dataset's held-out test split, ``DATA/test/``, or None when the dataset (a folder, not a
    CSV) has none."""
    test_dir = Path(data_dir).expanduser() / "test"
    return test_dir if test_dir.is_dir() else None


def _split_items(run_config: TrainConfig | None, data_dir: str, split: Split,
                 progress: Callable[[int, int], None] | None = None) -> tuple[list[ImageItem], list[str]]:
    """Images and dataset class names of the requested split.

    ``val``: the same validation split as training (given val/, or the seeded automatic split with
    the run's ``val_fraction`` and ``seed``). ``test``: every usable image of ``DATA/test/``, which
    training never reads.
    """
    root = Path(data_dir).expanduser()
    val_fraction = run_config.val_fraction if run_config else 0.2
    seed = run_config.seed if run_config else 42
    if split == "test":
        test_dir = test_split_dir(root)
        if test_dir is None:
            raise EvaluationError(f"No test/ folder in {root}: put held-out images in test/<class>/ to evaluate them.")
        report = scan_dataset(test_dir, val_fraction=0.5, seed=seed, progress=progress)
        items = sorted(report.train + report.val, key=lambda i: i.path)
    else:
        report = scan_dataset(root, val_fraction=val_fraction, seed=seed, progress=progress)
        items = report.val
    if not items:
        raise EvaluationError(f"No usable {split} images in {root}.")
    return items, report.classes


def evaluate_run(
    run_or_model: str | os.PathLike,
    data_dir: str | None = None,
    split: Split = "val",
    top_k: int = 5,
    write: bool = True,
    device: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Evaluation:
    """Evaluates a trained model on a dataset split and writes the results.

    Args:
        run_or_model: a run folder (its ``model/`` and ``config.json`` are used) or a
            ``save_pretrained`` folder (then ``data_dir`` is required).
        data_dir: the dataset; default the run's ``data_dir``.
        split: ``"val"`` (the training run's validation split) or ``"test"`` (``DATA/test/``).
        top_k: k of the top-k accuracy.
        write: write ``<run>/eval/<split>/`` (``metrics.json``, ``predictions.csv``, figures).
        device: force a device; default from the device policy. The model runs in the run's own
            precision (its config's, as its validation did; fp32 for a plain model folder), recorded
            as ``metrics["precision"]``.
        progress: called ``(stage, done, total)`` as it goes: ``"Checking images"`` (files),
            ``"Predicting"`` (images), ``"Writing figures"`` (figures).

    Returns:
        An :class:`Evaluation`.

    Raises:
        EvaluationError: no model, no data folder, no such split, or dataset classes the model
            does not predict.
    """
    path = Path(run_or_model).expanduser()
    run_config = TrainConfig.from_json_file(path / "config.json") if is_run_dir(path) else None
    data = data_dir or (run_config.data_dir if run_config else None)
    if not data:
        raise EvaluationError("Give the dataset with --data (a model folder does not record it).")
    # A run is evaluated in the precision it validated in (bf16 autocast under "auto" on CPUs with
    # native bf16): an fp32 pass scored the same model 96.8% where training's validation said 96.6%.
    precision = run_config.precision if run_config else "fp32"
    try:
        predictor = Predictor(path, device=device, precision=precision)
    except (FileNotFoundError, OSError) as exc:
        raise EvaluationError(str(exc)) from exc
    classes = [predictor.id2label[i] for i in sorted(predictor.id2label)]
    def stage(name: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda done, total: progress(name, done, total))

    items, data_classes = _split_items(run_config, data, split, stage("Checking images"))
    unknown = sorted(set(data_classes) - set(classes))
    if unknown:
        raise EvaluationError(f"The model does not predict these dataset classes: {', '.join(unknown)}")
    index = {name: i for i, name in enumerate(classes)}
    paths = [item.path for item in items]
    probs = predictor.predict_proba(paths, progress=stage("Predicting")).numpy().astype(np.float32)
    if predictor.multi_label:
        y_true = np.zeros((len(items), len(classes)), dtype=np.int64)
        for row, item in enumerate(items):
            y_true[row, [index[data_classes[j]] for j in (item.labels or (item.label,))]] = 1
        metrics = compute_multilabel_metrics(y_true, probs, classes)
    else:
        y_true = np.array([index[data_classes[item.label]] for item in items], dtype=np.int64)
        metrics = compute_metrics(y_true, probs, classes, top_k)
    result = Evaluation(split, classes, paths, y_true, probs, metrics)
    result.metrics["split"] = split
    result.metrics["precision"] = predictor.plan.precision
    result.metrics["data_dir"] = str(Path(data).resolve())
    if write:
        base = path if run_config else predictor.path
        write_evaluation(result, base / "eval" / split, stage("Writing figures"))
        if run_config and split == "val":
            write_model_card(path, result.metrics)  # the card shows the latest validation metrics
    return result


def write_evaluation(result: Evaluation, out_dir: Path, progress: Callable[[int, int], None] | None = None) -> None:
    """Writes ``metrics.json``, ``predictions.csv`` and the figures (plotly HTML, with
    ``plotly.min.js`` once beside them so they open offline); ``progress(figures done, total)``
    after each figure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "metrics.json", json.dumps(result.metrics, indent=2))
    atomic_write_text(out_dir / "predictions.csv", result.predictions_frame().to_csv(index=False))
    if result.multi_label:
        figures = {
            "roc": plots.figure_roc(result.y_true, result.probs, result.classes),
            "precision_recall": plots.figure_precision_recall(result.y_true, result.probs, result.classes),
        }
        _write_figures(figures, out_dir, progress)
        result.out_dir = out_dir
        return
    figures = {
        "confusion_matrix": plots.figure_confusion_matrix(result.metrics["confusion_matrix"], result.classes),
        "confusion_matrix_normalized": plots.figure_confusion_matrix(
            result.metrics["confusion_matrix"], result.classes, normalize=True),
        "reliability": plots.figure_reliability(result.metrics["reliability"], result.metrics["ece"]),
        "roc": plots.figure_roc(result.y_true, result.probs, result.classes),
        "precision_recall": plots.figure_precision_recall(result.y_true, result.probs, result.classes),
    }
    _write_figures(figures, out_dir, progress)
    result.out_dir = out_dir


def _write_figures(figures: dict[str, Any], out_dir: Path, progress: Callable[[int, int], None] | None) -> None:
    for done, (name, figure) in enumerate(figures.items(), start=1):
        figure.write_html(out_dir / f"{name}.html", include_plotlyjs="directory")
        if progress is not None:
            progress(done, len(figures))


def evaluation_headline(metrics: dict[str, Any]) -> str:
    """The plain first line of an evaluation: images right with the majority-class baseline of
    the same split, then a weak-model warning when the accuracy is near it.

    Example: ``"131 of 153 validation images right (85.6%); always guessing 'bees' gets 54.2%"``.
    """
    split = {"val": "validation"}.get(str(metrics.get("split", "")), str(metrics.get("split", "")))
    baseline = Baseline.from_dict(metrics.get("baseline"))
    total = int(metrics["num_images"])
    correct = int(metrics.get("correct", round(metrics["accuracy"] * total)))
    line = headline(correct, total, baseline, split or "evaluated")
    warning = weak_model_warning(metrics["accuracy"], baseline)
    return line + (f"\n{warning}" if warning else "")


def summary_text(metrics: dict[str, Any]) -> str:
    """A few lines for the terminal: the plain headline with its baseline (:func:`evaluation_headline`),
    then accuracy, top-k, macro-F1, ROC-AUC, ECE (multi-label: subset accuracy, micro/macro F1, mAP)."""
    if metrics.get("multi_label"):
        mean_ap = "n/a" if metrics.get("map") is None else f"{metrics['map']:.4f}"
        return (
            f"{metrics['split']}: {metrics['num_images']} images (multi-label, threshold {metrics['threshold']})\n"
            f"subset accuracy {metrics['subset_accuracy']:.4f} · micro-F1 {metrics['micro_f1']:.4f}"
            f" · macro-F1 {metrics['macro_f1']:.4f} · mAP {mean_ap}"
        )
    auc = "n/a" if metrics.get("roc_auc") is None else f"{metrics['roc_auc']:.4f}"
    return (
        evaluation_headline(metrics) + "\n"
        f"accuracy {format_accuracy(metrics['accuracy'])} · top-{metrics['top_k']} {format_accuracy(metrics['top_k_accuracy'])}"
        f" · macro-F1 {metrics['macro_f1']:.4f} · weighted-F1 {metrics['weighted_f1']:.4f}"
        f" · ROC-AUC {auc} · ECE {metrics['ece']:.4f}"
    )
