"""Attention kernel per run: PyTorch SDPA or the eager (matmul + softmax) implementation.

transformers runs ViT attention through ``torch.nn.functional.scaled_dot_product_attention``
(``attn_implementation="sdpa"``) by default, the usual choice on CUDA (fused kernels that never
materialize the attention matrix). On a CPU with AVX512-BF16, however, the eager path trained
faster in bf16 in every run measured here (2-core EPYC: ViT-Tiny at 224 px, 197 tokens, 57 vs
45 img/s; ViT-Small 19 vs 14 in the Trainer; ViT-Tiny at 32 px, 65 tokens, 85 vs 119 ms per
micro-batch), and the margin depends on the model width, sequence length, batch, dtype and CPU.
No fixed choice is safe, and timing one block in isolation proved unreliable (it picked SDPA for
ViT-Small in one of two quiet runs), so
``attention="auto"`` measures the real thing: the run's first training micro-batches alternate
between the two kernels (:class:`AttentionTrial`), forward and backward are timed, and the faster
kernel is kept for the rest of the run. Nothing is computed twice, so the trial costs only the
difference on a few micro-batches. The choice affects speed only: both kernels compute the same
attention (equal up to float rounding), and the saved model loads with the library default.

Reference: the transformers attention-interface docs
(https://huggingface.co/docs/transformers/en/attention_interface) and
``PreTrainedModel.set_attn_implementation``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch
from torch import nn

from .config import Attention

__all__ = ["Attention", "AttentionTrial", "can_switch_attention", "current_attention", "evaluation_attention",
           "set_attention"]

#: The kernel validation runs with (see :func:`evaluation_attention`).
EVALUATION_KERNEL = "sdpa"

#: Kernels ``auto`` chooses between; the first is the library default and is kept unless another
#: is at least ``AUTO_MARGIN`` faster (timing noise must not flip the choice).
CANDIDATES = ("sdpa", "eager")
AUTO_MARGIN = 0.10


def current_attention(model: nn.Module) -> str:
    """Returns the model's ``config._attn_implementation`` (``"sdpa"`` when unset)."""
    return str(getattr(model.config, "_attn_implementation", None) or "sdpa")


def can_switch_attention(model: nn.Module) -> bool:
    """True when ``model`` runs one of :data:`CANDIDATES` and transformers can switch it at runtime."""
    check = getattr(model, "_can_set_attn_implementation", None)
    return (
        callable(getattr(model, "set_attn_implementation", None))
        and current_attention(model) in CANDIDATES
        and (check is None or bool(check()))
    )


def set_attention(model: nn.Module, implementation: str) -> None:
    """Switches every attention layer of ``model`` to ``implementation`` in place.

    Raises:
        ValueError: the model cannot switch (no ``set_attn_implementation``, or transformers
            refuses the kernel for this architecture).
    """
    if current_attention(model) == implementation:
        return
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise ValueError(f"{type(model).__name__} cannot switch its attention implementation")
    try:
        setter(implementation)
    except (ValueError, ImportError) as error:
        raise ValueError(f"{type(model).__name__} cannot use attention {implementation!r}: {error}") from error
    if current_attention(model) != implementation:
        raise ValueError(f"{type(model).__name__} does not support switching attention to {implementation!r}")


@contextlib.contextmanager
def evaluation_attention(model: nn.Module) -> Iterator[None]:
    """Runs the block with the model on :data:`EVALUATION_KERNEL` (SDPA), then switches it back.

    The trial picks the kernel for training (forward + backward). Validation is forward only, and
    there SDPA was the faster on the CPU where eager won training (ViT-Tiny 224, batch 32, bf16
    autocast, inference mode, 2-core EPYC under load, best of 3 alternating: 22.7 vs 38.2 s and
    28.5 vs 36.8 s per batch in two runs). It is also the kernel the saved model loads with, so
    the validation accuracy is computed the way :class:`~vitft_app.predict.Predictor` will
    compute predictions. A model that cannot switch, or already runs SDPA, is left alone.
    :func:`~vitft_app.training.train` uses it with ``attention="auto"`` only (a forced kernel
    is what the user asked for, validation included).

    Args:
        model: the evaluated model (its copies, such as the EMA module, are switched separately).
    """
    previous = current_attention(model)
    switch = previous != EVALUATION_KERNEL and can_switch_attention(model)
    if switch:
        set_attention(model, EVALUATION_KERNEL)
    try:
        yield
    finally:
        if switch:
            set_attention(model, previous)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class AttentionTrial:
    """Times the first training micro-batches with each kernel in turn and keeps the faster.

    Schedule: ``sdpa, eager`` repeated ``warmup + repeats`` times (8 micro-batches by default).
    The first ``warmup`` round is not timed (it builds the kernels for these shapes); for the
    others, the forward + backward seconds of each micro-batch are recorded. Alternating means a
    change in the machine's load hits both kernels alike, and the minimum per kernel ignores
    micro-batches that were interrupted. Eager replaces the default only when its best time is at
    least :data:`AUTO_MARGIN` shorter.

    Usage in a training loop (the micro-batches of the trial are ordinary training steps)::

        trial = AttentionTrial(model, device)
        ...
        if not trial.done:
            trial.begin()        # switches the kernel, starts the clock
        forward_and_backward()
        if not trial.done and trial.end():   # True once the last timed micro-batch is in
            chosen = trial.decide()          # switches the model to the faster kernel

    Args:
        model: the model being trained (switched in place; its weights are untouched).
        device: where it runs (CUDA and MPS are synchronized around each timed micro-batch).
        warmup: untimed rounds; repeats: timed rounds.
    """

    def __init__(self, model: nn.Module, device: torch.device, warmup: int = 1, repeats: int = 3) -> None:
        self.model = model
        self.device = device
        self.warmup = warmup
        self.schedule = [name for _ in range(warmup + repeats) for name in CANDIDATES]
        self.seconds: dict[str, list[float]] = {name: [] for name in CANDIDATES}
        self.index = 0
        self._start = 0.0

    @property
    def done(self) -> bool:
        """True when every micro-batch of the schedule has been timed."""
        return self.index >= len(self.schedule)

    @property
    def kernel(self) -> str:
        """The kernel of the next micro-batch."""
        return self.schedule[self.index]

    def begin(self) -> None:
        """Switches the model to this micro-batch's kernel and starts the clock."""
        set_attention(self.model, self.kernel)
        _synchronize(self.device)
        self._start = time.perf_counter()

    def end(self, valid: bool = True) -> bool:
        """Stops the clock; returns True when this was the last micro-batch of the schedule.

        Args:
            valid: False for a micro-batch that must not be compared (not a full batch: an
                epoch's short last one, or one whose files failed to load): the schedule
                advances (data-parallel processes stay in step) but its time is not recorded.
        """
        _synchronize(self.device)
        elapsed = time.perf_counter() - self._start
        if valid and self.index >= self.warmup * len(CANDIDATES):
            self.seconds[self.kernel].append(elapsed)
        self.index += 1
        return self.done

    def best(self) -> dict[str, float]:
        """Best timed seconds per kernel (kernels not timed yet are left out)."""
        return {name: min(times) for name, times in self.seconds.items() if times}

    def faster_is_eager(self) -> bool:
        """True when eager's best micro-batch was at least ``AUTO_MARGIN`` faster than sdpa's."""
        best = self.best()
        return "eager" in best and "sdpa" in best and best["eager"] < (1 - AUTO_MARGIN) * best["sdpa"]

    def decide(self, eager: bool | None = None) -> str:
        """Switches the model to the chosen kernel and returns it.

        Args:
            eager: the decision when it was agreed elsewhere (a data-parallel run votes across
                processes); default :meth:`faster_is_eager`.
        """
        chosen = "eager" if (self.faster_is_eager() if eager is None else eager) else CANDIDATES[0]
        set_attention(self.model, chosen)
        self.index = len(self.schedule)
        return chosen

    def describe(self) -> str:
        """One line for the run log: the timings per kernel."""
        best = self.best()
        if len(best) < len(CANDIDATES):
            timed = ", ".join(f"{name} {1000 * s:.0f} ms" for name, s in best.items()) or "none"
            return f"too few full micro-batches to compare the kernels (timed: {timed}); the default is kept"
        timings = ", ".join(f"{name} {1000 * s:.0f} ms" for name, s in best.items())
        return f"best forward + backward per full micro-batch, alternating: {timings}"
