"""Honest numbers: every accuracy beside the rate of always answering the most common class.

A model's accuracy means little alone: on a split where 54% of the images are bees, 55% accuracy
is what a model that always answers "bees" gets. Every place that shows an accuracy (status line,
run lists, Evaluate, model card, HTML report, CLI) formats it with :func:`accuracy_with_baseline`
and warns with :func:`weak_model_warning`, so one run shows one number, rounded the same way.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from .run_status import as_run_status

#: A model whose accuracy is less than this many percentage points above the majority-class rate
#: is called near the baseline (weak).
WEAK_MARGIN = 0.05


@dataclass(frozen=True)
class Baseline:
    """The majority-class rate of one split.

    Attributes:
        majority_class: the most common class name of the split (ties: the first in class order).
        majority_count: images of that class in the split.
        total: images in the split.
        num_classes: classes the model chooses from.
    """

    majority_class: str
    majority_count: int
    total: int
    num_classes: int

    @property
    def rate(self) -> float:
        """Accuracy of always answering :attr:`majority_class` (``majority_count / total``)."""
        return self.majority_count / self.total if self.total else 0.0

    @property
    def chance(self) -> float:
        """Accuracy of guessing uniformly at random: ``1 / num_classes``."""
        return 1.0 / self.num_classes if self.num_classes else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (stored in a run's ``status.json`` as ``val_baseline``)."""
        return {"majority_class": self.majority_class, "majority_count": self.majority_count,
                "total": self.total, "num_classes": self.num_classes}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "Baseline | None":
        """The inverse of :meth:`to_dict`; None for missing or malformed data (older runs)."""
        try:
            baseline = cls(str(data["majority_class"]), int(data["majority_count"]), int(data["total"]),
                           int(data["num_classes"]))
        except (TypeError, KeyError, ValueError):
            return None
        return baseline if baseline.total > 0 and baseline.num_classes > 0 else None


def majority_baseline(labels: Iterable[int], classes: Sequence[str]) -> Baseline | None:
    """The majority-class rate of a split.

    Args:
        labels: the class index of each image of the split (single-label).
        classes: class names, index = label.

    Returns:
        The :class:`Baseline`, or None for an empty split or no classes.
    """
    counts = Counter(int(label) for label in labels)
    if not counts or not classes:
        return None
    index = min(counts, key=lambda label: (-counts[label], label))
    return Baseline(str(classes[index]), counts[index], sum(counts.values()), len(classes))


def format_accuracy(value: float | None) -> str:
    """The one rounding of an accuracy everywhere: a percentage with one decimal (``"85.6%"``)."""
    return "–" if value is None else f"{100 * float(value):.1f}%"


def is_weak(accuracy: float | None, baseline: Baseline | None, margin: float = WEAK_MARGIN) -> bool:
    """True when ``accuracy`` is less than ``margin`` above the majority-class rate."""
    return baseline is not None and is_weak_rate(accuracy, baseline.rate, margin)


def is_weak_rate(accuracy: float | None, rate: float | None, margin: float = WEAK_MARGIN) -> bool:
    """:func:`is_weak` from the majority-class rate alone (NaN or None: not weak)."""
    if accuracy is None or rate is None or accuracy != accuracy or rate != rate:
        return False
    return float(accuracy) < float(rate) + margin


def accuracy_with_baseline(accuracy: float | None, baseline: Baseline | None) -> str:
    """``"85.6% (always 'bees': 54.2%)"``; just the accuracy when the baseline is unknown."""
    if baseline is None:
        return format_accuracy(accuracy)
    return f"{format_accuracy(accuracy)} (always '{baseline.majority_class}': {format_accuracy(baseline.rate)})"


def weak_model_warning(accuracy: float | None, baseline: Baseline | None) -> str | None:
    """A plain warning for a model near its baseline, with what to try; None for a useful model."""
    if not is_weak(accuracy, baseline):
        return None
    assert baseline is not None and accuracy is not None
    worse = accuracy < baseline.rate - 1e-9
    how = "worse than" if worse else "about what"
    return (f"Weak model: {format_accuracy(accuracy)} is {how} always answering '{baseline.majority_class}' gives"
            f" ({format_accuracy(baseline.rate)}; chance is {format_accuracy(baseline.chance)}). Its answers are"
            " not reliable. Try a pretrained model, more epochs or more images per class.")


def headline(correct: int, total: int, baseline: Baseline | None, split: str = "validation") -> str:
    """One plain line: ``"131 of 153 validation images right (85.6%); always guessing 'bees' gets 54.2%"``."""
    line = f"{correct} of {total} {split} images right ({format_accuracy(correct / total if total else 0.0)})"
    if baseline is not None:
        line += f"; always guessing '{baseline.majority_class}' gets {format_accuracy(baseline.rate)}"
    return line


def run_baseline(status: Any) -> Baseline | None:
    """The validation baseline recorded in a run's ``status.json`` (None for older runs).

    Args:
        status: a :class:`~vitft_app.run_status.RunStatus` (or the mapping of an older caller).
    """
    return Baseline.from_dict(as_run_status(status).val_baseline)
