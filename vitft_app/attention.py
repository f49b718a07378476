"""Attention kernel per run: PyTorch SDPA or the eager (matmul + softmax) implementation.

transformers runs ViT attention through ``torch.nn.functional.scaled_dot_product_attention``
(``attn_implementation="sdpa"``) by default. That is the right choice on CUDA and in fp32, but on
CPUs with AVX512-BF16 the eager path is faster in bf16 at ViT's sequence lengths (measured here:
ViT-Tiny at 224 px, 197 tokens, trains at 57 img/s eager vs 41 img/s SDPA; at 65 tokens SDPA is
2x faster). No fixed choice wins, so ``attention="auto"`` times both kernels on one copy of an
encoder block with the run's own micro-batch shape, precision and device (well under a second for
ViT-Tiny, about 1 s for ViT-B/16 on a 2-core CPU) and keeps the faster one. The choice affects
speed only: both kernels compute the same attention (equal to float rounding), and the saved model
loads with the library default.

Reference: the transformers attention-interface docs
(https://huggingface.co/docs/transformers/en/attention_interface) and
``PreTrainedModel.set_attn_implementation``.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
import torch
from torch import nn

from .config import Attention
from .device import DevicePlan
from .modeling import encoder_parts

__all__ = ["Attention", "AttentionChoice", "choose_attention", "current_attention", "set_attention"]

#: Kernels ``auto`` chooses between; the first is the library default and is kept unless another
#: is at least ``AUTO_MARGIN`` faster (timing noise must not flip the choice).
CANDIDATES = ("sdpa", "eager")
AUTO_MARGIN = 0.10
#: Micro-batch size of the probe: attention cost is linear in the batch, so the ratio between the
#: kernels is the same as at the run's batch size, and the probe stays short.
PROBE_MAX_BATCH = 16
PROBE_REPEATS = 3


@dataclass(frozen=True)
class AttentionChoice:
    """The kernel a run uses and why.

    Attributes:
        implementation: ``"sdpa"`` or ``"eager"`` (a transformers ``attn_implementation``).
        reason: one line for the run log, with the timings when they were measured.
        seconds: per-kernel median seconds of one block's forward + backward on the probe batch
            (empty when nothing was timed).
    """

    implementation: str
    reason: str
    seconds: dict[str, float]


def current_attention(model: nn.Module) -> str:
    """Returns the model's ``config._attn_implementation`` (``"sdpa"`` when unset)."""
    return str(getattr(model.config, "_attn_implementation", None) or "sdpa")


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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _block_seconds(block: nn.Module, hidden: torch.Tensor, plan: DevicePlan, implementation: str) -> float:
    """Median seconds of ``PROBE_REPEATS`` forward + backward passes of ``block`` (after one warmup)."""
    for module in block.modules():
        config = getattr(module, "config", None)
        if config is not None:
            config._attn_implementation = implementation
    times = []
    for repeat in range(PROBE_REPEATS + 1):
        _synchronize(plan.device)
        start = time.perf_counter()
        with plan.autocast():
            out = block(hidden)
            out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()
        _synchronize(plan.device)
        if repeat:
            times.append(time.perf_counter() - start)
        block.zero_grad(set_to_none=True)
        hidden.grad = None
    return statistics.median(times)


def choose_attention(
    model: nn.Module,
    plan: DevicePlan,
    batch_size: int,
    image_size: tuple[int, int],
    requested: str = "auto",
    token_keep: float = 1.0,
) -> AttentionChoice:
    """Decides the attention kernel for a run and switches ``model`` to it.

    Args:
        model: a ViT-style image classifier (``embeddings`` + encoder blocks), already on
            ``plan.device``; it is switched in place (its weights are untouched).
        plan: the run's device and precision (the probe runs under the same autocast).
        batch_size: images per micro-batch; the probe uses ``min(batch_size, 16)``.
        image_size: ``(height, width)`` of the model input in pixels.
        requested: ``"sdpa"`` or ``"eager"`` to force a kernel, ``"auto"`` to time both.
        token_keep: fraction of the tokens the training forward keeps (``1 - patch_dropout``); the
            probe times that sequence length.

    Returns:
        An :class:`AttentionChoice`. With ``"auto"``, a model whose attention cannot be switched,
        or whose blocks cannot be probed, keeps its current kernel (the reason says why).

    Raises:
        ValueError: a forced kernel the model cannot use.
    """
    if requested != "auto":
        set_attention(model, requested)
        return AttentionChoice(requested, f"attention: {requested} (as requested)", {})
    default = current_attention(model)
    if not callable(getattr(model, "set_attn_implementation", None)) or default not in CANDIDATES:
        return AttentionChoice(default, f"attention: {default} (this model's kernel cannot be switched)", {})
    try:
        embeddings, blocks, _ = encoder_parts(model)
        height, width = image_size
        # The probe never draws from the run's RNG streams (a resumed run, which does not probe,
        # must continue them exactly): dropout is off in eval mode and the input has its own
        # generator; fork_rng covers anything else.
        forked = [plan.device] if plan.device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked), torch.no_grad():
            was_training = embeddings.training
            tokens = embeddings.eval()(torch.zeros(1, 3, height, width, device=plan.device))
            embeddings.train(was_training)
        tokens = tokens[0] if isinstance(tokens, tuple) else tokens
        generator = torch.Generator(device="cpu").manual_seed(0)
        length = 1 + int(round(token_keep * (tokens.shape[1] - 1)))  # CLS + the patch tokens kept
        hidden = torch.randn((min(batch_size, PROBE_MAX_BATCH), length, tokens.shape[2]), generator=generator)
        hidden = hidden.to(plan.device).requires_grad_(True)
        block = copy.deepcopy(blocks[0]).eval().requires_grad_(True)
        for module in block.modules():  # time the kernels alone, without hooks copied from the model
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
        with torch.random.fork_rng(devices=forked):
            seconds = {name: _block_seconds(block, hidden, plan, name) for name in CANDIDATES}
        del block, hidden
    except Exception as error:  # noqa: BLE001 - an unusual architecture keeps its default kernel
        return AttentionChoice(default, f"attention: {default} (kernel probe skipped: {error})", {})
    best = min(seconds, key=seconds.get)
    chosen = best if seconds[best] < (1 - AUTO_MARGIN) * seconds[default] else default
    set_attention(model, chosen)
    timings = ", ".join(f"{name} {1000 * s:.1f} ms" for name, s in seconds.items())
    return AttentionChoice(
        chosen, f"attention: {chosen} (auto; one block forward + backward, {timings}, {length} tokens)", seconds
    )
