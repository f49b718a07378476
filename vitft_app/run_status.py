"""The typed content of ``runs/<id>/status.json``: :class:`RunStatus`.

``status.json`` is the run's live state, rewritten (atomically) by
:class:`vitft_app.runs.RunRecorder` as the training loop emits events, and read by the Train,
Runs, Predict and Evaluate tabs, the CLI, the model card, the demo page and sweeps. Readers use
attributes (``status.best_val_accuracy``); a key this version does not know (a newer vitft, a
hand edit) is kept in :attr:`RunStatus.extra` and written back unchanged, and a key an older
file lacks reads as None.

For code written against the dict of earlier versions, a :class:`RunStatus` also reads like a
read-only mapping of the keys that are set (``status["status"]``, ``status.get("step", 0)``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Statuses a run can have; ``interrupted`` is derived when the process that ran it is gone.
STATUSES = ("starting", "running", "completed", "stopped", "failed", "interrupted")
#: The statuses of a run that has ended (whatever way).
ENDED_STATUSES = ("completed", "stopped", "failed", "interrupted")


@dataclass
class RunStatus(Mapping):
    """One run's state as recorded in ``status.json``; every field is None until written.

    Attributes are grouped by the event that writes them (:mod:`vitft_app.events`).
    """

    # --- the run folder (RunStore.create_run) and the process
    run_id: str | None = None
    status: str | None = None
    """One of :data:`STATUSES` (``interrupted`` only as read by :func:`vitft_app.runs.read_status`)."""
    pid: int | None = None
    """The process training the run (a dead pid turns ``running`` into ``interrupted``)."""
    started_at: str | None = None
    """ISO time, seconds."""
    # --- RunStarted
    resumed_from_step: int | None = None
    classes: list[str] | None = None
    num_train: int | None = None
    num_val: int | None = None
    epochs: int | None = None
    total_steps: int | None = None
    device: str | None = None
    precision: str | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    notes: list[str] | None = None
    val_baseline: dict[str, Any] | None = None
    """:meth:`vitft_app.baseline.Baseline.to_dict` of the validation split."""
    # --- StepProgress / StepLogged
    step: int | None = None
    epoch: float | None = None
    images_per_sec: float | None = None
    eta_s: float | None = None
    """Seconds to the end of the run; 0 once finished."""
    loss: float | None = None
    lr: float | None = None
    # --- EvalDone
    best_val_accuracy: float | None = None
    """0..1."""
    val_accuracy: float | None = None
    val_f1_macro: float | None = None
    val_map: float | None = None
    monitor: str | None = None
    best_metric: float | None = None
    epochs_without_improvement: int | None = None
    early_stopping_patience: int | None = None
    # --- RunFinished / RunFailed
    finished_at: str | None = None
    duration_s: float | None = None
    reason: str | None = None
    error: str | None = None
    """One line for people (the traceback is in ``train.log``)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys of the file this version does not know, kept as read and written back."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The known keys of ``status.json`` (every field but :attr:`extra`)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "extra")

    @classmethod
    def from_dict(cls, values: Any) -> RunStatus:
        """Builds a status from a parsed ``status.json``; anything but a JSON object reads as an
        empty status (a damaged file must not break the runs list)."""
        if isinstance(values, RunStatus):
            return dataclasses.replace(values, extra=dict(values.extra))
        if not isinstance(values, Mapping):
            return cls()
        known = set(cls.field_names())
        return cls(**{k: v for k, v in values.items() if k in known},
                   extra={k: v for k, v in values.items() if k not in known})

    @classmethod
    def from_json(cls, text: str) -> RunStatus:
        """Parses ``status.json`` text.

        Raises:
            ValueError: not valid JSON.
        """
        return cls.from_dict(json.loads(text))

    def to_dict(self) -> dict[str, Any]:
        """The keys that are set (None fields left out), then :attr:`extra`."""
        values = {name: getattr(self, name) for name in self.field_names() if getattr(self, name) is not None}
        return {**values, **{k: v for k, v in self.extra.items() if k not in values}}

    def to_json(self) -> str:
        """``to_dict()`` as indented JSON (the content of ``status.json``)."""
        return json.dumps(self.to_dict(), indent=2)

    def update(self, **changes: Any) -> None:
        """Sets fields by name (None clears one); an unknown name goes to :attr:`extra`."""
        known = set(self.field_names())
        for name, value in changes.items():
            if name in known:
                setattr(self, name, value)
            elif value is None:
                self.extra.pop(name, None)
            else:
                self.extra[name] = value

    @property
    def is_active(self) -> bool:
        """True while the run is starting or running (as read: a dead process is ``interrupted``)."""
        return self.status in ("starting", "running")

    # Read-only mapping of the keys that are set, for callers of the former dict.
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __bool__(self) -> bool:
        """False for an empty status (no ``status.json``, or an unreadable one)."""
        return len(self) > 0


def as_run_status(status: RunStatus | Mapping[str, Any] | None) -> RunStatus:
    """``status`` as a :class:`RunStatus` (a dict from an older caller or a test is converted)."""
    if isinstance(status, RunStatus):
        return status
    return RunStatus.from_dict(status or {})
