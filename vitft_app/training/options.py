"""Engine options: how the engine runs a config, not what it learns.

They change speed and memory only (the losses, metrics and weights of a run are the same either
way), so they are not part of :class:`~vitft_app.config.TrainConfig` and not of ``config.json``;
they are passed explicitly to :func:`~vitft_app.training.train` (and to
:class:`~vitft_app.jobs.JobRunner`) and written to the run's ``train.log`` at the start.
Benchmarks and tests turn the caches off here to compare (there are no module-level switches).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Memory tier of the decode cache by default; beyond it entries go to ``run_dir/DECODE_CACHE_DIR``.
DEFAULT_DECODE_CACHE_BUDGET_BYTES = 2 * 1024**3
#: The decode cache's disk tier inside the run folder (removed when the run ends).
DECODE_CACHE_DIR = ".decode-cache"


@dataclass(frozen=True)
class EngineOptions:
    """Speed and memory options of the engine (never its results).

    Attributes:
        feature_cache: compute the frozen blocks' output once when nothing random touches the
            pixels (:mod:`vitft_app.feature_cache`); where it applies is decided by
            :func:`~vitft_app.training.resolve_train_plan`.
        decode_cache: keep decoded, resized images of splits that are never randomly augmented
            (:mod:`vitft_app.decode_cache`).
        decode_cache_budget_bytes: memory tier of the decode cache, bytes; beyond it entries
            spill to ``run_dir/.decode-cache`` (with ``num_workers > 0`` everything spills, as
            worker processes share only the disk tier).
        progress_interval_s: seconds between two ``StepProgress`` events (the live view polls
            once a second; 0 sends one per optimizer step).
        attention_memory: with ``attention="auto"``, remember the attention trial's decision per
            machine, software and model shape in ``<VITFT_HOME>/cache/attention.json`` and skip
            the trial when a decision younger than 30 days exists
            (:func:`vitft_app.attention.recall`).
    """

    feature_cache: bool = True
    decode_cache: bool = True
    decode_cache_budget_bytes: int = DEFAULT_DECODE_CACHE_BUDGET_BYTES
    progress_interval_s: float = 1.0
    attention_memory: bool = True

    def __post_init__(self) -> None:
        if self.decode_cache_budget_bytes < 0:
            raise ValueError(f"decode_cache_budget_bytes must be >= 0, got {self.decode_cache_budget_bytes}")
        if self.progress_interval_s < 0:
            raise ValueError(f"progress_interval_s must be >= 0, got {self.progress_interval_s}")

    def describe(self) -> str:
        """One line for ``train.log``, e.g. ``engine options: feature cache on, decode cache on
        (memory tier 2048 MiB), attention memory on, progress every 1 s``."""
        onoff = lambda flag: "on" if flag else "off"  # noqa: E731
        tier = f" (memory tier {self.decode_cache_budget_bytes / 2**20:.0f} MiB)" if self.decode_cache else ""
        return (f"engine options: feature cache {onoff(self.feature_cache)}, decode cache"
                f" {onoff(self.decode_cache)}{tier}, attention memory {onoff(self.attention_memory)},"
                f" progress every {self.progress_interval_s:g} s")
