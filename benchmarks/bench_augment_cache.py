"""Augmented training from the decode cache's decoded images vs decoding every epoch (issue 16).

What it measures (the **data pipeline only**: no model): the training split of ``--data``
(default ``../shared/datasets/hymenoptera``, 245 JPEGs of 193x130..2592x1944) through the
loader ``train()`` builds for a randomly augmented run (``--augment``, default ``basic``; the
vit-tiny-scratch image processor at 224 px, batch 32, ``num_workers=0``, the same JPEG draft
size), two ways, alternated ``--repeats`` times in one process:

- **decode every epoch**: :class:`vitft_app.data.ImageDataset` (the engine with
  ``EngineOptions(decode_cache=False)``, and every augmented run before this change);
- **decoded-image cache**: :class:`vitft_app.decode_cache.CachedImageDataset` with
  :func:`~vitft_app.decode_cache.decoded_recipe` and :class:`~vitft_app.decode_cache.ThroughPil`
  (what ``train()`` now builds): epoch 1 decodes and keeps the images, later epochs only run the
  random transforms.

For each it reports epoch 1 and the mean of later epochs (seconds, best repeat), and checks that
both give the same tensors bit for bit for the same seed (exit status 1 if not). The last columns
are the memory tier's bytes and the later epochs' ratio.

Usage (from the repository root)::

    python benchmarks/bench_augment_cache.py                 # 3 epochs, 3 repeats (~1 min)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vitft_app.data import ImageDataset, build_transforms, collate_skipping_failures, processor_spec, scan_dataset  # noqa: E402
from vitft_app.decode_cache import CachedImageDataset, DecodeCache, ThroughPil, decoded_recipe  # noqa: E402
from vitft_app.scratch import scratch_processor  # noqa: E402
from vitft_app.training.options import DEFAULT_DECODE_CACHE_BUDGET_BYTES  # noqa: E402


def epochs(dataset: torch.utils.data.Dataset, count: int, seed: int) -> tuple[list[float], torch.Tensor]:
    """Seconds per epoch of a shuffled batch-32 loader over ``dataset``, and the first batch of the last epoch."""
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True, collate_fn=collate_skipping_failures,
                                         generator=torch.Generator().manual_seed(seed))
    times, first = [], None
    for _ in range(count):
        start = time.perf_counter()
        for i, batch in enumerate(loader):
            if i == 0:
                first = batch["pixel_values"]
        times.append(time.perf_counter() - start)
    return times, first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "hymenoptera"))
    parser.add_argument("--augment", default="basic")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    report = scan_dataset(args.data, seed=42, cache=None)
    processor = scratch_processor(224)
    out_h, out_w = processor_spec(processor).output_size
    transform = build_transforms(processor, True, args.augment)
    draft = (2 * out_w, 2 * out_h) if args.augment != "none" else (out_w, out_h)
    results: dict[str, list[list[float]]] = {"decode every epoch": [], "decoded-image cache": []}
    tier = 0
    same = True
    for _ in range(args.repeats):
        plain_times, plain_batch = epochs(ImageDataset(report.train, transform, draft), args.epochs, 0)
        cache = DecodeCache(None, memory_budget_bytes=DEFAULT_DECODE_CACHE_BUDGET_BYTES)
        cached = CachedImageDataset(report.train, cache, decoded_recipe(draft), ThroughPil(transform))
        cached_times, cached_batch = epochs(cached, args.epochs, 0)
        tier = cache.memory_bytes
        same = same and torch.equal(plain_batch, cached_batch)
        results["decode every epoch"].append(plain_times)
        results["decoded-image cache"].append(cached_times)
    later = lambda times: sum(times[1:]) / max(len(times) - 1, 1)  # noqa: E731
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')} · {os.cpu_count()} CPUs · load {os.getloadavg()[0]:.1f} ·"
          f" {len(report.train)} training images of {args.data} · augment {args.augment} · best of {args.repeats}\n")
    print("| data pipeline | epoch 1 s | later epochs s (mean) | memory tier MiB |")
    print("|---|---:|---:|---:|")
    best = {}
    for name, runs in results.items():
        run = min(runs, key=later)
        best[name] = later(run)
        print(f"| {name} | {run[0]:.2f} | {later(run):.2f} | {tier / 2**20 if 'cache' in name else 0:.0f} |")
    print(f"\nlater epochs: {best['decode every epoch'] / best['decoded-image cache']:.2f}x faster with the cache;"
          f" same tensors bit for bit: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
