"""The one implementation of the classification metrics that both the training loop's validation
(:func:`vitft_app.training.evaluate`, every epoch) and the Evaluate tab / ``vitft evaluate``
(:mod:`vitft_app.evaluate`) report, computed with scikit-learn, so a run's live validation
numbers and its evaluation agree."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn import metrics as skm

#: Score at or above which a multi-label model predicts a label (the issue's and sklearn's usual 0.5).
MULTI_LABEL_THRESHOLD = 0.5


def core_metrics(
    y_true: np.ndarray, scores: np.ndarray, multi_label: bool, threshold: float = MULTI_LABEL_THRESHOLD
) -> dict[str, Any]:
    """Accuracy, F1 and mean average precision of one split's predictions.

    Single-label: ``accuracy`` of the argmax and ``macro_f1`` over every class (a class never
    true and never predicted counts as F1 0, sklearn's ``zero_division=0``). Multi-label:
    ``accuracy`` is the subset accuracy (every label right) at ``scores >= threshold``,
    ``micro_f1``, ``macro_f1``, ``ap`` (per label ``average_precision_score``, None for a label
    without a positive) and ``map`` (their mean over labels that have a positive).

    Args:
        y_true: int64 class indices ``(N,)``, or multi-hot ints ``(N, C)`` for a multi-label model.
        scores: ``(N, C)`` floats: logits or probabilities (single-label: only the argmax is
            used), per-label sigmoid probabilities (multi-label).
        multi_label: see above.
        threshold: multi-label decision threshold on ``scores``.

    Returns:
        ``{"accuracy", "macro_f1", "micro_f1", "map", "ap", "y_pred"}``; ``micro_f1``, ``map``
        and ``ap`` are None for single-label. ``y_pred``: argmax ``(N,)`` or multi-hot ``(N, C)``.
    """
    num_classes = scores.shape[1]
    if not multi_label:
        y_pred = scores.argmax(1)
        _, _, f1, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=list(range(num_classes)),
                                                          average="macro", zero_division=0)
        return {"accuracy": float(skm.accuracy_score(y_true, y_pred)), "macro_f1": float(f1), "micro_f1": None,
                "map": None, "ap": None, "y_pred": y_pred}
    y_pred = (scores >= threshold).astype(int)
    aps = [float(skm.average_precision_score(y_true[:, i], scores[:, i])) if y_true[:, i].any() else None
           for i in range(num_classes)]
    present = [a for a in aps if a is not None]
    return {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "macro_f1": float(skm.f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "micro_f1": float(skm.f1_score(y_true, y_pred, average="micro", zero_division=0)),
        "map": float(np.mean(present)) if present else None,
        "ap": aps,
        "y_pred": y_pred,
    }
