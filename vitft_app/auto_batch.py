"""``--batch-size auto``: the largest micro-batch that fits in memory, the effective batch kept.

Before the first step, a probe runs one real forward and backward pass of the run's model (frozen
blocks as configured, the run's autocast) on a batch of random pixels of the model's input size.
The probe is wrapped in accelerate's ``find_executable_batch_size``: it starts at the configured
``batch_size`` and, on an out-of-memory error (accelerate's ``should_reduce_batch_size``: CUDA,
XPU, MPS or CPU allocator messages), frees the device cache and tries again at half the size. The
effective batch ``batch_size x grad_accum_steps`` stays what the config asked for: the number of
accumulated micro-batches grows as the micro-batch shrinks (``ceil(effective / chosen)``), so the
optimizer sees the same batch and the learning rate needs no change.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable

import torch

from .config import TrainConfig

logger = logging.getLogger(__name__)


def halving_search(step: Callable[[int], None], starting_batch_size: int) -> tuple[int, list[int]]:
    """Runs ``step(batch_size)`` from ``starting_batch_size``, halving it after each out-of-memory error.

    Args:
        step: runs one trial at a batch size; raises the framework's out-of-memory error when it
            does not fit (any other exception propagates unchanged).
        starting_batch_size: the first size tried (>= 1).

    Returns:
        ``(chosen batch size, sizes that ran out of memory, largest first)``.

    Raises:
        RuntimeError: even a batch of 1 ran out of memory (accelerate's "No executable batch
            size found, reached zero.").
    """
    from accelerate.utils import find_executable_batch_size

    failed: list[int] = []
    current = {"size": starting_batch_size}

    def halve() -> int:
        failed.append(current["size"])
        current["size"] //= 2
        return current["size"]

    @find_executable_batch_size(starting_batch_size=starting_batch_size, reduce_batch_size_fn=halve)
    def attempt(batch_size: int) -> int:
        current["size"] = batch_size
        step(batch_size)
        return batch_size

    return attempt(), failed


def training_step_probe(model: torch.nn.Module, pixel_shape: tuple[int, int, int], device: torch.device,
                        autocast: Callable[[], Any]) -> Callable[[int], None]:
    """One forward and backward pass of ``model`` at a batch size, gradients cleared after.

    Args:
        model: the run's model on ``device``, frozen as configured (the probe leaves its weights,
            gradients and train/eval mode as they were).
        pixel_shape: ``(3, H, W)`` of one input image.
        device: where the model lives.
        autocast: the run's autocast context factory (:meth:`~vitft_app.device.DevicePlan.autocast`).

    Returns:
        ``step(batch_size)`` for :func:`halving_search`.
    """

    def step(batch_size: int) -> None:
        was_training = model.training
        model.train()
        try:
            pixels = torch.randn(batch_size, *pixel_shape, device=device)
            with autocast():
                logits = model(pixel_values=pixels).logits
            logits.float().sum().backward()
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)

    return step


def resolve_auto_batch_size(config: TrainConfig, step: Callable[[int], None]) -> tuple[TrainConfig, str]:
    """The config with the micro-batch that fits and the accumulation that keeps the effective batch.

    Args:
        config: a config with ``auto_batch_size`` on; ``batch_size`` is the first size tried.
        step: the trial (:func:`training_step_probe` in training).

    Returns:
        ``(config with batch_size and grad_accum_steps replaced, one log line)``; the line reads
        ``"batch size auto: 8 images per micro-batch x 4 accumulated = 32 effective (32, 16 ran out
        of memory)"``.

    Raises:
        RuntimeError: not even one image fits (the message says so).
    """
    effective = config.batch_size * config.grad_accum_steps
    try:
        chosen, failed = halving_search(step, config.batch_size)
    except RuntimeError as exc:
        if "reached zero" not in str(exc):
            raise
        raise RuntimeError("batch size auto: even 1 image per micro-batch runs out of memory on this device;"
                           " use a smaller model or image size") from exc
    accum = math.ceil(effective / chosen)
    resolved = dataclasses.replace(config, batch_size=chosen, grad_accum_steps=accum)
    tried = f" ({', '.join(map(str, failed))} ran out of memory)" if failed else " (fits at the first try)"
    note = (f"batch size auto: {chosen} images per micro-batch x {accum} accumulated = {chosen * accum}"
            f" effective{tried}")
    logger.info(note)
    return resolved, note
