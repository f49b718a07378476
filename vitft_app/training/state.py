"""The loop's state: counters that, with the module and RNG states, make a checkpoint; what
:func:`~vitft_app.training.train` returns; the errors it raises."""

from __future__ import annotations

from dataclasses import dataclass, field


class NonFiniteLossError(RuntimeError):
    """The loss or gradient was NaN/inf for ``max_nonfinite_steps`` optimizer steps in a row."""


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        status: ``"completed"`` or ``"stopped"``.
        best_val_accuracy: validation accuracy of the best epoch (0..1), or None when no epoch finished.
        steps: optimizer steps taken (including steps skipped by the non-finite guard).
        duration_s: wall time of the whole call, seconds.
        reason: why the run ended early (early stopping), else empty.
    """

    status: str
    best_val_accuracy: float | None
    steps: int
    duration_s: float
    reason: str = ""


@dataclass
class _LoopState:
    """The loop's counters; with the module and RNG states they make a checkpoint."""

    epoch: int = 0
    """Index of the epoch in progress (0-based)."""
    position: int = 0
    """Micro-batches of this epoch already done; always at an accumulation-window boundary."""
    order: list[int] | None = None
    """This epoch's sample order (None before the epoch drew it)."""
    step: int = 0
    best_metric: float | None = None
    best_accuracy: float | None = None
    patience_ref: float | None = None
    epochs_without_improvement: int = 0
    nonfinite_in_row: int = 0
    skipped_steps: int = 0
    attention: str | None = None
    """The attention kernel once chosen (a resumed run keeps it rather than timing again)."""
    epoch_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    """Training loss sum, correct count and sample count of the epoch so far."""
