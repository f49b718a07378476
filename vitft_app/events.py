"""Events the training loop emits. Small frozen dataclasses; the loop knows nothing about who
listens (the run folder recorder, the CLI progress bar, tests)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Literal, Union

#: ``field(metadata=...)`` of an event field that is a column of ``metrics.csv``; ``round`` gives
#: the decimals it is written with (None: as is).
def _column(round_to: int | None = None) -> Any:
    return field(metadata={"metrics_column": True, "round": round_to})


@dataclass(frozen=True)
class RunStarted:
    """The model is loaded and the first step is about to run."""

    run_id: str
    run_dir: str
    classes: list[str]
    num_train: int
    num_val: int
    epochs: int
    total_steps: int
    """Optimizer steps the whole run will take."""
    device: str
    precision: str
    trainable_params: int
    total_params: int
    notes: list[str] = field(default_factory=list)
    resumed_from_step: int | None = None
    """The optimizer step a resumed run continues after; None for a fresh run."""
    val_baseline: dict[str, Any] | None = None
    """The validation split's majority-class rate (:meth:`vitft_app.baseline.Baseline.to_dict`);
    None for multi-label data or an empty split."""


@dataclass(frozen=True)
class StepLogged:
    """Training loss at a logging step (every ``log_every_steps`` optimizer steps)."""

    step: int = _column()
    """Optimizer steps done so far (1-based)."""
    epoch: float = _column(4)
    """Fractional epoch, e.g. 1.5 = halfway through the second epoch."""
    loss: float = _column()
    """Per-sample mean training loss since the previous logging step."""
    lr: float = _column()
    images_per_sec: float = _column(2)
    eta_s: float
    """Estimated seconds to the end of the run (training and remaining evaluations)."""


@dataclass(frozen=True)
class StepProgress:
    """Progress after an optimizer step, at most about once a second and independent of
    ``log_every_steps`` (no loss: reading it would be a device sync), so a live view moves from
    the first step."""

    step: int
    """Optimizer steps done so far (1-based)."""
    epoch: float
    """Fractional epoch."""
    images_per_sec: float
    """Training images per second since this (or the resumed) run's first step."""
    eta_s: float
    """Estimated seconds to the end of the training steps."""


@dataclass(frozen=True)
class EvalDone:
    """Validation at the end of an epoch."""

    step: int = _column()
    epoch: int = _column()
    """Completed epochs (1-based)."""
    train_loss: float = _column()
    train_accuracy: float = _column()
    """Accuracy on the (augmented) training batches seen during the epoch."""
    val_loss: float = _column()
    val_accuracy: float = _column()
    best_val_accuracy: float
    """Validation accuracy of the best epoch so far (the epoch with the best monitored metric)."""
    is_best: bool
    """True when this evaluation set a new best and the model was saved."""
    val_f1_macro: float | None = field(default=None, metadata={"metrics_column": True, "round": None})
    """Macro-F1 over classes (single-label: of the argmax; multi-label: at threshold 0.5)."""
    val_f1_micro: float | None = None
    """Micro-F1 at threshold 0.5 (multi-label only)."""
    val_map: float | None = field(default=None, metadata={"metrics_column": True, "round": None})
    """Mean average precision over labels (multi-label only)."""
    monitor: str = "val_accuracy"
    """Metric that picks the best model and drives early stopping (val_map for multi-label)."""
    best_metric: float | None = None
    """Best value of ``monitor`` so far."""
    epochs_without_improvement: int = 0
    early_stopping_patience: int = 0
    """0 when early stopping is off; the run stops when ``epochs_without_improvement`` reaches it."""


@dataclass(frozen=True)
class LogMessage:
    """A line for the run log (skipped file, model note, ...)."""

    text: str


@dataclass(frozen=True)
class RunFinished:
    """The loop ended on its own (``completed``) or because Stop was pressed (``stopped``)."""

    status: Literal["completed", "stopped"]
    best_val_accuracy: float | None
    duration_s: float
    reason: str = ""
    """Why a run ended early, e.g. ``"early stopping at epoch 7"``; empty otherwise."""
    step: int | None = None
    """Optimizer steps done (a stopped run resumes after this step)."""
    monitor: str = "val_accuracy"
    """The metric that picked the best model (``val_map`` for multi-label)."""
    best_metric: float | None = None
    """Best value of ``monitor``."""


@dataclass(frozen=True)
class RunFailed:
    """An exception ended the run; ``error`` is one line for people, ``traceback`` the details."""

    error: str
    traceback: str


Event = Union[RunStarted, StepProgress, StepLogged, EvalDone, LogMessage, RunFinished, RunFailed]
Emit = Callable[[Event], None]


def event_to_dict(event: Event) -> dict[str, Any]:
    """``{"event": class name, **fields}`` for logs and JSON output."""
    return {"event": type(event).__name__, **asdict(event)}


#: Events that append a row to ``metrics.csv``, by the row's ``kind``.
METRICS_EVENTS: dict[str, type] = {"train": StepLogged, "eval": EvalDone}


def metrics_columns() -> list[str]:
    """The columns of ``metrics.csv``: ``kind``, the fields of :data:`METRICS_EVENTS` marked as
    columns (in declaration order, each once), then ``time_s`` (seconds since the run started)."""
    columns = ["kind"]
    for event_type in METRICS_EVENTS.values():
        columns += [f.name for f in fields(event_type) if f.metadata.get("metrics_column") and f.name not in columns]
    return [*columns, "time_s"]


def metrics_row(event: StepLogged | EvalDone) -> dict[str, Any]:
    """The ``metrics.csv`` row of an event (without ``time_s``), values rounded as declared."""
    kind = next(name for name, event_type in METRICS_EVENTS.items() if isinstance(event, event_type))
    row: dict[str, Any] = {"kind": kind}
    for f in fields(event):
        if f.metadata.get("metrics_column"):
            value, digits = getattr(event, f.name), f.metadata.get("round")
            row[f.name] = round(value, digits) if digits is not None and value is not None else value
    return row
