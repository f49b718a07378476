"""The loop's validation: loss and metrics over the validation split, every epoch."""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from ..device import DevicePlan
from ..distributed import DistContext
from ..metrics import core_metrics
from .checks import DatasetError
from .losses import compute_loss


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    plan: DevicePlan,
    stop_event: threading.Event | None = None,
    multi_label: bool = False,
    dist_ctx: DistContext | None = None,
    cached: tuple[nn.Module, Any, int] | None = None,
) -> dict[str, float | None] | None:
    """Validation metrics over a loader (no augmentation, eval mode).

    Single-label: mean cross-entropy, accuracy and macro-F1 of the argmax. Multi-label: mean BCE,
    subset accuracy (every label right), micro and macro F1 at threshold 0.5 and mean average
    precision over the labels that have a positive (0 when none has). The metrics come from
    :func:`vitft_app.metrics.core_metrics`, the implementation :mod:`vitft_app.evaluate` uses.

    In a data-parallel run each process evaluates its shard of the validation images and the
    logits are gathered, so every process computes the same metrics over the whole split.

    ``cached = (suffix, features, batch_size)`` evaluates the trainable suffix on the frozen
    prefix's stored outputs instead of running the whole model on the loader's images (the same
    logits; see :mod:`vitft_app.feature_cache`).

    Returns:
        ``{"loss", "accuracy", "f1_macro", "f1_micro", "map"}`` (the last two None for
        single-label), or None when ``stop_event`` was set during evaluation.

    Raises:
        DatasetError: not one validation image could be loaded (the folder moved or was deleted).
    """
    dist_ctx = dist_ctx or DistContext()
    model.eval()
    all_logits, all_targets = [], []
    if cached is not None:
        suffix, features, batch_size = cached
        suffix.eval()
        batches = features.batches(batch_size)
    else:
        batches = loader
    for batch in batches:
        if stop_event is not None and stop_event.is_set() and not dist_ctx.enabled:
            return None
        if batch["labels"].shape[0] == 0:
            continue
        with plan.autocast():
            if cached is not None:
                logits = suffix(batch["features"].to(plan.device, non_blocking=True))
            else:
                logits = model(pixel_values=batch["pixel_values"].to(plan.device, non_blocking=True)).logits
        all_logits.append(logits.float().cpu())
        all_targets.append(batch["labels"])
    if dist_ctx.enabled:
        if dist_ctx.any(stop_event is not None and stop_event.is_set(), plan.device):
            return None
        shards = dist_ctx.gather((all_logits, all_targets))
        all_logits = [t for logits_list, _ in shards for t in logits_list]
        all_targets = [t for _, targets_list in shards for t in targets_list]
    if not all_logits:  # every validation image failed to load: an accuracy of 0 would be a made-up number
        raise DatasetError("None of the validation images could be loaded: was the dataset folder moved or"
                           " deleted? Put the images back and resume the run from its last checkpoint.")
    logits, targets = torch.cat(all_logits), torch.cat(all_targets)
    loss = compute_loss(logits, targets, multi_label).item() / len(targets)
    scores = torch.sigmoid(logits) if multi_label else logits
    metrics = core_metrics(targets.numpy().astype(int) if multi_label else targets.numpy(), scores.numpy(), multi_label)
    return {
        "loss": loss,
        "accuracy": metrics["accuracy"],
        "f1_macro": metrics["macro_f1"],
        "f1_micro": metrics["micro_f1"],
        "map": (metrics["map"] or 0.0) if multi_label else None,
    }
