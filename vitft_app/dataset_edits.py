"""Fixing a dataset in place, safely: move images to another class, exclude them, undo.

Nothing is ever deleted. For a class-folder dataset:

- *Move to class X* renames ``[<part>/]<class>/.../name.png`` to ``[<part>/]X/name.png`` (``part``
  is ``train``/``val``/``test`` in a split layout, so a file stays in its split);
- *Exclude* renames it to ``_excluded/<its path relative to the dataset>``, e.g.
  ``_excluded/cat/name.png`` or ``_excluded/train/cat/name.png``. The scan ignores ``_excluded/``
  (:data:`vitft_app.data.EXCLUDED_DIR_NAME`).

Every rename is one ``os.replace`` (atomic on one file system), both ends stay inside the
dataset folder, and an existing file at the destination is never overwritten: the whole edit is
refused before anything moves. If a rename fails half-way, the renames already done are reverted.

For a CSV dataset (``labels.csv``) the image files are not touched: the edit writes a new CSV
beside the old one (``labels.edit-<n>.csv``, the label cell changed or the row left out) and
:func:`current_data_path` switches to it; the old CSV stays as it was.

Every edit is one line appended to the journal ``<dataset folder>/.vitft-edits.jsonl`` (JSON
lines; a hidden name, so the scan ignores it). *Undo* reverts the newest edit that is still in
effect and appends an ``undo`` line; nothing in the journal is rewritten. The scan cache is keyed
by path, size and modification time (:class:`vitft_app.filecheck.ScanCache`), so a moved file is
simply seen at its new path by the next scan.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import pandas as pd

from .data import EXCLUDED_DIR_NAME, VAL_DIR_NAMES, _IMAGE_COLUMNS, _LABEL_COLUMNS, find_split_dirs
from .config import TrainConfig
from .runs_table import read_meta

logger = logging.getLogger(__name__)

#: The journal file in the dataset folder (hidden: the scan never reads it).
JOURNAL_NAME = ".vitft-edits.jsonl"

Action = Literal["move", "exclude"]


class EditError(ValueError):
    """An edit was refused (path outside the dataset, name clash, unknown class, ...); nothing changed."""


@dataclass(frozen=True)
class EditResult:
    """What one edit (or one undo) did.

    Attributes:
        edit_id: the journal id of the edit (for an undo: of the edit it reverted).
        action: ``"move"``, ``"exclude"`` or ``"undo"``.
        moved: ``(from, to)`` absolute paths of the renamed files (empty for CSV edits).
        data_path: the dataset to use from now on (the new CSV for CSV datasets).
        message: one human line.
    """

    edit_id: int
    action: str
    moved: tuple[tuple[str, str], ...]
    data_path: str
    message: str


def dataset_root(data_path: str | os.PathLike) -> Path:
    """The dataset folder: ``data_path`` itself, or the folder of a labels CSV (resolved)."""
    path = Path(data_path).expanduser().resolve()
    return path.parent if path.is_file() and path.suffix.lower() == ".csv" else path


def journal_path(data_path: str | os.PathLike) -> Path:
    """``<dataset folder>/.vitft-edits.jsonl``."""
    return dataset_root(data_path) / JOURNAL_NAME


def read_journal(data_path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every journal line as a dict, oldest first (``[]`` without a journal; unreadable lines skipped)."""
    path = journal_path(data_path)
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            logger.warning("Skipping an unreadable line of %s", path)
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def active_edits(data_path: str | os.PathLike) -> list[dict[str, Any]]:
    """The edits still in effect (not undone), oldest first."""
    entries = read_journal(data_path)
    undone = {e.get("undoes") for e in entries if e.get("action") == "undo"}
    return [e for e in entries if e.get("action") in ("move", "exclude") and e.get("id") not in undone]


def _append(data_path: str | os.PathLike, entry: dict[str, Any]) -> None:
    """Appends one JSON line and flushes it to disk (append-only: nothing is rewritten)."""
    with open(journal_path(data_path), "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _next_id(data_path: str | os.PathLike) -> int:
    return 1 + max((int(e.get("id", 0)) for e in read_journal(data_path)), default=0)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_editable(data_path: str | os.PathLike, allowed_roots: Iterable[str | os.PathLike]) -> Path:
    """Refuses a dataset outside every allowed root (the app's data root and the example's copy).

    Returns:
        The dataset folder.

    Raises:
        EditError: the dataset folder is not inside any of ``allowed_roots``.
    """
    root = dataset_root(data_path)
    allowed = [Path(r).expanduser().resolve() for r in allowed_roots]
    if not any(root == a or root.is_relative_to(a) for a in allowed):
        raise EditError(f"{root} is outside the data folders this app may edit ({', '.join(map(str, allowed))}).")
    return root


def _is_csv(data_path: str | os.PathLike) -> bool:
    path = Path(data_path).expanduser()
    return path.is_file() and path.suffix.lower() == ".csv"


def _relative(path: str | os.PathLike, root: Path) -> Path:
    """``path`` relative to ``root`` after resolving links; refuses anything outside ``root``."""
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(root) or real == root:
        raise EditError(f"{path} is not inside the dataset folder {root}.")
    return real.relative_to(root)


def _split_prefix(root: Path) -> set[str]:
    """First path components that name a split (``train``, ``val``..., ``test``), not a class."""
    train, val = find_split_dirs(root)
    names = {"test"}
    if train is not None:
        names.add(train.name)
    if train is not None and val is not None:
        names.add(val.name)
    return names


def _class_of(rel: Path, prefixes: set[str]) -> tuple[Path, str]:
    """``(split prefix or Path(), class folder name)`` of a file path relative to the dataset."""
    parts = rel.parts
    if parts and parts[0] == EXCLUDED_DIR_NAME:
        raise EditError(f"{rel} is already excluded; use Undo to bring it back.")
    if len(parts) >= 3 and parts[0] in prefixes:
        return Path(parts[0]), parts[1]
    if len(parts) >= 2 and parts[0] not in prefixes:
        return Path(), parts[0]
    raise EditError(f"{rel} is not inside a class folder of the dataset.")


def _valid_class_name(name: str) -> str:
    name = str(name or "").strip()
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith(".") \
            or name == EXCLUDED_DIR_NAME or name in VAL_DIR_NAMES or name in ("train", "test"):
        raise EditError(f"{name!r} is not a usable class name.")
    return name


def _rename_all(pairs: Sequence[tuple[Path, Path]]) -> None:
    """Renames every ``(src, dst)`` with ``os.replace``; refuses any clash before the first rename
    and reverts the done renames when one fails."""
    targets = [dst for _, dst in pairs]
    if len(set(targets)) != len(targets):
        raise EditError("Two selected images have the same file name; move them one at a time.")
    for src, dst in pairs:
        if not src.is_file():
            raise EditError(f"{src.name} is no longer at {src.parent} (moved or deleted outside the app?).")
        if os.path.lexists(dst):
            raise EditError(f"{dst} already exists; nothing was moved (rename one of the files first).")
    done: list[tuple[Path, Path]] = []
    try:
        for src, dst in pairs:
            dst.parent.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(dst):  # appeared since the check above
                raise EditError(f"{dst} already exists; nothing was moved.")
            os.replace(src, dst)
            done.append((src, dst))
    except (OSError, EditError) as exc:
        for src, dst in reversed(done):
            os.replace(dst, src)
        if isinstance(exc, EditError):
            raise
        raise EditError(f"Could not move {exc.filename}: {exc.strerror}; nothing was changed.") from exc


def _csv_frame(csv_path: Path) -> tuple[pd.DataFrame, str, str]:
    """The CSV as strings plus its image and label column names."""
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    lower = {c.strip().lower(): c for c in frame.columns}
    image_col = next((lower[c] for c in _IMAGE_COLUMNS if c in lower), None)
    label_col = next((lower[c] for c in _LABEL_COLUMNS if c in lower), None)
    if image_col is None or label_col is None:
        raise EditError(f"{csv_path.name} has no recognizable image and label columns.")
    return frame, image_col, label_col


def current_data_path(data_path: str | os.PathLike) -> str:
    """The dataset to use now: for a labels CSV, the newest CSV written by edits still in effect
    (following the chain from the original CSV); a folder is returned unchanged (resolved)."""
    path = Path(data_path).expanduser().resolve()
    if not _is_csv(path):
        return str(path)
    root = path.parent
    origin = path.name
    for entry in read_journal(path):  # a CSV written by an edit leads back to its original
        if entry.get("csv_to") == path.name and entry.get("csv_origin"):
            origin = entry["csv_origin"]
    newest = origin
    for entry in active_edits(path):
        if entry.get("csv_origin") == origin and entry.get("csv_to"):
            newest = entry["csv_to"]
    return str(root / newest)


def _edit(data_path: str | os.PathLike, paths: Sequence[str], action: Action, class_name: str | None) -> EditResult:
    if not paths:
        raise EditError("Select at least one image first.")
    root = dataset_root(data_path)
    edit_id = _next_id(data_path)
    entry: dict[str, Any] = {"id": edit_id, "time": _now(), "action": action}
    if class_name is not None:
        entry["class"] = class_name
    if _is_csv(data_path):
        current = Path(current_data_path(data_path))
        frame, image_col, label_col = _csv_frame(current)
        if any(sep in cell for cell in frame[label_col] for sep in (";", "|")):
            raise EditError("Editing a multi-label CSV is not supported; edit the CSV itself.")
        wanted = {str(_relative(p, root)) for p in paths}
        rows = frame[image_col].map(lambda raw: os.path.relpath(os.path.realpath(root / str(raw).strip()), root))
        hit = rows.isin(wanted)
        missing = wanted - set(rows[hit])
        if missing:
            raise EditError(f"Not in {current.name}: {', '.join(sorted(missing))}")
        if action == "move":
            frame.loc[hit, label_col] = class_name
        else:
            frame = frame[~hit]
        origin_name = next((e["csv_origin"] for e in read_journal(data_path) if e.get("csv_to") == current.name),
                           current.name)
        new_csv = root / f"{Path(origin_name).stem}.edit-{edit_id}.csv"
        if new_csv.exists():
            raise EditError(f"{new_csv.name} already exists; nothing was changed.")
        tmp = new_csv.with_name(f".{new_csv.name}.tmp")
        frame.to_csv(tmp, index=False)
        os.replace(tmp, new_csv)
        entry |= {"csv_origin": origin_name, "csv_from": current.name, "csv_to": new_csv.name,
                  "files": sorted(wanted)}
        _append(data_path, entry)
        verb = f"Relabelled {len(wanted)} image(s) as {class_name}" if action == "move" \
            else f"Left {len(wanted)} image(s) out"
        return EditResult(edit_id, action, (), str(new_csv), f"{verb} in {new_csv.name} (now the dataset; "
                                                             f"{current.name} is unchanged).")
    prefixes = _split_prefix(root)
    pairs: list[tuple[Path, Path]] = []
    for p in dict.fromkeys(paths):
        rel = _relative(p, root)
        prefix, current_class = _class_of(rel, prefixes)
        if action == "move":
            if current_class == class_name:
                raise EditError(f"{rel} is already in class {class_name}.")
            class_dir = root / prefix / class_name
            if not class_dir.is_dir():
                raise EditError(f"There is no class folder {prefix / class_name} in {root}.")
            pairs.append((root / rel, class_dir / rel.name))
        else:
            pairs.append((root / rel, root / EXCLUDED_DIR_NAME / rel))
    _rename_all(pairs)
    entry["moves"] = [[str(src.relative_to(root)), str(dst.relative_to(root))] for src, dst in pairs]
    try:
        _append(data_path, entry)
    except OSError as exc:
        for src, dst in reversed(pairs):
            os.replace(dst, src)
        raise EditError(f"Could not write the journal {journal_path(data_path)}: {exc}; nothing was changed.") from exc
    verb = f"Moved {len(pairs)} image(s) to class {class_name}" if action == "move" \
        else f"Excluded {len(pairs)} image(s) to {EXCLUDED_DIR_NAME}/"
    return EditResult(edit_id, action, tuple((str(s), str(d)) for s, d in pairs), str(root), verb + ".")


def move_to_class(data_path: str | os.PathLike, paths: Sequence[str], class_name: str) -> EditResult:
    """Moves images to another class (relabels them) and journals the edit.

    Args:
        data_path: the dataset folder or labels CSV.
        paths: image files inside the dataset (absolute, as in the scan report).
        class_name: an existing class folder (folders) or any label (CSV).

    Returns:
        An :class:`EditResult`; ``data_path`` is the dataset to use from now on.

    Raises:
        EditError: nothing selected, a path outside the dataset or already excluded, an unknown
            class, a name clash; nothing was changed.
    """
    return _edit(data_path, paths, "move", _valid_class_name(class_name))


def exclude(data_path: str | os.PathLike, paths: Sequence[str]) -> EditResult:
    """Excludes images: moves them to ``_excluded/`` (folders) or leaves their rows out of a new
    CSV, and journals the edit. Nothing is deleted.

    Args:
        data_path: the dataset folder or labels CSV.
        paths: image files inside the dataset (absolute).

    Returns:
        An :class:`EditResult`.

    Raises:
        EditError: as :func:`move_to_class`.
    """
    return _edit(data_path, paths, "exclude", None)


def undo_last(data_path: str | os.PathLike) -> EditResult | None:
    """Reverts the newest edit still in effect and appends an ``undo`` line.

    Returns:
        What was undone, or None when there is nothing to undo.

    Raises:
        EditError: a file to move back is missing or its old place is taken; nothing was changed.
    """
    edits = active_edits(data_path)
    if not edits:
        return None
    entry = edits[-1]
    root = dataset_root(data_path)
    moved: tuple[tuple[str, str], ...] = ()
    if entry.get("moves"):
        pairs = [(root / dst, root / src) for src, dst in entry["moves"]]
        for a, b in pairs:  # both ends must still be inside the dataset (a hand-edited journal)
            for p in (a, b):
                if not Path(os.path.abspath(p)).is_relative_to(root):
                    raise EditError(f"The journal names {p}, outside {root}; not undone.")
        _rename_all(pairs)
        moved = tuple((str(a), str(b)) for a, b in pairs)
    _append(data_path, {"id": _next_id(data_path), "time": _now(), "action": "undo", "undoes": entry["id"]})
    new_path = current_data_path(data_path) if _is_csv(data_path) else str(root)
    count = len(entry.get("moves") or entry.get("files") or [])
    return EditResult(int(entry["id"]), "undo", moved, new_path,
                      f"Undid edit {entry['id']} ({entry['action']} of {count} image(s)).")


def undo_all(data_path: str | os.PathLike) -> list[EditResult]:
    """Reverts every edit still in effect, newest first.

    Returns:
        One :class:`EditResult` per undone edit (empty when there was nothing to undo).

    Raises:
        EditError: from :func:`undo_last`; the edits undone before it stay undone.
    """
    results = []
    while (result := undo_last(data_path)) is not None:
        results.append(result)
    return results


def journal_frame(data_path: str | os.PathLike) -> pd.DataFrame:
    """The journal as a table for the UI, newest first: id, time (UTC, HH:MM:SS), action, to
    (class, ``_excluded`` or the undone edit), images, files (first three), in effect."""
    entries = read_journal(data_path)
    undone = {e.get("undoes") for e in entries if e.get("action") == "undo"}
    rows = []
    for e in entries:
        if e.get("action") == "undo":
            detail, count, files = f"edit {e.get('undoes')}", "", ""
        else:
            detail = e.get("class", "") if e.get("action") == "move" else EXCLUDED_DIR_NAME
            names = [src for src, _ in e.get("moves") or []] or list(e.get("files") or [])
            count = len(names)
            files = ", ".join(names[:3]) + (" …" if len(names) > 3 else "")
        rows.append({"id": e.get("id"), "time": str(e.get("time", ""))[11:19], "action": e.get("action"),
                     "to": detail, "images": count, "files": files,
                     "in effect": e.get("action") != "undo" and e.get("id") not in undone})
    columns = ["id", "time", "action", "to", "images", "files", "in effect"]
    return pd.DataFrame(rows, columns=columns).iloc[::-1].reset_index(drop=True)


def retrain_config(run_dir: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """The settings to train a run again on its fixed data: the same :class:`TrainConfig` with
    ``data_dir`` switched to :func:`current_data_path` (the newest edited CSV; a folder is edited
    in place), and the ``meta.json`` values that record where the new run came from.

    Args:
        run_dir: the run to train again.

    Returns:
        ``(config, meta)`` with ``meta = {"retrained_from": <run id>, "name": "<name> (fixed data)"}``.

    Raises:
        FileNotFoundError: the run has no ``config.json``.
    """

    run_dir = Path(run_dir)
    config = TrainConfig.from_json_file(run_dir / "config.json")
    fixed = dataclasses.replace(config, data_dir=current_data_path(config.data_dir))
    name = read_meta(run_dir).get("name") or run_dir.name
    return fixed, {"retrained_from": run_dir.name, "name": f"{name} (fixed data)"}
