"""Training checkpoints: everything needed to continue a run exactly where it stopped.

One file, ``run_dir/checkpoint.pt``, is replaced atomically at the end of every epoch and when
a run is stopped. It holds the model, optimizer, scheduler, gradient scaler and EMA states, the
RNG states (torch CPU and CUDA, Python, NumPy, the shuffle generator), the epoch's sample order
and position, and the loop counters. A completed run deletes it (the saved model is the result);
a stopped, failed or interrupted run keeps it for ``vitft train --resume RUN_DIR``.

A run folder may come from someone else (a shared runs folder, a run sent by mail), so reading a
checkpoint never runs code: ``torch.load(weights_only=True)`` accepts only tensors and plain
Python containers. Every state is stored that way (the NumPy RNG state as a list of ints). A
checkpoint written before this format (version 1, its NumPy state a pickled array) is still read
with exactly the NumPy array types allowed, nothing else; any other object in the file refuses
the resume with a message and nothing is executed.
"""

from __future__ import annotations

import logging
import errno
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 2
#: Versions :func:`load_checkpoint` reads (1: NumPy RNG state as an array, read with only the
#: NumPy array types allowed).
READABLE_VERSIONS = (1, 2)


class DiskFullError(OSError):
    """A write into the run folder failed for lack of space; the message says how much is free."""

    def __str__(self) -> str:
        return str(self.strerror)


class ResumeError(ValueError):
    """A run cannot be resumed (no checkpoint, unreadable checkpoint, still running)."""


def checkpoint_path(run_dir: str | os.PathLike) -> Path:
    """``run_dir/checkpoint.pt``."""
    return Path(run_dir) / CHECKPOINT_NAME


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    """True when the run folder holds a checkpoint to resume from."""
    return checkpoint_path(run_dir).is_file()


def capture_rng(shuffle_generator: torch.Generator) -> dict[str, Any]:
    """Every RNG state the loop draws from: torch CPU (augmentation, MixUp/CutMix, patch masks,
    dropout on CPU), CUDA (dropout on GPU), Python ``random``, NumPy, and the shuffle generator."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "shuffle": shuffle_generator.get_state(),
    }


def _numpy_state_to_plain(state: tuple) -> tuple:
    """NumPy's legacy RNG state ``(name, uint32[624] keys, pos, has_gauss, cached_gaussian)``
    with the keys as a tuple of ints, so ``torch.load(weights_only=True)`` can read it."""
    name, keys, pos, has_gauss, cached = state
    return (str(name), tuple(int(k) for k in keys), int(pos), int(has_gauss), float(cached))


def _numpy_state_from_plain(state: Any) -> tuple:
    """Inverse of :func:`_numpy_state_to_plain` (also accepts a version-1 array state)."""
    name, keys, pos, has_gauss, cached = state
    return (name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))


def free_mib(folder: str | os.PathLike) -> float:
    """Free space in MiB on the filesystem holding ``folder`` (``shutil.disk_usage``)."""
    try:
        return shutil.disk_usage(folder).free / 1024**2
    except OSError:
        return float("nan")


def disk_full_error(exc: OSError, what: str, folder: str | os.PathLike) -> OSError:
    """``exc`` as a :class:`DiskFullError` with "disk full while writing WHAT (N MB free in DIR)"
    when it is ENOSPC (or EDQUOT), else ``exc`` unchanged."""
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return DiskFullError(
            errno.ENOSPC,
            f"disk full while writing {what} ({free_mib(folder):.0f} MB free in {folder}); free some space,"
            " then Resume: the previous checkpoint and the best model are kept",
        )
    return exc


def low_space_warning(run_dir: str | os.PathLike, needed_bytes: float, what: str) -> str | None:
    """A warning when the filesystem of ``run_dir`` has less than 1.5x ``needed_bytes`` free
    (a checkpoint is written beside the previous one before that is replaced), else None."""
    free = free_mib(run_dir)
    needed = needed_bytes / 1024**2
    if free == free and free < 1.5 * needed:  # free == free: not NaN
        return (f"warning: low disk space: about {needed:.0f} MB needed for {what}, {free:.0f} MB free in"
                f" {Path(run_dir).parent}; if the disk fills up the run fails cleanly and can be resumed")
    return None


def estimate_checkpoint_bytes(run_dir: str | os.PathLike, model: torch.nn.Module) -> float:
    """The size of the next checkpoint: the current one's when it exists, else the model's
    parameters three times over (weights and AdamW's two moment buffers)."""
    path = checkpoint_path(run_dir)
    if path.is_file():
        return float(path.stat().st_size)
    return 3.0 * sum(p.numel() * p.element_size() for p in model.parameters())


def restore_rng(states: dict[str, Any], shuffle_generator: torch.Generator) -> None:
    """Restores what :func:`capture_rng` captured (CUDA states only when CUDA is present)."""
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])
    np.random.set_state(_numpy_state_from_plain(states["numpy"]))
    shuffle_generator.set_state(states["shuffle"])


def save_checkpoint(run_dir: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Writes ``payload`` (plus a format version) to ``run_dir/checkpoint.pt`` atomically: a
    temporary file in the same folder, fsynced, then ``os.replace``, so a kill mid-write leaves
    the previous checkpoint intact.

    Returns:
        The checkpoint path.
    """
    path = checkpoint_path(run_dir)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save({"version": CHECKPOINT_VERSION, **payload}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # the previous checkpoint, if any, is untouched
        if isinstance(exc, OSError):
            raise disk_full_error(exc, "the checkpoint", Path(run_dir)) from exc
        raise
    return path


def load_checkpoint(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Reads ``run_dir/checkpoint.pt`` onto the CPU.

    Only tensors and plain containers are unpickled (``weights_only=True``); a file that asks
    for any other object (a crafted pickle that would run code) is refused before anything runs.

    Raises:
        ResumeError: no checkpoint, or it cannot be read, holds objects other than tensors and
            plain data, or is from another format version.
    """
    path = checkpoint_path(run_dir)
    if not path.is_file():
        raise ResumeError(
            f"{Path(run_dir).name} has no checkpoint to resume from: a completed run deletes it, and runs made"
            " before checkpoints existed never had one."
        )
    name = Path(run_dir).name
    try:
        # Version 1 kept NumPy's RNG keys as an ndarray: allow exactly the types that rebuild one.
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's weights-only unpickler names a disallowed class or function "Unsupported global";
        # every other refusal (an unknown opcode: random bytes, a cut file) is damage, not an attack.
        if "Unsupported global" in str(exc):
            raise ResumeError(
                f"The checkpoint of {name} asks to create Python objects other than tensors and plain data"
                " (it may have been crafted to run code); it was not loaded and nothing in it ran. Resume only"
                " runs you trust, or start a new run."
            ) from None
        logger.debug("checkpoint of %s unreadable", name, exc_info=exc)
        raise ResumeError(f"The checkpoint of {name} is damaged or not one vitft wrote, and cannot be read (nothing"
                          " in it ran); start a new run.") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file becomes one clear message
        # The details at debug level: a warning with its traceback reached the CLI's stderr.
        logger.debug("checkpoint of %s unreadable", name, exc_info=exc)
        raise ResumeError(
            f"The checkpoint of {name} is damaged and cannot be read ({type(exc).__name__}); start a new run."
        ) from None
    if not isinstance(payload, dict) or payload.get("version") not in READABLE_VERSIONS:
        raise ResumeError(f"The checkpoint of {name} is from another vitft version and cannot be resumed.")
    missing = [key for key in ("loop", "model", "optimizer", "scheduler", "rng") if key not in payload]
    if missing or not isinstance(payload["loop"], dict) or not isinstance(payload["rng"], dict):
        raise ResumeError(f"The checkpoint of {name} is incomplete ({', '.join(missing) or 'loop/rng'} missing);"
                          " start a new run.")
    return payload


def _numpy_array_globals() -> list:
    """The globals a pickled ``uint32`` ndarray needs (NumPy 1 and 2 module paths)."""
    try:
        from numpy.core.multiarray import _reconstruct  # NumPy 1; a deprecated alias in NumPy 2
    except ImportError:  # pragma: no cover
        from numpy._core.multiarray import _reconstruct
    allowed = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        from numpy._core.multiarray import _reconstruct as core_reconstruct

        allowed.append(core_reconstruct)
    except ImportError:  # pragma: no cover - NumPy 1
        pass
    return allowed


_NUMPY_ARRAY_GLOBALS = _numpy_array_globals()


def remove_checkpoint(run_dir: str | os.PathLike) -> None:
    """Deletes the checkpoint (after a completed run); missing is fine."""
    checkpoint_path(run_dir).unlink(missing_ok=True)
