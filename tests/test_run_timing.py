"""The "time:" line of train.log: where a run's wall time went (vitft_app.run_timing)."""

from __future__ import annotations

from vitft_app import run_timing
from vitft_app.run_timing import PhaseClock


def test_each_mark_charges_the_time_since_the_previous_one_and_epoch_one_is_kept_apart(monkeypatch):
    now = [10.0]
    monkeypatch.setattr(run_timing.time, "perf_counter", lambda: now[0])
    clock = PhaseClock()
    for step, phase in ((2.0, "set-up"), (5.0, None), (1.0, "validation"), (4.0, None), (1.5, "validation"),
                        (0.25, "checkpoints")):
        now[0] += step
        if phase is None:
            clock.mark_training()
        else:
            clock.mark(phase)
    assert clock.seconds == {"set-up": 2.0, "training first epoch": 5.0, "validation": 2.5,
                             "training later epochs": 4.0, "checkpoints": 0.25}
    assert clock.describe() == ("time: set-up 2.0 s, training first epoch 5.0 s, validation 2.5 s,"
                                " training later epochs 4.0 s, checkpoints 0.2 s")
