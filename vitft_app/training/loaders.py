"""The run's data: datasets, loaders and the epoch order (kept in checkpoints), read through the
decode cache where the plan allows it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import TrainConfig
from ..data import DatasetReport, ImageDataset, build_transforms, collate_skipping_failures, processor_spec
from ..decode_cache import (CachedImageDataset, DecodeCache, ThroughPil, decoded_recipe, recipe_from_spec,
                            tensor_transform)
from ..distributed import DistContext
from .options import DECODE_CACHE_DIR, EngineOptions
from .plan import TrainPlan


def optimizer_steps_per_epoch(num_micro_batches: int, grad_accum_steps: int) -> int:
    """Optimizer steps in one epoch: ``ceil(micro-batches / grad_accum_steps)``.

    The rule for leftovers: the last micro-batches of an epoch (fewer than ``grad_accum_steps``)
    still make one optimizer step, with the loss averaged over the samples they actually hold, so
    no image is dropped and the scheduler's total equals the steps really taken.
    """
    return math.ceil(num_micro_batches / grad_accum_steps)


def _window_sizes(num_samples: int, batch_size: int, grad_accum_steps: int) -> list[int]:
    """Samples per accumulation window of one epoch (the divisor of the per-sample mean loss)."""
    micro = [min(batch_size, num_samples - i) for i in range(0, num_samples, batch_size)]
    return [sum(micro[i : i + grad_accum_steps]) for i in range(0, len(micro), grad_accum_steps)]


class _OrderBatchSampler(torch.utils.data.Sampler):
    """Yields the micro-batches (lists of indices) it was last given: the loop cuts each epoch's
    order itself (and, on resume, the rest of it; in a data-parallel run this process's share),
    so the order is part of the checkpoint. A micro-batch may be empty (a process with no share
    of an epoch's last batch)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter([list(b) for b in self.batches])

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class TrainData:
    """Datasets and loaders of one run (one process's share in a data-parallel run).

    Attributes:
        train_set, val_set: the datasets (validation: this process's shard).
        train_loader: iterates the micro-batches ``batch_sampler`` holds (set per epoch).
        val_loader: the validation images in order.
        batch_sampler: the epoch's micro-batches of indices (:meth:`set_epoch`).
        shuffle_gen: draws each epoch's order (the same in every process; checkpointed).
        global_batch: images per micro-batch over every process.
        num_micro: micro-batches per epoch.
        window_sizes: samples per accumulation window of an epoch, over every process.
        decode_cache: the decode cache, or None.
        input_size: ``(height, width)`` of the model input.
    """

    train_set: torch.utils.data.Dataset
    val_set: torch.utils.data.Dataset
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    batch_sampler: _OrderBatchSampler
    shuffle_gen: torch.Generator
    global_batch: int
    num_micro: int
    window_sizes: list[int]
    decode_cache: DecodeCache | None
    input_size: tuple[int, int]

    def set_epoch(self, state: Any, batch_size: int, rank: int) -> None:
        """Draws the epoch's order when ``state.order`` is None (kept in checkpoints, continued
        on resume) and gives the loader this process's micro-batches from ``state.position`` on."""
        if state.order is None:
            state.order = torch.randperm(len(self.train_set), generator=self.shuffle_gen).tolist()
            state.position = 0
            state.epoch_sums = [0.0, 0.0, 0.0]
        self.batch_sampler.batches = [
            state.order[m * self.global_batch + rank * batch_size :][:batch_size]
            for m in range(state.position, self.num_micro)
        ]


def build_train_data(config: TrainConfig, report: DatasetReport, processor: Any, plan: TrainPlan,
                     run_dir: Path, options: EngineOptions, dist_ctx: DistContext) -> TrainData:
    """Builds the datasets and loaders of a run.

    Images that are never randomly transformed per image (validation always; training when
    ``plan.train_transform_random`` is False) are decoded and resized once into the decode cache
    (bit-identical inputs; beyond the memory budget it spills to ``run_dir/.decode-cache``).
    Randomly transformed training keeps the decoded images themselves (as ``load_image`` returns
    them, at the same JPEG draft size) up to the cache's memory budget, never on disk, and runs the
    random transforms on them every epoch: the same pixels and random draws as decoding each time
    (:func:`~vitft_app.decode_cache.decoded_recipe`). With DataLoader workers it decodes every epoch.
    """
    spec = processor_spec(processor)
    out_h, out_w = spec.output_size
    target_classes = plan.num_classes if plan.multi_label else None
    decode_cache = None
    if plan.decode_cache:
        budget = options.decode_cache_budget_bytes if config.num_workers == 0 else 0  # workers share the disk tier
        decode_cache = DecodeCache(run_dir / DECODE_CACHE_DIR, memory_budget_bytes=budget)

    def eval_dataset(items: Sequence[Any]) -> torch.utils.data.Dataset:
        """Images through the one eval transform (from the decode cache when it is on)."""
        if decode_cache is not None:
            return CachedImageDataset(items, decode_cache, recipe_from_spec(spec), tensor_transform(spec),
                                      target_classes)
        return ImageDataset(items, build_transforms(processor, False), (out_w, out_h), target_classes)

    if plan.train_transform_random:
        train_transform = build_transforms(processor, True, config.augment, config.crop_scale_min, config.color_jitter,
                                           config.random_erasing)
        train_draft = (2 * out_w, 2 * out_h) if config.augment != "none" else (out_w, out_h)
        if plan.decoded_train_cached:
            # The decoded images (as load_image returns them) are kept up to the memory budget;
            # the random transforms run on them every epoch: the same pixels, without the decode.
            train_set = CachedImageDataset(report.train, decode_cache, decoded_recipe(train_draft),
                                           ThroughPil(train_transform), target_classes)
        else:
            train_set = ImageDataset(report.train, train_transform, train_draft, target_classes)
    else:
        train_set = eval_dataset(report.train)
    val_set = eval_dataset(report.val[dist_ctx.rank :: dist_ctx.world_size])  # each process evaluates a shard
    loader_args = dict(collate_fn=collate_skipping_failures, num_workers=config.num_workers,
                       persistent_workers=config.num_workers > 0, pin_memory=plan.device.device.type == "cuda")
    batch_sampler = _OrderBatchSampler()
    # The loader's own generator seeds its workers, so creating an iterator (at every epoch and
    # on resume) never draws from the global RNG that augmentation uses.
    loader_gen = torch.Generator().manual_seed(config.seed + 1 + dist_ctx.rank)
    train_loader = torch.utils.data.DataLoader(train_set, batch_sampler=batch_sampler, generator=loader_gen,
                                               **loader_args)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=config.batch_size, shuffle=False, **loader_args)
    # A micro-batch is batch_size images per process: batch_size x world_size in all.
    global_batch = config.batch_size * dist_ctx.world_size
    return TrainData(
        train_set=train_set, val_set=val_set, train_loader=train_loader, val_loader=val_loader,
        batch_sampler=batch_sampler,
        shuffle_gen=torch.Generator().manual_seed(config.seed),  # the same order in every process
        global_batch=global_batch,
        num_micro=math.ceil(len(train_set) / global_batch),
        window_sizes=_window_sizes(len(train_set), global_batch, config.grad_accum_steps),
        decode_cache=decode_cache,
        input_size=(out_h, out_w),
    )
