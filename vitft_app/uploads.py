"""Getting a dataset in from the browser: safe extraction of an uploaded zip.

Refused, with a message and nothing written outside the upload folder: absolute member paths,
``..`` components, symbolic links, more than ``max_files`` members, more than ``max_total_bytes``
uncompressed, or a member whose compression ratio exceeds ``max_ratio`` (a zip bomb). The sizes
are checked from the archive's directory first and again while writing, so a zip whose headers lie
cannot write more than the limit.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import zipfile
from datetime import datetime
from pathlib import Path, PurePosixPath

#: Defaults: 4 GiB uncompressed, 200,000 files, ratio 200:1 (members above 1 MiB).
MAX_TOTAL_BYTES = 4 * 1024**3
MAX_FILES = 200_000
MAX_RATIO = 200
_RATIO_MIN_BYTES = 1024 * 1024
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


def extract_zip(
    zip_path: str | os.PathLike,
    uploads_dir: str | os.PathLike,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_files: int = MAX_FILES,
    max_ratio: float = MAX_RATIO,
) -> Path:
    """Extracts an uploaded zip into its own new folder under ``uploads_dir``.

    The archive is extracted into a temporary folder that is renamed into place only when
    everything was written, so a refused or failed upload leaves nothing behind.

    Args:
        zip_path: the uploaded file.
        uploads_dir: parent folder (``<data root>/uploads``); created when missing.
        max_total_bytes: largest total uncompressed size.
        max_files: most members.
        max_ratio: largest uncompressed/compressed ratio of a member over 1 MiB.

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
    except (zipfile.BadZipFile, OSError) as exc:
        raise UnsafeArchiveError(f"Not a readable zip file: {exc}") from exc
    with archive:
        infos = archive.infolist()
        if len(infos) > max_files:
            raise UnsafeArchiveError(f"The zip has {len(infos):,} members; the limit is {max_files:,}.")
        for info in infos:
            problem = _member_problem(info)
            if problem:
                raise UnsafeArchiveError(f"Refused: the zip contains an unsafe member ({problem}).")
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
                        if written > max_total_bytes:
                            raise UnsafeArchiveError("Refused: the zip expands beyond the size limit.")
                        sink.write(chunk)
            dest = _publish(tmp, uploads, Path(zip_path).stem)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _dataset_root(dest)


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

    Returns:
        The dataset folder (the chosen folder itself).

    Raises:
        UnsafeArchiveError: counts differ, a path is absolute or has ``..``, or a limit is exceeded.
    """
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _dataset_root(dest)
