"""Attention kernel per run: PyTorch SDPA or vitft's matmul + softmax kernel (``vitft_eager``).

transformers runs ViT attention through ``torch.nn.functional.scaled_dot_product_attention``
(``attn_implementation="sdpa"``) by default, the usual choice on CUDA (fused kernels that never
materialize the attention matrix). On a CPU with AVX512-BF16, however, the matmul + softmax path
trained faster in bf16 in every run measured here (2-core EPYC: ViT-Tiny at 224 px, 197 tokens, 57
vs 45 img/s with transformers' eager kernel; ViT-Small 19 vs 14 in the Trainer; ViT-Tiny at 32 px,
65 tokens, 85 vs 119 ms per micro-batch), and the margin depends on the model width, sequence
length, batch, dtype and CPU. No fixed choice is safe, and timing one block in isolation proved
unreliable (it picked SDPA for ViT-Small in one of two quiet runs), so ``attention="auto"``
measures the real thing: the run's first training micro-batches alternate between the two kernels
(:class:`AttentionTrial`), forward and backward are timed, and the faster kernel is kept for the
rest of the run. Nothing is computed twice, so the trial costs only the difference on a few
micro-batches. The choice affects speed only: both kernels compute the same attention (equal up
to float rounding), and the saved model loads with the library default.

``vitft_eager`` (:func:`vitft_eager_attention`) is transformers' eager kernel (scores = Q K^T *
scale, softmax, dropout, @ V) with one change: the softmax runs in the dtype of the scores. The
library's kernel computes it in float32 and casts the probabilities back
(``softmax(..., dtype=float32).to(query.dtype)``); under bf16 autocast that is four casts of the
(batch, heads, tokens, tokens) matrix per layer and step, forward and backward, 13% of a ViT-Tiny
step here. PyTorch's CPU softmax on bf16 input accumulates in float32 and rounds the output to
bf16, so the forward probabilities are those of the library's kernel up to the rounding of the
scaled queries (the scale is applied to Q, not to the larger score matrix); the backward's inputs
stay bf16, as they are in SDPA's math path. In float32 both kernels compute the same attention.
Measured (ViT-Tiny 224, batch 32, bf16 autocast, 2-core Xeon with AMX, alternating, median of 8):
1.29x SDPA's training step against 1.19x for the library's eager kernel (ViT-Small: 1.23x vs
1.14x).

Reference: the transformers attention-interface docs
(https://huggingface.co/docs/transformers/en/attention_interface) and
``PreTrainedModel.set_attn_implementation``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .config import Attention

__all__ = ["Attention", "AttentionTrial", "VITFT_EAGER", "can_switch_attention", "current_attention",
           "evaluation_attention", "memory_file", "memory_key", "recall", "remember", "set_attention",
           "vitft_eager_attention"]

#: The name :func:`vitft_eager_attention` is registered under in transformers' ``AttentionInterface``.
VITFT_EAGER = "vitft_eager"

#: The kernel validation runs with (see :func:`evaluation_attention`).
EVALUATION_KERNEL = "sdpa"

#: Kernels ``auto`` chooses between; the first is the library default and is kept unless the
#: second is at least ``AUTO_MARGIN`` faster (timing noise must not flip the choice).
CANDIDATES = ("sdpa", VITFT_EAGER)
#: 5%: in-run trials of ViT-Small (hymenoptera, batch 32, bf16, 2-core EPYC, 2026-12-03) timed
#: ``vitft_eager``'s best micro-batch at 0.79-0.96x SDPA's in eight runs (0.77-0.80x alternating
#: outside a run): a 10% margin kept SDPA in three of them, a 5% margin in one (a run of the
#: older trial, with two ``vitft_eager`` timings). A wrong SDPA costs ViT-Small ~25% of its
#: training time; a wrong ``vitft_eager`` inside the margin costs at most about the margin.
AUTO_MARGIN = 0.05


def vitft_eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Matmul + softmax attention with the softmax in the scores' dtype (see the module docstring).

    The signature is transformers' attention interface. What this kernel does not implement
    (a causal mask without an explicit mask, grouped key/value heads, a position bias, soft-capping)
    goes to transformers' SDPA kernel, so any model that can run ``sdpa`` can run this name.

    Args:
        module: the attention layer (read: ``is_causal``, ``num_key_value_groups``, ``training``).
        query, key, value: float tensors of shape (batch, heads, tokens, head_dim), one dtype
            (bf16 under autocast).
        attention_mask: None, an additive float mask or a boolean keep-mask broadcastable to
            (batch, heads, tokens, tokens).
        scaling: the score scale; default ``head_dim ** -0.5`` (Vaswani et al. 2017).
        dropout: attention-probability dropout, applied in training mode only.

    Returns:
        ``(output, probabilities)``: output (batch, tokens, heads, head_dim), contiguous; the
        probabilities (batch, heads, tokens, tokens) in the scores' dtype.
    """
    is_causal = kwargs.get("is_causal")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if ((is_causal and attention_mask is None and query.shape[2] > 1) or getattr(module, "num_key_value_groups", 1) > 1
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    # The scale goes on the queries (tokens x head_dim) rather than the scores (tokens x tokens):
    # fewer multiplications, and exact for head_dim 64 (scale 1/8).
    scores = torch.matmul(query * scaling, key.transpose(2, 3))
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probabilities = torch.softmax(scores, dim=-1)
    probabilities = nn.functional.dropout(probabilities, p=dropout, training=module.training)
    output = torch.matmul(probabilities, value).transpose(1, 2).contiguous()
    return output, probabilities


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VITFT_EAGER, vitft_eager_attention)


_register()


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
    there SDPA was the faster on the CPUs where matmul + softmax won training (ViT-Tiny 224, batch
    32, bf16 autocast, inference mode, 2-core EPYC under load, best of 3 alternating: 22.7 vs 38.2 s
    and 28.5 vs 36.8 s per batch against transformers' eager kernel in two runs; 2-core Xeon with
    AMX, median of 6: 354 ms against 422 ms for ``vitft_eager`` and 488 ms for eager). It is also the kernel the saved model loads with, so
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


# ------------------------------------------------------------------------------------------------
# Remembered decisions: a trial's result per machine, software and model shape
# ------------------------------------------------------------------------------------------------

#: A remembered decision older than this is measured again (a new trial).
MEMORY_DAYS = 30
#: Entries kept in the memory file (the most recent).
MEMORY_ENTRIES = 200
#: Part of every memory key: raised when the trial changes, so decisions of the older trial are
#: measured again. 2: short micro-batches are redone and the trial spans epochs (2026-12-03).
TRIAL_VERSION = 2


def memory_file() -> Path:
    """The remembered trial results: ``<VITFT_HOME>/cache/attention.json`` (JSON data only)."""
    from .data import default_home

    return default_home() / "cache" / "attention.json"


def _processor_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_key(model: nn.Module, device: torch.device, precision: str, shape: dict[str, Any]) -> str:
    """What a trial's result depends on, as one string: the trial's version
    (:data:`TRIAL_VERSION`), the machine (processor, cores, torch threads or GPU name), torch and
    transformers versions, the model (class, parameters, attention
    width) and the run's shape (``shape``: micro-batch, input size, frozen blocks, ... as the
    caller lists them) and precision.

    Args:
        model: the model before freezing (its class and size).
        device: where it trains.
        precision: the resolved precision (``"bf16"``, ``"fp16"``, ``"fp32"``).
        shape: JSON-serializable settings that change the compute of a training step.
    """
    import transformers

    if device.type == "cuda":
        machine: dict[str, Any] = {"gpu": torch.cuda.get_device_name(device)}
    else:
        machine = {"cpu": _processor_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads()}
    config = getattr(model, "config", None)
    width = {name: getattr(config, name, None) for name in ("hidden_size", "num_attention_heads", "image_size",
                                                             "patch_size")}
    key = {"trial": TRIAL_VERSION, "device": device.type, **machine, "torch": torch.__version__,
           "transformers": transformers.__version__, "model": type(model).__name__,
           "parameters": sum(p.numel() for p in model.parameters()), **width, "precision": precision, **shape}
    return json.dumps(key, sort_keys=True, default=str)


def _read_memory() -> dict[str, Any]:
    try:
        data = json.loads(memory_file().read_text())
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    return entries if isinstance(entries, dict) else {}


def recall(key: str, now: float | None = None) -> dict[str, Any] | None:
    """The remembered decision for ``key``: ``{"kernel", "best_ms", "measured"}`` (seconds since
    the epoch), or None when there is none, it is older than :data:`MEMORY_DAYS`, or the file is
    missing or unreadable (a damaged file only means a new trial)."""
    entry = _read_memory().get(key)
    now = time.time() if now is None else now
    if not isinstance(entry, dict) or entry.get("kernel") not in CANDIDATES:
        return None
    measured, best = entry.get("measured"), entry.get("best_ms")
    if not isinstance(measured, (int, float)) or not 0 <= now - measured <= MEMORY_DAYS * 86400:
        return None
    if not isinstance(best, dict) or not all(isinstance(v, (int, float)) for v in best.values()):
        return None
    return entry


def remember(key: str, kernel: str, best_s: dict[str, float], now: float | None = None) -> None:
    """Stores a trial's decision (atomically: a temporary file, then a rename). Failing to write
    (read-only home, full disk) changes nothing but the next run's trial.

    Args:
        key: from :func:`memory_key`.
        kernel: the kernel the trial kept.
        best_s: the best forward + backward seconds per kernel (:meth:`AttentionTrial.best`).
    """
    entries = _read_memory()
    entries.pop(key, None)
    entries[key] = {"kernel": kernel, "best_ms": {k: round(1000 * v, 1) for k, v in best_s.items()},
                    "measured": time.time() if now is None else now}
    entries = dict(list(entries.items())[-MEMORY_ENTRIES:])
    from .runs import atomic_write_text

    path = memory_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"version": 1, "entries": entries}, indent=1))
    except OSError:
        pass


def describe_recalled(entry: dict[str, Any]) -> str:
    """E.g. ``this machine's trial of 2026-12-02 for the same model, shape and precision: sdpa
    1213 ms, vitft_eager 1004 ms``."""
    date = time.strftime("%Y-%m-%d", time.localtime(entry["measured"]))
    timings = ", ".join(f"{name} {ms:.0f} ms" for name, ms in entry["best_ms"].items())
    return f"this machine's trial of {date} for the same model, shape and precision: {timings}"


class AttentionTrial:
    """Times the first training micro-batches with each kernel in turn and keeps the faster.

    Schedule: ``sdpa, vitft_eager`` repeated ``warmup + repeats`` times (8 micro-batches by default).
    The first ``warmup`` round is not timed (it builds the kernels for these shapes); for the
    others, the forward + backward seconds of each micro-batch are recorded. Alternating means a
    change in the machine's load hits both kernels alike, and the minimum per kernel ignores
    micro-batches that were interrupted. ``vitft_eager`` replaces the default only when its best
    time is at least :data:`AUTO_MARGIN` shorter.

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
        redo_invalid: a timed micro-batch that cannot be compared (``end(valid=False)``) is
            redone at the end of the schedule with the same kernel, at most ``repeats`` times in
            all, so each kernel gets its ``repeats`` timings (an epoch's short last micro-batch
            used to cost one kernel a third of its samples: a ViT-Small trial on hymenoptera then
            kept SDPA in one of three runs, from two noisy ``vitft_eager`` timings, though
            ``vitft_eager`` trains it 1.3x faster). False for data-parallel runs, whose
            processes must keep one schedule.
    """

    def __init__(self, model: nn.Module, device: torch.device, warmup: int = 1, repeats: int = 3,
                 redo_invalid: bool = True) -> None:
        self.model = model
        self.device = device
        self.warmup = warmup
        self.schedule = [name for _ in range(warmup + repeats) for name in CANDIDATES]
        self.redos_left = repeats if redo_invalid else 0
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
                advances but its time is not recorded; with ``redo_invalid`` the slot is
                appended to the schedule again.
        """
        _synchronize(self.device)
        elapsed = time.perf_counter() - self._start
        if self.index >= self.warmup * len(CANDIDATES):
            if valid:
                self.seconds[self.kernel].append(elapsed)
            elif self.redos_left > 0:
                self.redos_left -= 1
                self.schedule.append(self.kernel)
        self.index += 1
        return self.done

    def best(self) -> dict[str, float]:
        """Best timed seconds per kernel (kernels not timed yet are left out)."""
        return {name: min(times) for name, times in self.seconds.items() if times}

    def alternative_is_faster(self) -> bool:
        """True when the second candidate's (``vitft_eager``) best micro-batch was at least
        ``AUTO_MARGIN`` faster than the default's (sdpa)."""
        best = self.best()
        default, alternative = CANDIDATES
        return alternative in best and default in best and best[alternative] < (1 - AUTO_MARGIN) * best[default]

    def decide(self, alternative: bool | None = None) -> str:
        """Switches the model to the chosen kernel and returns it.

        Args:
            alternative: the decision when it was agreed elsewhere (a data-parallel run votes
                across processes); default :meth:`alternative_is_faster`.
        """
        if alternative is None:
            alternative = self.alternative_is_faster()
        chosen = CANDIDATES[1] if alternative else CANDIDATES[0]
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
