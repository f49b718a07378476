"""Logging set-up, done once by the front ends (``vitft app``, ``vitft demo``, the other commands).

Every module logs to its own ``logging.getLogger(__name__)``; nothing below ``vitft_app`` adds
handlers. :func:`configure_logging` gives the package's logger one stderr handler, so the engine's
decisions and the tracebacks of unexpected UI errors land in the server's log, and library
loggers keep their own settings. Tests never call it: pytest's log capture sees the records.
"""

from __future__ import annotations

import logging
import sys

#: The format of a server log line: time, level, module, message.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_NAME = "vitft-stderr"


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is at the time of each record (a
    front end, a test harness or a daemon may replace it after the handler was made)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property ignores it
        pass


def configure_logging(level: int = logging.INFO) -> logging.Logger:
    """Sends the ``vitft_app`` loggers' records at ``level`` and above to stderr (idempotent: a
    second call only changes the level).

    Args:
        level: ``logging.INFO`` for the app server (its log); the one-shot commands use
            ``logging.WARNING`` so their output stays their own.

    Returns:
        The package logger.
    """
    package = logging.getLogger("vitft_app")
    package.setLevel(level)
    if not any(handler.get_name() == _HANDLER_NAME for handler in package.handlers):
        handler = _StderrHandler()
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        package.addHandler(handler)
        package.propagate = False  # one copy of each line, whatever the root logger does
    return package
