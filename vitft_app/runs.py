"""The run folder: the contract between training, the UI, the CLI and prediction.

``runs/<run-id>/`` holds ``config.json`` (the TrainConfig), ``status.json`` (live state),
``metrics.csv`` (a row per logging step and per evaluation, appended as it goes), ``train.log``
and ``model/`` (the best model so far, ``save_pretrained`` model and image processor). Files are
written atomically (temp file, then ``os.replace``), so a reader never sees half a file and a
crash never leaves a half-written model.
"""

from __future__ import annotations

import logging
import csv
import io
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from .config import TrainConfig
from .events import (
    EvalDone,
    Event,
    LogMessage,
    RunFailed,
    RunFinished,
    RunStarted,
    StepLogged,
    StepProgress,
    metrics_columns,
    metrics_row,
)
from .run_status import RunStatus
from .checkpoint import disk_full_error

logger = logging.getLogger(__name__)

#: Columns of ``metrics.csv``: ``kind`` ("train": a logging step, "eval": the end of an epoch), the
#: event fields marked as columns (:func:`vitft_app.events.metrics_columns`), ``time_s``.
METRICS_COLUMNS = metrics_columns()
#: Created in a run folder by the app to stop a run it launched as a separate process (the
#: ``vitft train`` process watches for it).
STOP_FILE = "STOP"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to a temp file beside ``path`` and renames it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_folder_atomically(write: Callable[[Path], Any], dest: str | os.PathLike, what: str = "the best model") -> None:
    """``write(tmp_folder)`` into a temp folder beside ``dest``, then swap it into ``dest``.

    The previous ``dest`` is renamed aside and deleted only after the new folder is in place, so
    at every moment either the old or the new complete folder exists (:func:`model_dir` finds the
    aside copy if a crash hit between the two renames).

    Args:
        write: fills the folder it is given (e.g. a ``save_pretrained``).
        dest: the folder to replace.
        what: names the folder in a disk-full message.

    Raises:
        OSError: as :func:`disk_full_error` when the disk is full; other errors of ``write``.
    """
    dest = Path(dest)

    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    except OSError as exc:
        raise disk_full_error(exc, what, dest.parent) from exc
    try:
        write(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous folder is untouched
        if isinstance(exc, OSError):
            raise disk_full_error(exc, what, dest.parent) from exc
        raise
    os.chmod(tmp, 0o755)  # mkdtemp creates 0700
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def save_model_atomically(model: Any, processor: Any, dest: str | os.PathLike) -> None:
    """``save_pretrained`` the model and processor, swapped into ``dest`` by
    :func:`save_folder_atomically` (the old or the new complete model exists at every moment)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    save_folder_atomically(write, dest)


def is_model_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a ``save_pretrained`` model (a config and weights).

    A run folder has a ``config.json`` too (the TrainConfig), so the weights decide.
    """
    path = Path(path)
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    return (path / "config.json").is_file() and any((path / name).is_file() for name in weights)


def kept_model_note(run_dir: str | os.PathLike | None) -> str:
    """What a stopped or failed run keeps, said truthfully: ``"the best model so far stays saved"``
    when the run has saved one (:func:`model_dir`), else that no epoch has finished yet and no
    model is saved (a Stop or a failure in the first epoch keeps only the checkpoint)."""
    if run_dir is not None and model_dir(run_dir) is not None:
        return "the best model so far stays saved"
    return "no epoch has finished yet, so no model is saved"


def model_dir(run_dir: str | os.PathLike) -> Path | None:
    """The run's saved model folder, or None when no model was saved yet."""
    run_dir = Path(run_dir)
    for candidate in (run_dir / "model", run_dir / ".model.old"):
        if is_model_folder(candidate):
            return candidate
    return None


def saved_model_readable(run_dir: str | os.PathLike) -> bool:
    """True when the run has a saved model whose weights files open: every ``*.safetensors`` in
    it has a readable header and tensors that fit in the file (``safetensors.safe_open``; only the
    header is read). False for no model, a cut or damaged weights file, or no weights at all."""
    folder = model_dir(run_dir)
    if folder is None:
        return False
    from safetensors import safe_open

    weights = sorted(folder.glob("*.safetensors"))
    try:
        for path in weights:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
    except Exception:  # noqa: BLE001 - any error reading the header means a damaged file
        return False
    return bool(weights)


def append_run_log(run_dir: str | os.PathLike, text: str) -> None:
    """Appends ``text`` to the run's ``train.log`` as one timestamped entry (one write, so lines of
    the training thread and of the app do not interleave within an entry).

    Raises:
        OSError: the folder is gone or the disk is full.
    """
    line = f"{datetime.now().isoformat(timespec='seconds')} {text}\n"
    with open(Path(run_dir) / "train.log", "a", encoding="utf-8") as handle:
        handle.write(line)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def is_run_dir(path: str | os.PathLike) -> bool:
    """True for a vitft run folder (``config.json`` and ``status.json``), as opposed to a plain
    ``save_pretrained`` folder, which has a ``config.json`` too."""
    path = Path(path)
    return (path / "config.json").is_file() and (path / "status.json").is_file()


def read_status(run_dir: str | os.PathLike) -> RunStatus:
    """Reads ``status.json``; a ``running`` run whose process is gone reads as ``interrupted``.

    Returns:
        The :class:`~vitft_app.run_status.RunStatus` (empty, and falsy, when the file is missing
        or unreadable).
    """
    status = read_status_raw(Path(run_dir))
    if status.is_active:
        pid = status.pid
        if not isinstance(pid, int) or (pid != os.getpid() and not _pid_alive(pid)):
            status.status = "interrupted"
    return status


def read_metrics(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Reads ``metrics.csv`` (a partially written last line is skipped).

    Returns:
        A DataFrame with :data:`METRICS_COLUMNS` (empty when no row was written yet).
    """
    path = Path(run_dir) / "metrics.csv"
    try:
        frame = pd.read_csv(path, on_bad_lines="skip")
    except (OSError, ValueError, pd.errors.EmptyDataError):
        return pd.DataFrame(columns=METRICS_COLUMNS)
    return frame


def truncate_metrics(run_dir: str | os.PathLike, after_step: int) -> int:
    """Drops ``metrics.csv`` rows logged after optimizer step ``after_step`` (atomic rewrite), so
    a resumed run's curves continue from its checkpoint without duplicate steps.

    Returns:
        The number of rows dropped.
    """
    path = Path(run_dir) / "metrics.csv"
    frame = read_metrics(run_dir)
    if frame.empty or "step" not in frame:
        return 0
    keep = frame[pd.to_numeric(frame["step"], errors="coerce").fillna(0) <= after_step]
    keep = keep.reindex(columns=METRICS_COLUMNS)
    atomic_write_text(path, keep.to_csv(index=False))
    return len(frame) - len(keep)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:40] or "run"


@dataclass(frozen=True)
class RunInfo:
    """One row of the runs list."""

    run_id: str
    path: str
    status: str
    model: str
    data_dir: str
    best_val_accuracy: float | None
    started_at: str
    has_model: bool


class RunStore:
    """The runs folder: creates run folders and lists them.

    Args:
        root: the runs folder (created when missing).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def create_run(self, config: TrainConfig) -> Path:
        """Makes ``<root>/<timestamp>-<name>/`` with ``config.json`` and a ``starting`` status.

        The run id is ``YYYYmmdd-HHMMSS-<run_name or model name>``, with ``-2``, ``-3`` ... when
        taken.
        """
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = f"{stamp}-{_slug(config.run_name or Path(config.model).name)}"
        for n in range(1, 1000):
            run_dir = self.root / (base if n == 1 else f"{base}-{n}")
            try:
                run_dir.mkdir(parents=True)
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover - a thousand runs in one second
            raise RuntimeError("could not create a unique run folder")
        atomic_write_text(run_dir / "config.json", config.to_json())
        RunRecorder(run_dir).write_status(status="starting")
        return run_dir

    def list_runs(self) -> list[RunInfo]:
        """All run folders, newest first."""
        runs = []
        for path in self.root.iterdir() if self.root.is_dir() else []:
            if not (path / "config.json").exists():
                continue
            status = read_status(path)
            try:
                config = json.loads((path / "config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                logger.warning("run %s: config.json unreadable (%s); listed without its settings", path.name, exc)
                config = {}
            runs.append(
                RunInfo(
                    run_id=path.name,
                    path=str(path),
                    status=status.status or "unknown",
                    model=str(config.get("model", "")),
                    data_dir=str(config.get("data_dir", "")),
                    best_val_accuracy=status.best_val_accuracy,
                    started_at=status.started_at or "",
                    has_model=model_dir(path) is not None,
                )
            )
        return sorted(runs, key=lambda r: r.run_id, reverse=True)

    def runs_with_model(self) -> list[RunInfo]:
        """Runs that saved a model, newest first (the Predict tab's choices)."""
        return [r for r in self.list_runs() if r.has_model]


class RunRecorder:
    """Writes events into a run folder: ``status.json``, ``metrics.csv`` and ``train.log``.

    An instance is the ``emit`` callable the training loop gets. Thread-safe.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self._lock = threading.Lock()
        self._t0 = time.time()
        self.status: RunStatus = read_status_raw(self.run_dir) or RunStatus(
            run_id=self.run_dir.name,
            status="starting",
            pid=os.getpid(),
            started_at=datetime.now().isoformat(timespec="seconds"),
        )

    def write_status(self, **changes: Any) -> None:
        """Sets :class:`~vitft_app.run_status.RunStatus` fields and rewrites ``status.json`` (atomic)."""
        with self._lock:
            self.status.update(**changes)
            atomic_write_text(self.run_dir / "status.json", self.status.to_json())

    def log(self, text: str) -> None:
        """Appends a timestamped line to ``train.log``."""
        with self._lock:
            append_run_log(self.run_dir, text)

    def _append_metrics(self, row: dict[str, Any]) -> None:
        path = self.run_dir / "metrics.csv"
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRICS_COLUMNS)
        with self._lock:
            if not path.exists():
                writer.writeheader()
            writer.writerow({**row, "time_s": round(time.time() - self._t0, 3)})
            with open(path, "a", encoding="utf-8", newline="") as handle:
                handle.write(buffer.getvalue())  # one write per row: readers see whole lines

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self._t0 = time.time()
            if event.resumed_from_step is not None:
                # Continue the time axis of the resumed run's metrics.
                previous = pd.to_numeric(read_metrics(self.run_dir).get("time_s", pd.Series(dtype=float)), errors="coerce")
                self._t0 -= float(previous.max()) if previous.notna().any() else 0.0
            self.write_status(
                status="running",
                error=None,
                resumed_from_step=event.resumed_from_step,
                pid=os.getpid(),
                classes=event.classes,
                num_train=event.num_train,
                num_val=event.num_val,
                epochs=event.epochs,
                total_steps=event.total_steps,
                device=event.device,
                precision=event.precision,
                trainable_params=event.trainable_params,
                total_params=event.total_params,
                notes=event.notes,
                val_baseline=event.val_baseline,
                # A resumed run shows its checkpoint's step at once, not "step 0".
                step=event.resumed_from_step or 0,
                epoch=(event.resumed_from_step or 0) * event.epochs / max(event.total_steps, 1),
                eta_s=None,
            )
            self.log(
                f"started: {event.num_train} train / {event.num_val} val images, {len(event.classes)} classes,"
                f" {event.total_steps} optimizer steps on {event.device} ({event.precision})"
            )
            for note in event.notes:
                self.log(note)
        elif isinstance(event, StepProgress):
            self.write_status(step=event.step, epoch=event.epoch, images_per_sec=event.images_per_sec,
                              eta_s=event.eta_s)
        elif isinstance(event, StepLogged):
            self._append_metrics(metrics_row(event))
            self.write_status(step=event.step, epoch=event.epoch, loss=event.loss, lr=event.lr)
            self.log(f"step {event.step} epoch {event.epoch:.2f} loss {event.loss:.4f} lr {event.lr:.3g}"
                     f" {event.images_per_sec:.1f} img/s")
        elif isinstance(event, EvalDone):
            self._append_metrics(metrics_row(event))
            self.write_status(best_val_accuracy=event.best_val_accuracy, val_accuracy=event.val_accuracy,
                              val_f1_macro=event.val_f1_macro, val_map=event.val_map, monitor=event.monitor,
                              best_metric=event.best_metric, epoch=float(event.epoch), step=event.step,
                              epochs_without_improvement=event.epochs_without_improvement,
                              early_stopping_patience=event.early_stopping_patience)
            extra = f" mAP {event.val_map:.4f}" if event.val_map is not None else ""
            self.log(f"epoch {event.epoch}: train loss {event.train_loss:.4f} acc {event.train_accuracy:.4f},"
                     f" val loss {event.val_loss:.4f} acc {event.val_accuracy:.4f}{extra}"
                     + (" (best, model saved)" if event.is_best else ""))
        elif isinstance(event, LogMessage):
            self.log(event.text)
        elif isinstance(event, RunFinished):
            steps = {} if event.step is None else {"step": event.step}
            self.write_status(status=event.status, finished_at=datetime.now().isoformat(timespec="seconds"),
                              duration_s=event.duration_s, eta_s=0, reason=event.reason, **steps)
            self.log(f"{event.status} after {event.duration_s:.1f} s; best val accuracy {event.best_val_accuracy}"
                     + (f" ({event.reason})" if event.reason else ""))
        elif isinstance(event, RunFailed):
            # The status first, and tolerant of a full disk: the run must not stay "running".
            try:
                self.write_status(status="failed", error=event.error,
                                  finished_at=datetime.now().isoformat(timespec="seconds"))
            finally:
                try:
                    self.log(f"failed: {event.error}\n{event.traceback}")
                except OSError as exc:  # train.log is a copy; the status holds the error
                    logger.warning("run %s failed and its train.log cannot be written: %s", self.run_dir.name, exc)


def read_status_raw(run_dir: Path) -> RunStatus:
    """``status.json`` as written (no interrupted detection); an empty status when missing or
    unreadable."""
    try:
        return RunStatus.from_json((Path(run_dir) / "status.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return RunStatus()
