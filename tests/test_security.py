"""Hardening (issue 13): hostile run folders, a full disk, hostile uploads, confinement, auth,
Ctrl-C and the smaller refusals. Each test fails on the code before the fix."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch


# ---- 1. a checkpoint never runs code -------------------------------------------------------------


class _Payload:
    """Unpickling this creates ``marker``: what a crafted checkpoint would do with ``os.system``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    from vitft_app.checkpoint import ResumeError, load_checkpoint

    marker = tmp_path / "pwned"
    torch.save({"version": 2, "loop": {}, "model": {}, "optimizer": {}, "scheduler": {}, "rng": {},
                "evil": _Payload(marker)}, tmp_path / "checkpoint.pt")
    with pytest.raises(ResumeError, match="nothing in it ran"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_checkpoint_round_trip_is_tensors_and_plain_data(tmp_path):
    from vitft_app.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint

    gen = torch.Generator().manual_seed(3)
    np.random.seed(5)
    random.seed(7)
    rng = capture_rng(gen)
    expected = (np.random.rand(), random.random(), torch.rand(1, generator=gen).item())
    save_checkpoint(tmp_path, {"loop": {"step": 4}, "model": {"w": torch.ones(2)}, "optimizer": {},
                               "scheduler": {}, "rng": rng})
    # the file loads with plain weights_only=True (no extra allowed types)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["loop"] == {"step": 4}
    restore_rng(load_checkpoint(tmp_path)["rng"], gen)
    assert (np.random.rand(), random.random(), torch.rand(1, generator=gen).item()) == expected


def test_checkpoint_of_the_previous_format_still_resumes(tmp_path):
    """Version 1 (before this fix) pickled NumPy's RNG keys as an ndarray: still read, with only
    the NumPy array types allowed."""
    from vitft_app.checkpoint import load_checkpoint, restore_rng

    gen = torch.Generator().manual_seed(1)
    np.random.seed(11)
    state = {"torch": torch.get_rng_state(), "cuda": [], "python": random.getstate(),
             "numpy": np.random.get_state(), "shuffle": gen.get_state()}
    expected = np.random.rand()
    torch.save({"version": 1, "loop": {"step": 1}, "model": {}, "optimizer": {}, "scheduler": {}, "rng": state},
               tmp_path / "checkpoint.pt")
    restore_rng(load_checkpoint(tmp_path)["rng"], gen)
    assert np.random.rand() == expected
