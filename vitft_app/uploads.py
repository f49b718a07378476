"""Getting a dataset in from the browser: safe extraction of an uploaded zip.

Refused, with a message and nothing written outside the upload folder: absolute member paths,
``..`` components, symbolic links, encrypted members, unknown compression methods, more than
``max_files`` members, more than ``max_total_bytes`` uncompressed, a member over 1 MiB or the
whole archive expanding more than ``max_ratio`` times (a zip bomb, however it is split into
members), more than the free disk space (keeping :data:`FREE_SPACE_RESERVE` free) or more than
the uploads folder's quota. The sizes are checked from the archive's directory first and again
while writing, so a zip whose headers lie cannot write more than the limit; a damaged member
(bad CRC, truncated data) is a message too. A failed upload leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath

#: Defaults: 4 GiB uncompressed, 200,000 files, ratio 200:1 (members above 1 MiB).
MAX_TOTAL_BYTES = 4 * 1024**3
MAX_FILES = 200_000
MAX_RATIO = 200
_RATIO_MIN_BYTES = 1024 * 1024
#: The whole-archive ratio applies once the archive expands to more than this (a small zip of
#: text files may compress very well).
_ARCHIVE_RATIO_MIN_BYTES = 16 * 1024**2
#: Disk space an upload always leaves free (training needs room for checkpoints).
FREE_SPACE_RESERVE = 512 * 1024**2
#: Compression methods :mod:`zipfile` can read.
_READABLE_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
#: What a damaged or unsupported member raises while it is read.
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError, ValueError)
_CHUNK = 1024 * 1024


class UnsafeArchiveError(ValueError):
    """The zip cannot be extracted safely; the message says why."""


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    name = info.filename.replace("\\", "/")
    path = PurePosixPath(name)
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return f"absolute path '{info.filename}'"
    if ".." in path.parts:
        return f"'..' in '{info.filename}'"
    if stat.S_ISLNK(info.external_attr >> 16):
        return f"symbolic link '{info.filename}'"
    return None


def folder_bytes(folder: str | os.PathLike) -> int:
    """Total size of the files under ``folder`` (0 when missing; symlinks not followed)."""
    total = 0
    for dirpath, _, filenames in os.walk(folder, followlinks=False):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def check_room(uploads: Path, incoming: int, quota_bytes: int | None) -> None:
    """Refuses an upload of ``incoming`` bytes that would exceed the uploads quota or leave less
    than :data:`FREE_SPACE_RESERVE` free on the disk.

    Raises:
        UnsafeArchiveError: the message says how much is used, free and needed.
    """
    mib = 1024**2
    if quota_bytes is not None:
        used = folder_bytes(uploads)
        if used + incoming > quota_bytes:
            raise UnsafeArchiveError(
                f"Refused: the uploads folder holds {used / mib:,.1f} MiB and this upload needs {incoming / mib:,.1f}"
                f" MiB more; the quota is {quota_bytes / mib:,.1f} MiB. Delete old uploads (Data tab, \"Uploaded"
                " datasets\") or start the app with a larger --uploads-quota-mb."
            )
    free = shutil.disk_usage(uploads).free
    if incoming + FREE_SPACE_RESERVE > free:
        raise UnsafeArchiveError(
            f"Refused: not enough disk space: this upload needs {incoming / mib:,.0f} MiB and {free / mib:,.0f} MiB are"
            f" free (the app keeps {FREE_SPACE_RESERVE / mib:,.0f} MiB free for training)."
        )


def extract_zip(
    zip_path: str | os.PathLike,
    uploads_dir: str | os.PathLike,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_files: int = MAX_FILES,
    max_ratio: float = MAX_RATIO,
    quota_bytes: int | None = None,
) -> Path:
    """Extracts an uploaded zip into its own new folder under ``uploads_dir``.

    The archive is extracted into a temporary folder that is renamed into place only when
    everything was written, so a refused or failed upload leaves nothing behind.

    Args:
        zip_path: the uploaded file.
        uploads_dir: parent folder (``<data root>/uploads``); created when missing.
        max_total_bytes: largest total uncompressed size.
        max_files: most members.
        max_ratio: largest uncompressed/compressed ratio of a member over 1 MiB, and of the
            whole archive once it expands to more than 16 MiB.
        quota_bytes: the most the uploads folder may hold, this upload included (None: no quota).

    Returns:
        The dataset folder: the extracted folder, or its single top-level folder when the zip
        wraps everything in one (``animals.zip`` holding ``animals/cat/...``).

    Raises:
        UnsafeArchiveError: not a zip, or any of the refusals listed in the module docstring.
    """
    uploads = Path(uploads_dir)
    uploads.mkdir(parents=True, exist_ok=True)
    try:
        archive = zipfile.ZipFile(zip_path)
    except (OSError, *_READ_ERRORS) as exc:
        raise UnsafeArchiveError(f"Not a readable zip file ({_short(exc)}).") from None
    with archive:
        infos = archive.infolist()
        if not any(not info.is_dir() for info in infos):
            raise UnsafeArchiveError("The zip holds no files.")
        if len(infos) > max_files:
            raise UnsafeArchiveError(f"The zip has {len(infos):,} members; the limit is {max_files:,}.")
        seen: set[str] = set()
        for info in infos:
            key = info.filename.replace("\\", "/").rstrip("/")
            if key in seen and not info.is_dir():
                raise UnsafeArchiveError(f"Refused: the zip holds '{info.filename}' twice; which one is meant is"
                                         " unclear, so make the zip again.")
            seen.add(key)
            problem = _member_problem(info)
            if problem:
                raise UnsafeArchiveError(f"Refused: the zip contains an unsafe member ({problem}).")
            if info.flag_bits & 0x1:
                raise UnsafeArchiveError(f"Refused: '{info.filename}' is encrypted; upload a zip without a password.")
            if info.compress_type not in _READABLE_METHODS:
                raise UnsafeArchiveError(
                    f"Refused: '{info.filename}' uses compression method {info.compress_type}, which cannot be read;"
                    " make the zip with standard (deflate) compression."
                )
            if info.file_size > _RATIO_MIN_BYTES and info.file_size > max_ratio * max(info.compress_size, 1):
                raise UnsafeArchiveError(
                    f"Refused: '{info.filename}' expands {info.file_size / max(info.compress_size, 1):.0f}x"
                    f" (limit {max_ratio:.0f}x); this looks like a zip bomb."
                )
        declared = sum(info.file_size for info in infos)
        if declared > max_total_bytes:
            raise UnsafeArchiveError(
                f"Refused: the zip expands to {declared / 1024**2:,.0f} MiB; the limit is"
                f" {max_total_bytes / 1024**2:,.0f} MiB."
            )
        compressed = max(sum(info.compress_size for info in infos), 1)
        if declared > _ARCHIVE_RATIO_MIN_BYTES and declared > max_ratio * compressed:
            raise UnsafeArchiveError(
                f"Refused: the zip expands {declared / compressed:.0f}x ({compressed / 1024**2:,.1f} MiB to"
                f" {declared / 1024**2:,.0f} MiB; limit {max_ratio:.0f}x); this looks like a zip bomb."
            )
        check_room(uploads, declared, quota_bytes)
        tmp = Path(tempfile.mkdtemp(prefix=".upload-", dir=uploads))
        try:
            written = 0
            for info in infos:
                target = (tmp / info.filename.replace("\\", "/")).resolve()
                if not target.is_relative_to(tmp.resolve()):
                    raise UnsafeArchiveError(f"Refused: '{info.filename}' would land outside the upload folder.")
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as source, open(target, "wb") as sink:
                    while chunk := source.read(_CHUNK):
                        written += len(chunk)
                        if written > max_total_bytes or written > declared:
                            # more than the directory declared: a header that lies
                            raise UnsafeArchiveError("Refused: the zip expands beyond the sizes it declares.")
                        sink.write(chunk)
            dest = _publish(tmp, uploads, Path(zip_path).stem)
        except _READ_ERRORS as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UnsafeArchiveError(f"The zip is damaged and cannot be extracted ({_short(exc)}); make it again.") from None
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno == errno.ENOSPC:
                raise UnsafeArchiveError("The disk filled up while extracting the zip; nothing was kept.") from None
            where = info.filename
            if exc.filename and Path(exc.filename).is_relative_to(tmp.resolve()):
                where = Path(exc.filename).relative_to(tmp.resolve()).as_posix()  # the clashing path
            refusal = _member_write_refusal(exc, where)
            if refusal:
                raise UnsafeArchiveError(refusal) from None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _dataset_root(dest)


def _member_write_refusal(exc: OSError, name: str) -> str | None:
    """The plain reason a zip member could not be written, for the errors the zip itself causes
    (None for others: permissions, a read-only disk).

    Args:
        exc: the error from creating the member's folder or file; name: the path in the zip it failed on.
    """
    shown = name if len(name) <= 60 else name[:40] + "…" + name[-12:]
    if exc.errno in (errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
        return (f"Refused: the zip has '{shown.rstrip('/')}' both as a file and as a folder; make the zip again"
                " from the dataset folder.")
    if exc.errno == errno.ENAMETOOLONG:
        longest = max((len(part.encode()) for part in name.split("/")), default=0)
        if longest > 255:
            return (f"Refused: '{shown}' has a file or folder name of {longest} bytes, longer than this file"
                    " system allows (255); shorten it and make the zip again.")
        return (f"Refused: the path '{shown}' is {len(name.encode())} bytes long once extracted, longer than this"
                " file system allows; use fewer or shorter folder names and make the zip again.")
    return None


def _short(exc: BaseException) -> str:
    """An exception's message without server paths (the upload's temp path), at most 120 chars."""
    text = re.sub(r"(?<![\w.])/[^\s'\"]+", "<file>", str(exc).strip() or type(exc).__name__)
    return text[:120]


def _publish(tmp: Path, uploads: Path, name: str) -> Path:
    """Renames a fully written temp folder to ``<uploads>/<name>-<timestamp>`` (``-2``, ... when taken)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "upload"
    os.chmod(tmp, 0o755)  # mkdtemp creates 0700
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    dest, n = uploads / f"{stem}-{stamp}", 1
    while dest.exists():
        n += 1
        dest = uploads / f"{stem}-{stamp}-{n}"
    os.replace(tmp, dest)
    return dest


def _dataset_root(folder: Path) -> Path:
    """The single visible top-level folder when the zip wrapped everything in one, else ``folder``."""
    visible = [p for p in folder.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX"]
    if len(visible) == 1 and visible[0].is_dir():
        return visible[0]
    return folder


def copy_folder_upload(
    files: list[str],
    relative_paths: list[str],
    uploads_dir: str | os.PathLike,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_files: int = MAX_FILES,
    quota_bytes: int | None = None,
) -> Path:
    """Rebuilds a folder chosen in the browser under ``uploads_dir``.

    The browser uploads each file separately; ``relative_paths`` (the files' ``webkitRelativePath``,
    in the same order) restores the class folders. The same refusals as for a zip apply.

    Args:
        files: server-side paths of the uploaded files.
        relative_paths: ``"animals/cat/1.jpg"``-style paths, one per file.
        uploads_dir: parent folder (``<data root>/uploads``).
        max_total_bytes: largest total size.
        max_files: most files.
        quota_bytes: the most the uploads folder may hold, this upload included (None: no quota).

    Returns:
        The dataset folder (the chosen folder itself).

    Raises:
        UnsafeArchiveError: counts differ, a path is not a string, absolute or has ``..``, a limit
            or the quota is exceeded, or the disk lacks room.
    """
    if not isinstance(relative_paths, list) or not all(isinstance(p, str) and p for p in relative_paths):
        raise UnsafeArchiveError(
            "The browser sent the folder structure in a form the app cannot read; upload a .zip instead."
        )
    if len(files) != len(relative_paths) or not files:
        raise UnsafeArchiveError(
            "The browser did not send the folder structure (class folders); upload a .zip instead."
        )
    if len(files) > max_files:
        raise UnsafeArchiveError(f"The folder has {len(files):,} files; the limit is {max_files:,}.")
    total = 0
    for source, rel in zip(files, relative_paths):
        info = zipfile.ZipInfo(rel)  # reuse the zip member rules for names
        problem = _member_problem(info)
        if problem:
            raise UnsafeArchiveError(f"Refused: unsafe path ({problem}).")
        total += os.path.getsize(source)
    if total > max_total_bytes:
        raise UnsafeArchiveError(f"Refused: the folder holds {total / 1024**2:,.0f} MiB; the limit is"
                                 f" {max_total_bytes / 1024**2:,.0f} MiB.")
    uploads = Path(uploads_dir)
    uploads.mkdir(parents=True, exist_ok=True)
    check_room(uploads, total, quota_bytes)
    top = PurePosixPath(relative_paths[0].replace("\\", "/")).parts[0] if "/" in relative_paths[0] else "folder"
    tmp = Path(tempfile.mkdtemp(prefix=".upload-", dir=uploads))
    try:
        for source, rel in zip(files, relative_paths):
            target = (tmp / rel.replace("\\", "/")).resolve()
            if not target.is_relative_to(tmp.resolve()):
                raise UnsafeArchiveError(f"Refused: '{rel}' would land outside the upload folder.")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        dest = _publish(tmp, uploads, top)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise UnsafeArchiveError("The disk filled up while copying the folder; nothing was kept.") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _dataset_root(dest)


@dataclass(frozen=True)
class UploadInfo:
    """One folder in the uploads folder (one zip or folder upload)."""

    path: Path
    size_bytes: int
    modified: float


def list_uploads(uploads_dir: str | os.PathLike) -> list[UploadInfo]:
    """The uploads, newest first (temp folders of uploads in progress are skipped)."""
    uploads = Path(uploads_dir)
    found = []
    for entry in uploads.iterdir() if uploads.is_dir() else []:
        if entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
            continue
        found.append(UploadInfo(entry, folder_bytes(entry), entry.stat().st_mtime))
    return sorted(found, key=lambda u: u.modified, reverse=True)


def delete_upload(path: str | os.PathLike, uploads_dir: str | os.PathLike) -> Path:
    """Deletes one upload: the folder directly under ``uploads_dir`` that holds ``path``.

    Raises:
        ValueError: ``path`` is not inside the uploads folder.
    """
    uploads = Path(uploads_dir).resolve()
    target = Path(path).resolve()
    if not target.is_relative_to(uploads) or target == uploads:
        raise ValueError("Only uploaded datasets (in the uploads folder) can be deleted here.")
    top = uploads / target.relative_to(uploads).parts[0]
    shutil.rmtree(top)
    return top
