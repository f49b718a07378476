"""Which server paths the app may read, and messages that never reveal other ones.

The rule (README, "Security"): bound to loopback without ``--auth`` (a local app, used by the
person who started it) any folder that person can read is allowed, unless ``--data-root`` is
given; bound to another address or with ``--auth``, paths typed in the app must lie under the
data root (default: the home folder). Model folders typed in the app must lie under the data root
or the runs folder when confined. Either way messages quote the path as typed, never the resolved
path (``/proc/self/cwd`` must not come back as ``/proc/4711/...``), and system folders
(``/proc``, ``/sys``, ``/dev``) are never datasets or models.

Engine module: no Gradio.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Iterable

#: Pseudo file systems: never a dataset or a model, and their resolved paths leak process details.
SYSTEM_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))

#: ``name`` or ``org/name``: what a Hugging Face Hub model id looks like.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class PathNotAllowed(ValueError):
    """A path typed in the app lies outside the folders the app may read; the message says which
    flag allows it."""


def is_loopback(host: str | None) -> bool:
    """True for ``127.0.0.1``, ``::1``, any ``127.x.y.z`` and ``localhost``."""
    if not host:
        return True
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_confined(host: str | None, auth: object, data_root_given: bool) -> bool:
    """The data-root rule: confined unless bound to loopback, without ``--auth`` and without
    ``--data-root``."""
    return bool(data_root_given or auth or not is_loopback(host))


def _under(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def is_system_path(path: Path) -> bool:
    """True for paths in ``/proc``, ``/sys`` or ``/dev``."""
    return _under(path, SYSTEM_ROOTS)


def resolve_allowed(text: str, base: Path, roots: Iterable[Path], confined: bool, what: str,
                    where: str = "data root", flag: str = "--data-root") -> Path:
    """Resolves a typed path and checks it against the allowed roots.

    Args:
        text: the path as typed (``~`` expanded; relative paths are taken under ``base``).
        base: the folder relative paths start from (the data root).
        roots: folders the path may lie under when ``confined`` (resolved here).
        confined: whether the roots apply (see :func:`is_confined`).
        what: the noun for messages (``"folder"``, ``"model folder"``).
        where: what the roots are, for the refusal (``"data root"``).
        flag: the flag that widens the roots, named in the refusal.

    Returns:
        The resolved path (it may not exist; the caller says so, quoting ``text``).

    Raises:
        PathNotAllowed: outside the roots when confined, or a system path; the message quotes
            ``text`` as typed and names ``flag``.
    """
    try:
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = base / path
        resolved = path.resolve()
        path.exists()  # a NUL byte raises here
    except (OSError, RuntimeError, ValueError):  # a symlink loop, an unknown ~user, a NUL byte
        raise PathNotAllowed(f"{text!r} cannot be used as a {what}.") from None
    roots = [Path(r).resolve() for r in roots]
    if is_system_path(resolved) or is_system_path(path.absolute()):
        raise PathNotAllowed(f"'{text}' is a system folder, not a {what}.")
    if confined and not _under(resolved, roots):
        raise PathNotAllowed(
            f"'{text}' is outside the {where} ({roots[0]}). Start the app with {flag} FOLDER to allow"
            " other folders."
        )
    return resolved


def check_model_input(text: str, data_root: Path, runs_dir: Path, confined: bool) -> str:
    """Checks a model typed in the app: a Hub id, or a folder under the data root or the runs folder.

    A Hub id (``org/name``) that is not also a local path relative to the server's working folder
    passes as typed. Anything else is a path and must pass :func:`resolve_allowed`; outside the
    roots the same message comes whether or not the path exists, so the box does not reveal
    which server paths exist.

    Returns:
        ``text`` for a Hub id, else the resolved folder as a string.

    Raises:
        PathNotAllowed: a path outside the data root and the runs folder (when confined), or a
            system path.
    """
    text = (text or "").strip()
    looks_like_path = text.startswith(("/", "~", ".")) or "\\" in text or (len(text) > 1 and text[1] == ":")
    if _HUB_ID.match(text) and not looks_like_path and not os.path.exists(text):
        return text
    resolved = resolve_allowed(text, data_root, [data_root, runs_dir], confined, "model folder",
                               where="data root and the runs folder")
    return str(resolved)


def redact_paths(message: str, allowed: Iterable[Path]) -> str:
    """Replaces absolute paths in ``message`` that lie outside ``allowed`` with ``<path>``.

    For messages built by libraries (transformers, PIL) that quote the resolved path they opened.
    """
    roots = [Path(r).resolve() for r in allowed]

    def replace(match: re.Match) -> str:
        candidate = match.group(0)
        try:
            inside = _under(Path(candidate).resolve(), roots) and not is_system_path(Path(candidate))
        except (OSError, RuntimeError, ValueError):
            inside = False
        return candidate if inside else "<path>"

    return re.sub(r"(?<![\w.])/(?:[^\s'\"`:,)]+)", replace, message)
