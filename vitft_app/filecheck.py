"""Checking image files for the dataset scan: a full decode per file, in parallel, cached.

A header check (``Image.verify``) misses truncated JPEG data, so every file is decoded with the
one loader (:func:`~vitft_app.images.load_image`). The result, including a digest of the decoded
pixels for duplicate detection, is cached in SQLite by path, size and modification time, so a
second scan of an unchanged folder decodes nothing.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from .images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image

#: Bump when the meaning of a cached row changes (forces re-checking every file).
CACHE_VERSION = 2

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FileCheck:
    """The outcome of decoding one file.

    Attributes:
        reason: None when the image is usable, else the loader's reason ("truncated", ...).
        width, height: stored size in pixels (before EXIF rotation), when the header was readable.
        mode: Pillow mode as stored ("RGB", "P", "I;16", ...).
        format: Pillow format name ("JPEG", "PNG", ...).
        digest: BLAKE2b-128 hex digest of the decoded RGB pixels and size (same picture, same
            digest, whatever the file format); None for unusable files.
    """

    reason: str | None
    width: int | None
    height: int | None
    mode: str | None
    format: str | None
    digest: str | None


def check_image_file(path: str, max_pixels: int | None = None) -> FileCheck:
    """Reads the header, then fully decodes the file with the one loader.

    Never raises: problems are returned in ``reason``.
    """
    width = height = None
    mode = fmt = None
    try:
        with Image.open(path) as header:
            (width, height), mode, fmt = header.size, header.mode, header.format
    except Exception:  # noqa: BLE001 - the loader below gives the typed reason
        pass
    try:
        image = load_image(path, max_pixels=max_pixels)
    except ImageLoadError as exc:
        return FileCheck(exc.reason, width, height, mode, fmt, None)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.width}x{image.height}".encode())
    digest.update(image.tobytes())
    return FileCheck(None, width, height, mode, fmt, digest.hexdigest())


def _key(path: str) -> str | bytes:
    """The cache key of a path: the path itself, or its bytes for a file name that is not valid
    UTF-8 (Python keeps such bytes as surrogates, which SQLite cannot store as text)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


class ScanCache:
    """``{(path, size, mtime_ns, max_pixels): FileCheck}`` in an SQLite file (thread-safe). The
    pixel limit is part of the key because it decides whether a large image is usable.

    Args:
        path: the database file; None keeps the cache in memory for this process only.
    """

    def __init__(self, path: str | os.PathLike | None):
        self._lock = threading.Lock()
        target = ":memory:"
        if path is not None:
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                target = str(path)
            except OSError:
                target = ":memory:"
        try:
            self._db = sqlite3.connect(target, check_same_thread=False, timeout=10)
            self._create()
        except sqlite3.Error:  # unwritable or corrupt file: fall back to memory
            self._db = sqlite3.connect(":memory:", check_same_thread=False)
            self._create()

    def _create(self) -> None:
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS checks_v2 (path TEXT, max_pixels INTEGER, size INTEGER, mtime_ns INTEGER,"
            " version INTEGER, reason TEXT, width INTEGER, height INTEGER, mode TEXT, format TEXT, digest TEXT,"
            " PRIMARY KEY (path, max_pixels))"
        )
        self._db.commit()

    def get(self, path: str, size: int, mtime_ns: int, max_pixels: int) -> FileCheck | None:
        """The cached check of an unchanged file under the same pixel limit, else None."""
        with self._lock:
            row = self._db.execute(
                "SELECT reason, width, height, mode, format, digest FROM checks_v2"
                " WHERE path = ? AND max_pixels = ? AND size = ? AND mtime_ns = ? AND version = ?",
                (_key(path), max_pixels, size, mtime_ns, CACHE_VERSION),
            ).fetchone()
        return FileCheck(*row) if row else None

    def put_many(self, rows: Sequence[tuple[str, int, int, FileCheck]], max_pixels: int) -> None:
        """Stores ``(path, size, mtime_ns, check)`` rows checked under ``max_pixels``."""
        if not rows:
            return
        with self._lock:
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO checks_v2 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(_key(p), max_pixels, s, m, CACHE_VERSION, *astuple(c)) for p, s, m, c in rows],
                )
                self._db.commit()
            except sqlite3.Error:
                pass  # a read-only cache only costs speed


def check_files(
    paths: Sequence[str],
    cache: ScanCache | None = None,
    max_workers: int | None = None,
    max_pixels: int | None = None,
    progress: Progress | None = None,
) -> dict[str, FileCheck]:
    """Checks every file, decoding in a thread pool (Pillow releases the GIL while decoding).

    Args:
        paths: image files.
        cache: reuse and store results (unchanged files are not decoded again).
        max_workers: decoding threads (default: CPU count + 1, at most 8).
        max_pixels: passed to the loader.
        progress: called as ``progress(done, total)`` after each file.

    Returns:
        ``{path: FileCheck}`` for every path.
    """
    limit = max_pixels or DEFAULT_MAX_PIXELS
    results: dict[str, FileCheck] = {}
    todo: list[tuple[str, int, int]] = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError as exc:
            results[path] = FileCheck(f"unreadable ({exc.strerror or exc})", None, None, None, None, None)
            continue
        cached = cache.get(path, stat.st_size, stat.st_mtime_ns, limit) if cache is not None else None
        if cached is not None:
            results[path] = cached
        else:
            todo.append((path, stat.st_size, stat.st_mtime_ns))
    total, done = len(paths), len(results)
    if progress:
        progress(done, total)
    new_rows = []
    workers = max_workers or min(8, (os.cpu_count() or 1) + 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for (path, size, mtime), check in zip(todo, pool.map(lambda t: check_image_file(t[0], limit), todo)):
            results[path] = check
            new_rows.append((path, size, mtime, check))
            done += 1
            if progress:
                progress(done, total)
    if cache is not None:
        cache.put_many(new_rows, limit)
    return results
