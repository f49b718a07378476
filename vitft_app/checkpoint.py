"""Training checkpoints: everything needed to continue a run exactly where it stopped.

One file, ``run_dir/checkpoint.pt``, is replaced atomically at the end of every epoch and when
a run is stopped. It holds the model, optimizer, scheduler, gradient scaler and EMA states, the
RNG states (torch CPU and CUDA, Python, NumPy, the shuffle generator), the epoch's sample order
and position, and the loop counters. A completed run deletes it (the saved model is the result);
a stopped, failed or interrupted run keeps it for ``vitft train --resume RUN_DIR``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1


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
        "numpy": np.random.get_state(),
        "shuffle": shuffle_generator.get_state(),
    }


def restore_rng(states: dict[str, Any], shuffle_generator: torch.Generator) -> None:
    """Restores what :func:`capture_rng` captured (CUDA states only when CUDA is present)."""
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
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
    with open(tmp, "wb") as handle:
        torch.save({"version": CHECKPOINT_VERSION, **payload}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Reads ``run_dir/checkpoint.pt`` onto the CPU.

    Raises:
        ResumeError: no checkpoint, or it cannot be read, or it is from another format version.
    """
    path = checkpoint_path(run_dir)
    if not path.is_file():
        raise ResumeError(
            f"{Path(run_dir).name} has no checkpoint to resume from: a completed run deletes it, and runs made"
            " before checkpoints existed never had one."
        )
    try:
        # weights_only=False: the file holds RNG tuples and NumPy state written by this module.
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file becomes one clear message
        raise ResumeError(f"The checkpoint of {Path(run_dir).name} cannot be read ({exc}).") from exc
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ResumeError(f"The checkpoint of {Path(run_dir).name} is from another vitft version.")
    return payload


def remove_checkpoint(run_dir: str | os.PathLike) -> None:
    """Deletes the checkpoint (after a completed run); missing is fine."""
    checkpoint_path(run_dir).unlink(missing_ok=True)
