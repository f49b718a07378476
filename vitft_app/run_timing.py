"""Where a run's time went: one ``time:`` line in ``train.log`` at the end of :func:`train`.

A :class:`PhaseClock` attributes the wall time between two :meth:`~PhaseClock.mark` calls to the
phase named by the second one, so the training loop needs one line per phase boundary and no
re-indented blocks. The line reads, for example::

    time: set-up 2.1 s, training first epoch 9.8 s, training later epochs 18.4 s, validation 4.0 s,
    saving best model 0.6 s, checkpoints 1.2 s, other 0.3 s

"training first epoch" is the first epoch this process trained (the attention trial and the
decode cache's filling happen there); ``benchmarks/bench_whole_run.py`` compares it with the
later epochs to show the first-epoch extras. Costs two ``perf_counter`` calls per phase.
"""

from __future__ import annotations

import time

__all__ = ["PhaseClock"]


class PhaseClock:
    """Accumulates wall seconds per named phase, in the order phases first appear.

    Args:
        start: ``time.perf_counter()`` value the first phase starts at (default: now).
    """

    def __init__(self, start: float | None = None) -> None:
        self._last = time.perf_counter() if start is None else start
        self.seconds: dict[str, float] = {}
        self._trained_epochs = 0

    def mark(self, phase: str) -> float:
        """Charges the time since the previous mark to ``phase``; returns those seconds."""
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed
        return elapsed

    def mark_training(self) -> float:
        """:meth:`mark` for an epoch's training micro-batches: the first epoch is kept apart."""
        self._trained_epochs += 1
        return self.mark("training first epoch" if self._trained_epochs == 1 else "training later epochs")

    def describe(self) -> str:
        """The ``time:`` line (phases in order, seconds with one decimal)."""
        parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.seconds.items())
        return f"time: {parts}"
