"""The one way a UI handler reports an unexpected exception.

Expected problems (bad input, a busy runner, a missing model) are shown as they are by each
handler. Anything else goes through :func:`unexpected_error`: the traceback is logged (the server
log on stderr, and the run's ``train.log`` when a run is involved) and the user sees one line.
"""

from __future__ import annotations

import logging
import os
import traceback

from ..runs import append_run_log

logger = logging.getLogger(__name__)


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (whitespace, newlines included, collapsed)."""
    return " ".join(str(exc).split())


def unexpected_error(exc: BaseException, what: str, *, run_dir: str | os.PathLike | None = None,
                     mark: str = "✗ ", with_type: bool = True) -> str:
    """Logs an unexpected exception of a UI handler and returns the line the user sees.

    Args:
        exc: the exception (call this in its ``except`` block).
        what: what failed, for people: ``"Could not start"``.
        run_dir: the run the action was about; its ``train.log`` gets the traceback too.
        mark: the status mark the message starts with.
        with_type: name the exception type in the message (``RuntimeError: ...``).

    Returns:
        ``"✗ <what>: <ExceptionType>: <message>"`` on one line.
    """
    logger.error("%s: unexpected %s", what, type(exc).__name__, exc_info=exc)
    if run_dir:
        details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            append_run_log(run_dir, f"app: {what}: {type(exc).__name__}: {one_line(exc)}\n{details.rstrip()}")
        except OSError as log_error:  # the server log above has it; a missing run folder must not hide it
            logger.warning("could not write to the train.log of %s: %s", run_dir, log_error)
    text = f"{type(exc).__name__}: {one_line(exc)}" if with_type else one_line(exc)
    return f"{mark}{what}: {text}"
