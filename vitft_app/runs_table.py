"""Every run of a runs folder as one table, plus the run-management actions behind the Runs tab.

A run's display name and its sweep live in ``RUN_DIR/meta.json`` (``{"name": ..., "sweep": ...,
"trial": ..., "retrained_from": ...}``; the last names the run whose fixed data this one trained
on), written atomically; the folder itself is never renamed, so paths held by a running job, the
Predict tab or a shell stay valid.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from .baseline import run_baseline
from .run_status import RunStatus, as_run_status
from .runs import atomic_write_text, is_run_dir, read_metrics, read_status

META_FILE = "meta.json"

#: Columns of :func:`runs_table`, in order (``path`` is last; the UI may hide it).
RUN_COLUMNS = [
    "run_id", "name", "status", "dataset", "model", "freeze_depth", "lr", "batch_size", "epochs", "augment",
    "best_val_accuracy", "val_baseline", "baseline_class", "macro_f1", "duration", "date", "sweep", "retrained_from", "kind",
    "path",
]


def read_meta(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``meta.json`` of a run (display name, sweep), or ``{}`` when missing or unreadable."""
    try:
        meta = json.loads((Path(run_dir) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def update_meta(run_dir: str | os.PathLike, **changes: Any) -> dict[str, Any]:
    """Merges ``changes`` into the run's ``meta.json`` (atomic write); a None value removes a key.

    Returns:
        The new meta dict.
    """
    meta = read_meta(run_dir)
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    atomic_write_text(Path(run_dir) / META_FILE, json.dumps(meta, indent=2))
    return meta


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's ``config.json`` as a dict (``{}`` when unreadable)."""
    try:
        config = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def read_macro_f1(run_dir: str | os.PathLike) -> float | None:
    """Macro-F1 on the validation split: of the latest evaluation (``eval/val/metrics.json``,
    written by ``vitft evaluate`` or the Evaluate tab), else of the best epoch logged in
    ``metrics.csv`` (``val_f1_macro`` of the epoch with the best ``val_accuracy``, or ``val_map``
    for multi-label); None when neither exists (runs of older versions)."""
    try:
        metrics = json.loads((Path(run_dir) / "eval" / "val" / "metrics.json").read_text(encoding="utf-8"))
        return float(metrics["macro_f1"])
    except (OSError, ValueError, KeyError, TypeError):
        pass

    frame = read_metrics(run_dir)
    if frame.empty or "val_f1_macro" not in frame:
        return None
    evals = frame[frame["kind"] == "eval"].dropna(subset=["val_f1_macro"])
    if evals.empty:
        return None
    monitor = "val_map" if "val_map" in evals and evals["val_map"].notna().any() else "val_accuracy"
    return float(evals.loc[evals[monitor].astype(float).idxmax(), "val_f1_macro"])


def _parse_time(text: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text))
    except (TypeError, ValueError):
        return None


def run_duration_s(status: RunStatus | Mapping[str, Any]) -> float | None:
    """Seconds a run took (``duration_s`` when it finished, else finish or now minus start)."""
    status = as_run_status(status)
    if status.duration_s is not None:
        return float(status.duration_s)
    started = _parse_time(status.started_at)
    if started is None:
        return None
    end = _parse_time(status.finished_at)
    if end is None:
        if not status.is_active:
            return None  # interrupted: when it died is unknown
        end = datetime.now()
    return max((end - started).total_seconds(), 0.0)


def format_duration(seconds: float | None) -> str:
    """``"m:ss"`` or ``"h:mm:ss"``; empty for None."""
    if seconds is None or pd.isna(seconds):
        return ""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def run_row(run_dir: str | os.PathLike) -> dict[str, Any]:
    """One row of :func:`runs_table` for a run folder."""
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    config = read_config(run_dir)
    meta = read_meta(run_dir)
    started = _parse_time(status.started_at)
    data_dir = str(config.get("data_dir", ""))
    return {
        "run_id": run_dir.name,
        "name": meta.get("name") or run_dir.name,
        "status": status.status or "unknown",
        "dataset": Path(data_dir).name or data_dir,
        "model": Path(str(config.get("model", ""))).name or str(config.get("model", "")),
        "freeze_depth": config.get("freeze_depth"),
        "lr": config.get("lr"),
        "batch_size": config.get("batch_size"),
        "epochs": config.get("epochs"),
        "augment": config.get("augment"),
        "best_val_accuracy": status.best_val_accuracy,
        "val_baseline": baseline.rate if (baseline := run_baseline(status)) is not None else None,
        "baseline_class": baseline.majority_class if baseline is not None else "",
        "macro_f1": read_macro_f1(run_dir),
        "duration": format_duration(run_duration_s(status)),
        "date": started.strftime("%Y-%m-%d %H:%M") if started else "",
        "sweep": meta.get("sweep") or "",
        "retrained_from": meta.get("retrained_from") or "",
        "kind": config.get("kind") or "train",  # "zero-shot": a baseline of vitft_app.zero_shot, no epochs
        "path": str(run_dir),
    }


def list_run_dirs(runs_dir: str | os.PathLike) -> list[Path]:
    """The run folders directly under ``runs_dir`` (``config.json`` and ``status.json``), by name."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and is_run_dir(p)), key=lambda p: p.name)


def runs_table(runs_dir: str | os.PathLike) -> pd.DataFrame:
    """Every run of the runs folder, newest first.

    Args:
        runs_dir: the runs folder.

    Returns:
        A DataFrame with :data:`RUN_COLUMNS`: status is ``running``, ``completed``, ``stopped``,
        ``failed`` or ``interrupted`` (a running run whose process is gone, see
        :func:`~vitft_app.runs.read_status`); ``best_val_accuracy`` in 0..1 and ``val_baseline`` (the majority-class rate
        of the validation split, class ``baseline_class``; NaN for older runs); ``macro_f1`` from the
        run's validation evaluation (NaN when never evaluated); ``duration`` as ``m:ss``; ``kind``
        ``"train"``, or ``"zero-shot"`` for a :mod:`~vitft_app.zero_shot` baseline (no epochs, lr, model).
    """
    rows = [run_row(path) for path in reversed(list_run_dirs(runs_dir))]
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def filter_runs(
    table: pd.DataFrame,
    text: str | None = None,
    status: str | None = None,
    sort_by: str | None = None,
    descending: bool = True,
) -> pd.DataFrame:
    """Filters and sorts a :func:`runs_table`.

    Args:
        table: the runs table.
        text: case-insensitive substring matched against run id, name, dataset, model, sweep.
        status: keep only this status (None, "" or "all" keeps every run).
        sort_by: a column name (None keeps the table's order, newest first).
        descending: sort direction; missing values always go last.

    Returns:
        A new DataFrame with a fresh index.
    """
    frame = table
    if text and text.strip():
        needle = text.strip().lower()
        haystack = frame[["run_id", "name", "dataset", "model", "sweep"]].astype(str).agg(" ".join, axis=1).str.lower()
        frame = frame[haystack.str.contains(needle, regex=False)]
    if status and status != "all":
        frame = frame[frame["status"] == status]
    if sort_by and sort_by in frame.columns:
        frame = frame.sort_values(sort_by, ascending=not descending, na_position="last", kind="stable")
    return frame.reset_index(drop=True)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return path.resolve() != root.resolve()


def rename_run(run_dir: str | os.PathLike, name: str) -> str:
    """Sets a run's display name (``meta.json``); the folder keeps its name, even while running.

    Args:
        run_dir: the run folder.
        name: the new name (trimmed; at most 120 characters); empty restores the run id.

    Returns:
        The display name now shown.

    Raises:
        FileNotFoundError: ``run_dir`` is not a run folder.
        ValueError: the name is longer than 120 characters or spans several lines.
    """
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise FileNotFoundError(f"Not a run folder: {run_dir}")
    name = (name or "").strip()
    if len(name) > 120:
        raise ValueError(f"A run name has at most 120 characters, got {len(name)}")
    if "\n" in name or "\r" in name:
        raise ValueError("A run name is one line")
    update_meta(run_dir, name=name or None)
    return name or run_dir.name


def delete_run(run_dir: str | os.PathLike, runs_dir: str | os.PathLike, active_run: str | os.PathLike | None = None) -> None:
    """Deletes a run folder.

    Args:
        run_dir: the run folder to delete.
        runs_dir: the runs folder; ``run_dir`` must be inside it.
        active_run: the run folder of this process's running job, if any.

    Raises:
        FileNotFoundError: ``run_dir`` is not a run folder.
        ValueError: ``run_dir`` is outside ``runs_dir``, or is the running job, or its status says
            a live process is training it (another app or ``vitft train``).
    """
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise FileNotFoundError(f"Not a run folder: {run_dir}")
    if not _inside(run_dir, Path(runs_dir)):
        raise ValueError(f"{run_dir} is not inside the runs folder {runs_dir}")
    if active_run is not None and Path(active_run).resolve() == run_dir.resolve():
        raise ValueError(f"{run_dir.name} is training right now: press Stop and wait for it to end first.")
    if read_status(run_dir).is_active:
        raise ValueError(f"{run_dir.name} is being trained by another process; stop that process first.")
    shutil.rmtree(run_dir)


def metrics_by_run(run_dirs: Iterable[str | os.PathLike]) -> dict[str, pd.DataFrame]:
    """``{display name: metrics.csv frame}`` for several runs (the input of
    :func:`~vitft_app.plots.figure_compare`); two runs with one name get their run id appended."""
    result: dict[str, pd.DataFrame] = {}
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        label = read_meta(run_dir).get("name") or run_dir.name
        if label in result:
            label = f"{label} ({run_dir.name})"
        result[label] = read_metrics(run_dir)
    return result


#: Rows of :func:`compare_configs` that are outcomes, not settings.
RESULT_ROWS = ("status", "best_val_accuracy", "macro_f1", "sweep")


def compare_configs(run_dirs: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """The runs' configs side by side: one row per setting, one column per run.

    Returns:
        A DataFrame with ``setting``, one column per run (display name) and ``differs`` (True
        when the runs do not all have the same value). Rows that differ come first. Also holds
        the :data:`RESULT_ROWS` (status, best validation accuracy, macro-F1, sweep).
    """
    columns: dict[str, dict[str, Any]] = {}
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        row = run_row(run_dir)
        values = {k: ("" if v is None else v) for k, v in read_config(run_dir).items()}
        values |= {key: row[key] for key in RESULT_ROWS}
        label = row["name"] if row["name"] not in columns else f"{row['name']} ({run_dir.name})"
        columns[label] = values
    settings: list[str] = []
    for values in columns.values():
        settings += [k for k in values if k not in settings]
    frame = pd.DataFrame({"setting": settings})
    for label, values in columns.items():
        frame[label] = [_cell(values.get(k)) for k in settings]
    run_columns = list(columns)
    frame["differs"] = [len({str(v) for v in frame.loc[i, run_columns]}) > 1 for i in frame.index] if run_columns else False
    return frame.sort_values("differs", ascending=False, kind="stable").reset_index(drop=True)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def style_differences(frame: pd.DataFrame, color: str = "#fff3bf") -> Any:
    """A pandas ``Styler`` of :func:`compare_configs` with the differing rows highlighted
    (Gradio's ``Dataframe`` renders Styler colors)."""

    def highlight(row: pd.Series) -> list[str]:
        return [f"background-color: {color}" if row.get("differs") else ""] * len(row)

    return frame.style.apply(highlight, axis=1)
