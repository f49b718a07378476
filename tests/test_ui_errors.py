"""An unexpected exception in a UI handler: its traceback in the server log (and the run's
train.log), one line for the user."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from vitft_app.jobs import JobRunner
from vitft_app.log_setup import configure_logging
from vitft_app.ui import train_tab
from vitft_app.ui.app import AppContext, AppSettings
from vitft_app.ui.errors import unexpected_error

FIXTURE = Path(__file__).parent / "fixtures" / "run-before-runstatus"


def _ctx(tmp_path, digits_small):
    settings = AppSettings(data_root=digits_small.parent, runs_dir=tmp_path / "runs",
                           example_dir=tmp_path / "example", device="cpu")
    return AppContext(settings=settings, runner=JobRunner(settings.runs_dir, device="cpu"))


def _explode(*args, **kwargs):
    raise RuntimeError("simulated failure\ninside the runner")


def test_an_unexpected_error_when_resuming_is_logged_with_its_traceback(tmp_path, digits_small, monkeypatch, caplog):
    ctx = _ctx(tmp_path, digits_small)
    run_dir = ctx.settings.runs_dir / FIXTURE.name
    shutil.copytree(FIXTURE, run_dir)
    monkeypatch.setattr(ctx.runner, "resume", _explode)
    with caplog.at_level(logging.ERROR, logger="vitft_app"):
        text, resumed = train_tab.resume_run(ctx, str(run_dir))
    # The user: one line, the type and the message, no traceback.
    assert text == "✗ Could not resume: RuntimeError: simulated failure inside the runner" and resumed is None
    assert "\n" not in text and "Traceback" not in text
    # The server log: the record carries the exception, so its traceback is printed.
    [record] = [r for r in caplog.records if r.name == "vitft_app.ui.errors"]
    assert record.exc_info and record.exc_info[0] is RuntimeError
    assert "Traceback (most recent call last)" in caplog.text and "_explode" in caplog.text
    # The run's own log gets it too.
    log = (run_dir / "train.log").read_text()
    assert "app: Could not resume: RuntimeError: simulated failure inside the runner" in log
    assert "Traceback (most recent call last)" in log and "_explode" in log


def test_an_unexpected_error_when_starting_is_logged_and_shown_as_one_line(tmp_path, digits_small,
                                                                           monkeypatch, caplog):
    ctx = _ctx(tmp_path, digits_small)
    monkeypatch.setattr(ctx.runner, "start", _explode)
    values = {"model": "vit-tiny-scratch", "image_size": 32, "epochs": 1, "batch_size": 8, "lr": 1e-3, "augment": "none", "precision": "fp32"}
    with caplog.at_level(logging.ERROR, logger="vitft_app"):
        text, run = train_tab.start_run(ctx, values, str(digits_small))
    assert text == "✗ Could not start: RuntimeError: simulated failure inside the runner" and run is None
    assert any(r.exc_info and r.exc_info[0] is RuntimeError for r in caplog.records)


def test_the_helper_survives_a_run_folder_that_is_gone(tmp_path, caplog):
    try:
        raise KeyError("x")
    except KeyError as exc:
        with caplog.at_level(logging.WARNING, logger="vitft_app"):
            text = unexpected_error(exc, "Could not do it", run_dir=tmp_path / "missing")
    assert text == "✗ Could not do it: KeyError: 'x'"
    assert "could not write to the train.log" in caplog.text


def test_configure_logging_adds_one_stderr_handler(capsys):
    package = logging.getLogger("vitft_app")
    before = list(package.handlers), package.level, package.propagate
    try:
        configure_logging(logging.INFO)
        configure_logging(logging.INFO)  # idempotent
        assert [h.get_name() for h in package.handlers].count("vitft-stderr") == 1
        logging.getLogger("vitft_app.jobs").info("hello from the engine")
        err = capsys.readouterr().err
        assert "INFO vitft_app.jobs: hello from the engine" in err
    finally:
        package.handlers[:] = before[0]
        package.setLevel(before[1])
        package.propagate = before[2]
