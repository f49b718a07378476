"""Optional experiment tracking: the run's metrics also go to TensorBoard or MLflow.

A tracker is one more listener of the training loop's events (see :mod:`vitft_app.events`): it
writes the same numbers the run folder's ``metrics.csv`` gets, ``StepLogged`` (loss, learning
rate, images/s at each logging step) and ``EvalDone`` (train and validation loss and accuracy at
each epoch), with the optimizer step as the x axis.

- ``tensorboard``: event files in ``RUN_DIR/tensorboard`` (``tensorboard --logdir runs`` shows
  every run), written with ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard``
  package).
- ``mlflow``: one MLflow run per vitft run in the experiment ``vitft``, in a local store inside
  the run folder, ``RUN_DIR/mlruns/mlflow.db`` (SQLite; artifacts in ``RUN_DIR/mlruns/artifacts``),
  unless ``MLFLOW_TRACKING_URI`` is set (needs ``mlflow`` or ``mlflow-skinny``). SQLite rather than
  the plain ``./mlruns`` file store because MLflow 3 put the file store in maintenance mode and
  refuses it by default; ``mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlruns/mlflow.db`` shows it.

Both packages are optional (``pip install -e ".[tracking]"``); :func:`check_report_to` says
clearly which one is missing before a run starts.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Literal, get_args

from .events import EvalDone, Event, RunFailed, RunFinished, RunStarted, StepLogged

ReportTo = Literal["none", "tensorboard", "mlflow"]
REPORT_TO_CHOICES: tuple[str, ...] = get_args(ReportTo)

#: The module each backend imports, and what to install when it is missing.
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow (or mlflow-skinny)")}


class TrackingUnavailable(ValueError):
    """The tracking backend's package is not installed (the message says what to install)."""


def check_report_to(report_to: str | None) -> str:
    """Checks a ``--report-to`` value and that its package is installed.

    Args:
        report_to: ``"none"`` (or None / empty), ``"tensorboard"`` or ``"mlflow"``.

    Returns:
        The normalized value.

    Raises:
        ValueError: an unknown value.
        TrackingUnavailable: the backend's package cannot be imported.
    """
    value = (report_to or "none").strip().lower()
    if value not in REPORT_TO_CHOICES:
        raise ValueError(f"report_to must be one of {list(REPORT_TO_CHOICES)}, got {report_to!r}")
    if value != "none":
        module, package = _PACKAGES[value]
        if importlib.util.find_spec(module) is None:
            raise TrackingUnavailable(
                f"--report-to {value} needs the {package} package, which is not installed: "
                f'pip install {package.split(" ")[0]}   (or pip install -e ".[tracking]")'
            )
    return value


class Tracker:
    """Base tracker: an ``emit`` listener with a ``close()``. Subclasses write somewhere."""

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.started(event)
        elif isinstance(event, StepLogged):
            self.scalars({"train/loss": event.loss, "train/lr": event.lr,
                          "train/images_per_sec": event.images_per_sec}, event.step)
        elif isinstance(event, EvalDone):
            self.scalars({"eval/train_loss": event.train_loss, "eval/train_accuracy": event.train_accuracy,
                          "eval/val_loss": event.val_loss, "eval/val_accuracy": event.val_accuracy,
                          "eval/best_val_accuracy": event.best_val_accuracy}, event.step)
        elif isinstance(event, RunFinished):
            self.finished(event.status)
        elif isinstance(event, RunFailed):
            self.finished("failed")

    def started(self, event: RunStarted) -> None:
        """The run started (the model is loaded)."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Writes ``{tag: value}`` at optimizer step ``step``."""

    def finished(self, status: str) -> None:
        """The run ended with ``status`` (completed, stopped, failed)."""

    def close(self) -> None:
        """Flushes and releases the backend; safe to call twice."""


class TensorBoardTracker(Tracker):
    """Writes scalars to ``RUN_DIR/tensorboard`` with ``torch.utils.tensorboard.SummaryWriter``.

    Args:
        run_dir: the run folder.
        config: the run's settings, written once as a text summary (``config``).
    """

    def __init__(self, run_dir: str | os.PathLike, config: Any = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        if config is not None and hasattr(config, "to_json"):
            self.writer.add_text("config", "```\n" + config.to_json() + "\n```", 0)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)

    def finished(self, status: str) -> None:
        self.writer.add_text("status", status, 0)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowTracker(Tracker):
    """Logs params and metrics to an MLflow run (experiment ``vitft``, run name = the run id).

    Uses ``mlflow.tracking.MlflowClient`` with an explicit URI rather than the global ``mlflow``
    fluent API, so two trackers in one process never share an "active run".

    Args:
        run_dir: the run folder; the store is ``RUN_DIR/mlruns/mlflow.db`` unless
            ``MLFLOW_TRACKING_URI`` is set.
        config: the run's settings, logged as MLflow params.
    """

    def __init__(self, run_dir: str | os.PathLike, config: Any = None):
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir).resolve()
        store = run_dir / "mlruns"
        self.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if not self.tracking_uri:
            store.mkdir(parents=True, exist_ok=True)
            self.tracking_uri = f"sqlite:///{store / 'mlflow.db'}"
            artifacts = (store / "artifacts").as_uri()
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = self.client.get_experiment_by_name("vitft")
        experiment_id = (experiment.experiment_id if experiment
                         else self.client.create_experiment("vitft", artifact_location=artifacts))
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        self._closed = False
        if config is not None and hasattr(config, "to_dict"):
            for key, value in config.to_dict().items():
                self.client.log_param(self.run_id, key, "" if value is None else str(value)[:500])

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            if value is not None:
                self.client.log_metric(self.run_id, tag.replace("/", "_"), float(value), step=step)

    def finished(self, status: str) -> None:
        self._closed = True
        self.client.set_terminated(self.run_id, {"completed": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED"))

    def close(self) -> None:
        if not self._closed:
            self.finished("failed")


def create_tracker(report_to: str | None, run_dir: str | os.PathLike, config: Any = None) -> Tracker | None:
    """The tracker for ``report_to``, or None for ``"none"``.

    Args:
        report_to: ``"none"``, ``"tensorboard"`` or ``"mlflow"``.
        run_dir: the run folder (TensorBoard files and the default MLflow store go inside it).
        config: the run's :class:`~vitft_app.config.TrainConfig` (logged as text / params).

    Returns:
        A callable ``tracker(event)`` with ``close()``, or None.

    Raises:
        ValueError, TrackingUnavailable: see :func:`check_report_to`.
    """
    value = check_report_to(report_to)
    if value == "tensorboard":
        return TensorBoardTracker(run_dir, config)
    if value == "mlflow":
        return MlflowTracker(run_dir, config)
    return None
