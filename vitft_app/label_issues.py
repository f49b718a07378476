"""Suspected label errors, outliers and exact duplicates of a run's dataset (confident learning).

``vitft label-issues RUN_DIR`` and the Evaluate tab's label-issues panel call
:func:`find_run_label_issues`. Confident learning (Northcutt, Jiang and Chuang 2021, "Confident
Learning: Estimating Uncertainty in Dataset Labels", JAIR; the ``cleanlab`` library) needs
*out-of-sample* predicted probabilities: the probability a model gives an image it was not
trained on. They come from:

- a frozen backbone (a linear probe: every encoder block frozen): k-fold cross-validation of a
  linear head (scikit-learn ``LogisticRegression`` on standardized features) on the backbone's
  features of every training and validation image;
- a fine-tune (some blocks trained): the run's model on its validation images (it never trained
  on them), and k-fold cross-validation of a linear head on the model's features of the
  training images.

``cleanlab.filter.find_label_issues`` then flags the images whose given label disagrees with
those probabilities: by default (``filter_by="low_self_confidence"``) the N images with the lowest
self-confidence (the probability of the given label), N being cleanlab's estimate of the number of
label errors (``cleanlab.count.num_label_issues``: the off-diagonal count of the confident joint);
most suspicious first. Measured on the digits with 5% of the training labels flipped
(benchmarks/README.md, "Label issues"), this flags fewer of the model's own mistakes than
cleanlab's default ``prune_by_noise_rate`` at about the same recall. Outliers are images far from every other image in feature space:
the mean cosine distance to their 10 nearest neighbours above ``Q3 + 1.7 x IQR`` of all such
distances (the rule and defaults of cleanlab's Datalab outlier check,
``OutlierIssueManager``, threshold 0.37037). Exact duplicates are the scan's decoded-pixel groups.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from .config import TrainConfig
from .data import DatasetReport, scan_dataset
from .runs import atomic_write_text, is_run_dir
from .dataset_edits import current_data_path
from .modeling import num_blocks
from .predict import Predictor, load_pixels

logger = logging.getLogger(__name__)

#: Folds of the cross-validated linear head (cleanlab's examples use 5).
DEFAULT_FOLDS = 5
#: Inverse L2 strength of the logistic-regression head on standardized features (scikit-learn's
#: ``C``; its default is 1.0). 0.1 measured slightly better precision and recall on the digits
#: benchmark (benchmarks/README.md, "Label issues") and fits faster.
HEAD_C = 0.1
#: cleanlab ``find_label_issues`` filters vitft offers; the first is the default (see the module docstring).
FILTERS = ("low_self_confidence", "prune_by_noise_rate", "both", "confident_learning", "low_normalized_margin")
#: Neighbours for the outlier distance (cleanlab Datalab's default k).
OUTLIER_NEIGHBORS = 10
#: Datalab's feature-outlier threshold: flagged above Q3 + (1 / 0.37037 - 1) x IQR = Q3 + 1.7 x IQR.
OUTLIER_IQR_SCALE = 1 / 0.37037 - 1
#: The CSV written into the run folder.
ISSUES_CSV = "label_issues.csv"
#: Method, counts, outliers and duplicates, beside the CSV.
SUMMARY_JSON = "label_issues.json"

Progress = Callable[[int, int], None]


class LabelIssuesError(ValueError):
    """Label issues cannot be searched (no model, a multi-label run, too few images per class)."""


@dataclass
class LabelIssues:
    """What :func:`find_run_label_issues` found.

    Attributes:
        method: one sentence naming how the out-of-sample probabilities were made.
        classes: the model's class names in index order.
        issues: flagged images, most suspicious first: ``path``, ``split``, ``given_label``,
            ``suggested_label`` (the most probable class), ``score`` (self-confidence: the
            out-of-sample probability of the given label, in [0, 1]; low = suspicious).
        outliers: ``path``, ``split``, ``label``, ``distance`` (mean cosine distance to the 10
            nearest neighbours), farthest first.
        duplicates: groups of exactly identical images (paths) with their kinds.
        num_images: images examined (train + val).
        out_of_sample_accuracy: accuracy of the out-of-sample probabilities against the given labels.
        majority_baseline: share of the most common given label (the accuracy of always guessing it).
        csv_path: the written CSV, when written.
        paths: every examined image, ``(N,)`` (train first, then val).
        splits: ``"train"`` or ``"val"`` per image, ``(N,)``.
        labels: int ``(N,)`` given class indices.
        pred_probs: float32 ``(N, C)`` out-of-sample probabilities the flags came from (benchmarks
            compare cleanlab's filters on them with :func:`rank_label_issues`).
    """

    method: str
    classes: list[str]
    issues: pd.DataFrame
    outliers: pd.DataFrame
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    num_images: int = 0
    out_of_sample_accuracy: float = 0.0
    majority_baseline: float = 0.0
    csv_path: Path | None = None
    paths: list[str] = field(default_factory=list)
    splits: np.ndarray | None = None
    labels: np.ndarray | None = None
    pred_probs: np.ndarray | None = None

    @property
    def weak(self) -> bool:
        """True when the out-of-sample accuracy is below 0.8 or not clearly above the majority
        baseline: most flags are then the model's own mistakes, not label errors."""
        return self.out_of_sample_accuracy < max(0.8, self.majority_baseline + 0.1)

    def summary(self) -> str:
        """A few human lines: method, counts, where the CSV is."""
        lines = [
            f"Out-of-sample probabilities: {self.method}",
            f"Examined {self.num_images} images; out-of-sample accuracy {self.out_of_sample_accuracy:.4f}"
            f" (majority-class baseline {self.majority_baseline:.4f})."
            + (" The model is weak: most flags are likely its own mistakes, not label errors; train a"
               " better model first." if self.weak else ""),
            f"{len(self.issues)} suspected label error(s), {len(self.outliers)} outlier(s),"
            f" {len(self.duplicates)} exact-duplicate group(s).",
        ]
        if self.csv_path is not None:
            lines.append(f"Written {self.csv_path} (most suspicious first).")
        return "\n".join(lines)


def embed_images(predictor: Any, paths: list[str], batch_size: int = 64,
                 progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features (the classifier head's input) and probabilities of the run's model.

    Args:
        predictor: a :class:`~vitft_app.predict.Predictor` (its model has a ``classifier`` head, as
            every transformers image-classification model does).
        paths: image files, ``(N,)``.
        batch_size: images per forward pass.
        progress: called as ``progress(done, total)``.

    Returns:
        ``(features float32 (N, D), probabilities float32 (N, C))``.
    """
    model = predictor.model
    head = getattr(model, "classifier", None)
    if head is None:
        raise LabelIssuesError("This model has no `classifier` head to read features from.")
    captured: list[torch.Tensor] = []

    def hook(_module: Any, inputs: tuple) -> None:
        x = inputs[0]
        captured.append((x[:, 0] if x.ndim == 3 else x.flatten(1)).float().cpu())

    handle = head.register_forward_pre_hook(hook)
    features, probs = [], []
    try:
        with torch.inference_mode():
            for start in range(0, len(paths), batch_size):
                pixels = load_pixels(paths[start:start + batch_size], predictor.transform,
                                     getattr(predictor, "draft_size", None))
                captured.clear()
                logits = predictor.logits(pixels)
                features.append(captured[-1])
                probs.append(logits.float().softmax(-1))
                if progress is not None:
                    progress(min(start + batch_size, len(paths)), len(paths))
    finally:
        handle.remove()
    return torch.cat(features).numpy().astype(np.float32), torch.cat(probs).numpy().astype(np.float32)


def cross_validated_probs(features: np.ndarray, labels: np.ndarray, num_classes: int,
                          folds: int = DEFAULT_FOLDS, seed: int = 0) -> np.ndarray:
    """Out-of-sample probabilities from k-fold cross-validation of a linear head.

    Each image's probabilities come from a ``StandardScaler`` + ``LogisticRegression`` (L2,
    ``C`` = :data:`HEAD_C`, lbfgs, at most 300 iterations) fitted on the other folds (stratified,
    shuffled with ``seed``).

    Args:
        features: float32 ``(N, D)``.
        labels: int ``(N,)`` class indices in ``[0, num_classes)``.
        num_classes: C, the number of probability columns.
        folds: k; lowered to the size of the smallest class (at least 2).
        seed: fold shuffling seed.

    Returns:
        float32 ``(N, C)``; a class absent from the labels gets probability 0.

    Raises:
        LabelIssuesError: a class has a single image, or only one class is present.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    present, counts = np.unique(labels, return_counts=True)
    if len(present) < 2 or counts.min() < 2:
        raise LabelIssuesError("Each class needs at least 2 images (and at least 2 classes) for cross-validation.")
    k = folds_used(labels, folds)
    # 300 lbfgs iterations: enough on separable features, bounded on a weak model's (a busy CPU)
    head = make_pipeline(StandardScaler(), LogisticRegression(C=HEAD_C, max_iter=300))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the iteration cap is deliberate
        probs = cross_val_predict(head, features, labels, cv=cv, method="predict_proba")
    out = np.zeros((len(labels), num_classes), dtype=np.float32)
    out[:, present] = probs  # predict_proba's columns are the sorted present classes
    return out


def folds_used(labels: np.ndarray, folds: int) -> int:
    """k actually used by :func:`cross_validated_probs`: ``folds`` lowered to the smallest class
    size, at least 2."""
    _, counts = np.unique(labels, return_counts=True)
    return int(max(2, min(folds, counts.min()))) if len(counts) else 2


def rank_label_issues(labels: np.ndarray, pred_probs: np.ndarray,
                      filter_by: str = FILTERS[0]) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's ``find_label_issues``, ranked by self-confidence.

    Args:
        labels: int ``(N,)`` given class indices.
        pred_probs: float ``(N, C)`` out-of-sample probabilities (rows sum to 1).
        filter_by: cleanlab's ``filter_by``, one of :data:`FILTERS` (default
            ``low_self_confidence``: the ``num_label_issues`` lowest self-confidences).

    Returns:
        ``(indices of flagged images, most suspicious first, self-confidence (N,) of every image)``.

    Raises:
        LabelIssuesError: an unknown ``filter_by``.
    """
    from cleanlab.filter import find_label_issues

    if filter_by not in FILTERS:
        raise LabelIssuesError(f"Unknown filter {filter_by!r}; choose one of {', '.join(FILTERS)}.")
    pred_probs = np.asarray(pred_probs, dtype=np.float64)
    pred_probs = pred_probs / np.clip(pred_probs.sum(1, keepdims=True), 1e-12, None)
    # n_jobs=1: no worker processes forked from the app's server process (10s of classes: fast anyway)
    indices = find_label_issues(labels, pred_probs, filter_by=filter_by, return_indices_ranked_by="self_confidence",
                                n_jobs=1)
    self_confidence = pred_probs[np.arange(len(labels)), labels]
    return np.asarray(indices, dtype=np.int64), self_confidence


def find_outliers(features: np.ndarray, k: int = OUTLIER_NEIGHBORS) -> tuple[np.ndarray, np.ndarray]:
    """Images far from every other image: cleanlab Datalab's feature-outlier rule.

    Args:
        features: float ``(N, D)``.
        k: neighbours (lowered to N - 1).

    Returns:
        ``(indices flagged, farthest first; mean cosine distance (N,) to the k nearest neighbours)``.
    """
    from sklearn.neighbors import NearestNeighbors

    n = len(features)
    if n < 3:
        return np.zeros(0, dtype=np.int64), np.zeros(n)
    k = min(k, n - 1)
    knn = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(features)
    distances, _ = knn.kneighbors(features)
    mean_distance = distances[:, 1:].mean(1)  # column 0 is the image itself
    q1, q3 = np.percentile(mean_distance, [25, 75])
    threshold = q3 + OUTLIER_IQR_SCALE * (q3 - q1)
    flagged = np.flatnonzero(mean_distance > threshold)
    return flagged[np.argsort(-mean_distance[flagged])], mean_distance


def _is_linear_probe(predictor: Any, config: TrainConfig | None) -> bool:
    if config is None:
        return False
    try:
        return config.freeze_depth >= num_blocks(predictor.model) and config.gradual_unfreeze == 0
    except (AttributeError, ValueError):
        return False


def find_run_label_issues(
    run_dir: str | os.PathLike,
    data_dir: str | None = None,
    folds: int = DEFAULT_FOLDS,
    filter_by: str = FILTERS[0],
    write: bool = True,
    device: str | None = None,
    progress: Progress | None = None,
) -> LabelIssues:
    """Finds suspected label errors, outliers and exact duplicates in a run's dataset.

    Args:
        run_dir: a run folder with a saved model (``model/`` and ``config.json``).
        data_dir: the dataset; default the run's (a CSV dataset edited with
            :mod:`vitft_app.dataset_edits` is followed to its current CSV).
        folds: k of the cross-validated linear head.
        filter_by: cleanlab's ``filter_by`` (:data:`FILTERS`; default ``low_self_confidence``).
        write: write ``RUN_DIR/label_issues.csv`` and ``RUN_DIR/label_issues.json``.
        device: force a device; default from the device policy.
        progress: ``progress(done, total)`` while images are embedded.

    Returns:
        A :class:`LabelIssues`.

    Raises:
        LabelIssuesError: not a run folder, no saved model, a multi-label run, dataset classes
            the model does not know, or too few images per class.
        FileNotFoundError: the dataset is gone.
    """

    path = Path(run_dir).expanduser()
    if not is_run_dir(path):
        raise LabelIssuesError(f"{path} is not a run folder (no config.json).")
    config = TrainConfig.from_json_file(path / "config.json")
    data = current_data_path(data_dir or config.data_dir)
    try:
        predictor = Predictor(path, device=device)
    except (FileNotFoundError, OSError) as exc:
        raise LabelIssuesError(str(exc)) from exc
    if predictor.multi_label:
        raise LabelIssuesError("Label issues are searched for single-label datasets only.")
    classes = [predictor.id2label[i] for i in sorted(predictor.id2label)]
    report: DatasetReport = scan_dataset(data, val_fraction=config.val_fraction, seed=config.seed)
    unknown = sorted(set(report.classes) - set(classes))
    if unknown:
        raise LabelIssuesError(f"The model does not predict these dataset classes: {', '.join(unknown)}")
    index = {name: i for i, name in enumerate(classes)}
    items = [(item, "train") for item in report.train] + [(item, "val") for item in report.val]
    if not items:
        raise LabelIssuesError(f"No usable images in {data}.")
    paths = [item.path for item, _ in items]
    splits = np.array([split for _, split in items])
    labels = np.array([index[report.classes[item.label]] for item, _ in items], dtype=np.int64)
    features, model_probs = embed_images(predictor, paths, progress=progress)

    train_mask = splits == "train"
    if _is_linear_probe(predictor, config):
        pred_probs = cross_validated_probs(features, labels, len(classes), folds, seed=config.seed)
        method = (f"frozen backbone (linear probe): {folds_used(labels, folds)}-fold cross-validated"
                  " linear head (logistic regression) on the backbone's features of every image")
    else:
        pred_probs = model_probs.copy()
        pred_probs[train_mask] = cross_validated_probs(features[train_mask], labels[train_mask], len(classes),
                                                       folds, seed=config.seed)
        method = ("fine-tuned model: the run's model on its validation images, and a"
                  f" {folds_used(labels[train_mask], folds)}-fold cross-validated linear head (logistic"
                  " regression) on the model's features"
                  " for the training images")
    flagged, self_confidence = rank_label_issues(labels, pred_probs, filter_by)
    method += f"; cleanlab find_label_issues, filter_by={filter_by}, ranked by self-confidence"
    suggested = pred_probs.argmax(1)
    issues = pd.DataFrame({
        "path": [paths[i] for i in flagged],
        "split": splits[flagged] if len(flagged) else [],
        "given_label": [classes[labels[i]] for i in flagged],
        "suggested_label": [classes[suggested[i]] for i in flagged],
        "score": np.round(self_confidence[flagged], 6) if len(flagged) else [],
    }, columns=["path", "split", "given_label", "suggested_label", "score"])
    outlier_idx, distance = find_outliers(features)
    outliers = pd.DataFrame({
        "path": [paths[i] for i in outlier_idx],
        "split": splits[outlier_idx] if len(outlier_idx) else [],
        "label": [classes[labels[i]] for i in outlier_idx],
        "distance": np.round(distance[outlier_idx], 6) if len(outlier_idx) else [],
    }, columns=["path", "split", "label", "distance"])
    duplicates = [{"paths": list(g.paths), "kinds": list(g.kinds)} for g in report.duplicates]
    result = LabelIssues(method, classes, issues, outliers, duplicates, len(paths),
                         float((suggested == labels).mean()), float(np.bincount(labels).max() / len(labels)),
                         paths=paths, splits=splits, labels=labels, pred_probs=pred_probs)
    if write:
        result.csv_path = path / ISSUES_CSV
        atomic_write_text(result.csv_path, issues.to_csv(index=False))
        atomic_write_text(path / SUMMARY_JSON, json.dumps({
            "method": method, "filter_by": filter_by, "data_dir": str(data), "num_images": result.num_images,
            "out_of_sample_accuracy": result.out_of_sample_accuracy, "majority_baseline": result.majority_baseline,
            "num_issues": len(issues),
            "outliers": outliers.to_dict(orient="records"), "duplicates": duplicates,
        }, indent=2))
    logger.info("Label issues of %s: %d flagged of %d (%s)", path.name, len(issues), len(paths), method)
    return result
