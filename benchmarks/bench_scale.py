"""Scale of the decode cache: a 50,000-image folder on a 24 GiB machine (speed issue, target 6).

What it measures (the **data pipeline only**: no model, no forward or backward pass):

1. Generates ``--images`` JPEGs (default 50,000) with Pillow into ``--workdir`` (outside the
   repository, default ``/tmp/vitft-bench-scale``), one folder per class, each 300..500 px on a
   side (so decoding and resizing to 224 px is real work): a colour gradient, random blocks and
   per-pixel noise, JPEG quality 70 (about 24 KiB a file, 1.2 GiB for 50,000). The folder is
   reused when a previous run completed it; ``--clean`` deletes it at the end.
2. Scans it with :func:`vitft_app.data.scan_dataset` (as ``train()`` does, every file decoded
   once; the scan cache lives in the workdir, so a rerun's scan is quick) and builds the datasets
   ``train()`` builds for images that are not randomly augmented (``augment="none"``, the default
   ``num_workers=0``): the vit-tiny-scratch processor at 224 px, ``processor_spec``,
   ``recipe_from_spec``, ``tensor_transform``, :class:`~vitft_app.decode_cache.CachedImageDataset`
   for train and val over one :class:`~vitft_app.decode_cache.DecodeCache` with the training
   loop's default memory budget (``EngineOptions.decode_cache_budget_bytes``, 2 GiB) and a spill folder in the
   workdir, DataLoaders with batch 32 and ``collate_skipping_failures``.
3. Iterates train (shuffled) then val for ``--epochs`` epochs (default 2) and reports per epoch:
   wall seconds, images/s, images decoded (cache misses) and cache hits, bytes in the memory tier
   and on disk (the spill folder's ``.npy`` files), the process RSS after the epoch and the peak
   RSS so far (``ru_maxrss``).
4. Checks, for a few images from each tier, that the tensor the cache serves is bit-identical to
   a fresh uncached decode (``build_transforms(processor, train=False)`` on
   ``load_image(path, draft_size=224x224)``, the caches-off path of ``train()``), that the memory
   tier stayed within the budget, that everything beyond it went to disk, that no image was
   decoded again after the first epoch, and that the process RSS grew by at most 1.25 x the
   memory tier + 256 MiB. It also prints the RSS after glibc's ``malloc_trim(0)``: the gap
   between the two is memory the allocator freed but kept (heap fragmentation), not cache data.

It prints one markdown table (``--json PATH`` also writes the numbers), removes the spill folder
at the end and exits with status 1 when a check fails. A second epoch reads spilled entries back
from disk, normally from the OS page cache (the spill folder of 50,000 images is about 5 GiB).

Usage (from the repository root)::

    python benchmarks/bench_scale.py                        # 50,000 images, 2 epochs
    python benchmarks/bench_scale.py --images 2000 --budget-mib 100 --json /tmp/scale.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_memory import peak_rss_mib, rss_mib  # noqa: E402  (beside this script: sys.path[0])

MODEL = "vit-tiny-scratch"
JPEG_QUALITY = 70
#: "Memory bounded by the budget": RSS may grow by the memory tier plus this share and slack
#: (a batch of float32 inputs is 19 MiB; the rest is allocator and DataLoader overhead).
RSS_GROWTH_FACTOR = 1.25
RSS_SLACK_MIB = 256
MARKER = ".complete.json"


# --------------------------------------------------------------------------------------------
# Synthetic JPEG folder
# --------------------------------------------------------------------------------------------


def image_path(folder: Path, index: int, classes: int) -> Path:
    """``folder/class_XX/img_NNNNNN.jpg``: image ``index`` belongs to class ``index % classes``."""
    return folder / f"class_{index % classes:02d}" / f"img_{index:06d}.jpg"


def make_image(index: int, seed: int) -> Any:
    """A ``W x H`` RGB image (both sides 300..500 px): a gradient between two random colours at a
    random angle, random 8..32 px blocks (+-60) and per-pixel noise (+-10), deterministic in
    ``(index, seed)``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed * 1_000_003 + index)
    width, height = (int(v) for v in rng.integers(300, 501, 2))
    color0, color1 = rng.integers(0, 256, (2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * np.arange(width, dtype=np.float32)[None, :] / width
            + np.sin(angle) * np.arange(height, dtype=np.float32)[:, None] / height)
    ramp -= ramp.min()
    ramp /= ramp.max() + 1e-6
    pixels = (color0 + ramp[..., None] * (color1 - color0)).astype(np.int16)
    block = int(rng.integers(8, 33))
    blocks = rng.integers(-60, 61, (-(-height // block), -(-width // block), 3), dtype=np.int16)
    pixels += np.repeat(np.repeat(blocks, block, 0), block, 1)[:height, :width]
    pixels += rng.integers(-10, 11, (height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_range(job: tuple[str, int, int, int, int]) -> int:
    """Writes images ``start..stop-1`` that do not exist yet (a pool task); returns how many."""
    folder, start, stop, classes, seed = job
    written = 0
    for index in range(start, stop):
        target = image_path(Path(folder), index, classes)
        if target.is_file():
            continue
        tmp = target.with_suffix(".tmp")
        make_image(index, seed).save(tmp, "JPEG", quality=JPEG_QUALITY)
        os.replace(tmp, target)  # an interrupted run never leaves a truncated .jpg
        written += 1
    return written


def ensure_images(folder: Path, images: int, classes: int, seed: int, processes: int) -> float:
    """Generates the folder unless a completed one is there. Returns the seconds spent (0.0 when
    reused). A partly written folder (interrupted run) is completed, not restarted."""
    marker = folder / MARKER
    wanted = {"images": images, "classes": classes, "seed": seed, "quality": JPEG_QUALITY}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return 0.0
    start = time.perf_counter()
    for label in range(min(classes, images)):
        (folder / f"class_{label:02d}").mkdir(parents=True, exist_ok=True)
    chunk = 500
    jobs = [(str(folder), lo, min(lo + chunk, images), classes, seed) for lo in range(0, images, chunk)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        for done, _ in enumerate(pool.imap_unordered(_write_range, jobs), 1):
            if done % 20 == 0 or done == len(jobs):
                print(f"  generated {min(done * chunk, images)}/{images} images", flush=True)
    marker.write_text(json.dumps(wanted))
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def trimmed_rss_mib() -> float:
    """RSS in MiB after glibc's ``malloc_trim(0)`` hands free heap pages back to the OS: what is
    left is live data; the difference to :func:`rss_mib` was freed but kept by the allocator."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        return float("nan")
    return rss_mib()


def folder_bytes(folder: Path) -> tuple[int, int]:
    """``(bytes, files)`` of the ``.npy`` files under ``folder`` (the decode cache's disk tier)."""
    total = files = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            if name.endswith(".npy") and not name.startswith(".tmp-"):
                total += os.path.getsize(os.path.join(dirpath, name))
                files += 1
    return total, files


def in_memory_tier(cache: Any, path: str, recipe: Any) -> bool:
    """True when ``path`` is held in the cache's memory tier (reads its index; report only)."""
    from vitft_app.decode_cache import file_key

    return file_key(path, recipe) in cache._memory  # noqa: SLF001: a benchmark label, not logic


def check_identical(dataset: Any, cache: Any, recipe: Any, processor: Any, samples: int) -> list[dict]:
    """Compares, for up to ``samples`` train images (half from each tier when both exist), the
    float tensor the cached dataset yields with a fresh uncached decode through
    ``build_transforms(processor, train=False)``; returns one dict per image."""
    import torch

    from vitft_app.data import build_transforms, processor_spec
    from vitft_app.images import load_image

    out_h, out_w = processor_spec(processor).output_size
    uncached = build_transforms(processor, False)
    tiers: dict[str, list[int]] = {"memory": [], "disk": []}
    for index, item in enumerate(dataset.items):
        tiers["memory" if in_memory_tier(cache, item.path, recipe) else "disk"].append(index)
    picked: list[tuple[str, int]] = []
    for tier, indices in tiers.items():
        share = samples // 2 if tiers["memory"] and tiers["disk"] else samples
        step = max(1, len(indices) // max(1, share))
        picked += [(tier, i) for i in indices[::step][:share]]
    results = []
    for tier, index in picked:
        path = dataset.items[index].path
        misses = cache.misses
        cached, _ = dataset[index]
        fresh = uncached(load_image(path, draft_size=(out_w, out_h)))
        results.append({
            "path": path,
            "tier": tier,
            "served_from_cache": cache.misses == misses,
            "identical": bool(cached.dtype == fresh.dtype and cached.shape == fresh.shape
                              and torch.equal(cached, fresh)),
            "max_abs_diff": float((cached - fresh).abs().max()) if cached.shape == fresh.shape else float("inf"),
        })
    return results


def run_epochs(loaders: list[Any], cache: Any, cache_dir: Path, epochs: int) -> list[dict]:
    """Iterates every loader once per epoch; one dict of measurements per epoch."""
    rows = []
    for epoch in range(1, epochs + 1):
        hits, misses = cache.hits, cache.misses
        images = failed = 0
        start = time.perf_counter()
        for loader in loaders:
            for batch in loader:
                images += int(batch["pixel_values"].shape[0])
                failed += int(batch["failed"])
        wall_s = time.perf_counter() - start
        disk_bytes, disk_files = folder_bytes(cache_dir)
        rows.append({
            "epoch": epoch,
            "wall_s": wall_s,
            "images": images,
            "failed": failed,
            "images_per_sec": images / wall_s if wall_s > 0 else float("nan"),
            "decoded": cache.misses - misses,
            "cache_hits": cache.hits - hits,
            "memory_tier_bytes": cache.memory_bytes,
            "disk_tier_bytes": disk_bytes,
            "disk_tier_files": disk_files,
            "entries": len(cache),
            "rss_after_mib": rss_mib(),
            "peak_rss_mib": peak_rss_mib(),
        })
        row = rows[-1]
        print(f"  epoch {epoch}: {wall_s:.1f} s, {row['images_per_sec']:.0f} img/s, "
              f"memory {row['memory_tier_bytes'] / 2**20:.0f} MiB, disk {disk_bytes / 2**20:.0f} MiB", flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main() -> None:
    from vitft_app.training import DEFAULT_DECODE_CACHE_BUDGET_BYTES as DECODE_CACHE_BUDGET_BYTES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=50_000, help="JPEGs to generate (default 50000)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "vitft-bench-scale"),
                        help="folder for the images, the scan cache and the spill folder (outside the repo)")
    parser.add_argument("--budget-mib", type=float, default=DECODE_CACHE_BUDGET_BYTES / 2**20,
                        help="decode cache memory tier, MiB (default: the training loop's, "
                             f"{DECODE_CACHE_BUDGET_BYTES / 2**20:.0f})")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--check-samples", type=int, default=8, help="images compared bit for bit")
    parser.add_argument("--processes", type=int, default=2, help="processes generating the JPEGs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--clean", action="store_true", help="delete the generated images at the end")
    args = parser.parse_args()

    workdir = Path(args.workdir).expanduser().resolve()
    if workdir == ROOT or ROOT in workdir.parents:
        parser.error(f"--workdir must be outside the repository ({ROOT}), got {workdir}")
    folder = workdir / f"images-{args.images}-c{args.classes}-s{args.seed}"
    budget = int(args.budget_mib * 2**20)

    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    print(f"images: {folder}", flush=True)
    gen_s = ensure_images(folder, args.images, args.classes, args.seed, args.processes)

    import torch

    from vitft_app.data import collate_skipping_failures, processor_spec, scan_dataset
    from vitft_app.decode_cache import CachedImageDataset, DecodeCache, recipe_from_spec, tensor_transform
    from vitft_app.filecheck import ScanCache
    from vitft_app.modeling import load_processor

    start = time.perf_counter()
    report = scan_dataset(folder, cache=ScanCache(workdir / "scan.sqlite"))
    scan_s = time.perf_counter() - start
    if report.errors:
        raise SystemExit(f"dataset errors: {report.errors}")
    print(f"scan: {len(report.train)} train + {len(report.val)} val images in {scan_s:.1f} s", flush=True)

    processor = load_processor(MODEL, args.image_size)
    spec = processor_spec(processor)
    recipe = recipe_from_spec(spec)
    transform = tensor_transform(spec)
    out_h, out_w = spec.output_size
    entry_bytes = 3 * out_h * out_w
    cache_dir = Path(tempfile.mkdtemp(prefix="decode-cache-", dir=workdir))
    try:
        cache = DecodeCache(cache_dir, memory_budget_bytes=budget)
        train_set = CachedImageDataset(report.train, cache, recipe, transform)
        val_set = CachedImageDataset(report.val, cache, recipe, transform)
        loader_args = dict(batch_size=args.batch_size, collate_fn=collate_skipping_failures, num_workers=0)
        loaders = [
            torch.utils.data.DataLoader(train_set, shuffle=True, generator=torch.Generator().manual_seed(42),
                                        **loader_args),
            torch.utils.data.DataLoader(val_set, shuffle=False, **loader_args),
        ]
        rss_before = rss_mib()
        peak_before = peak_rss_mib()
        rows = run_epochs(loaders, cache, cache_dir, args.epochs)
        samples = check_identical(train_set, cache, recipe, processor, args.check_samples)
        rss_trimmed = trimmed_rss_mib()
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    if args.clean:
        shutil.rmtree(folder, ignore_errors=True)
        (workdir / "scan.sqlite").unlink(missing_ok=True)

    # ---- checks -----------------------------------------------------------------------------
    total = len(report.train) + len(report.val)
    fit = min(total, budget // entry_bytes)
    last = rows[-1]
    checks = {
        "memory tier <= budget": all(r["memory_tier_bytes"] <= budget for r in rows),
        "entries beyond the budget on disk": rows[0]["disk_tier_files"] == total - fit
        and last["memory_tier_bytes"] == fit * entry_bytes,
        "no decoding after epoch 1": all(r["decoded"] == 0 for r in rows[1:]),
        f"RSS growth <= {RSS_GROWTH_FACTOR} x memory tier + {RSS_SLACK_MIB} MiB":
            max(r["rss_after_mib"] for r in rows) - rss_before
            <= RSS_GROWTH_FACTOR * last["memory_tier_bytes"] / 2**20 + RSS_SLACK_MIB,
        "cached = uncached, bit for bit": bool(samples)
        and all(s["identical"] and s["served_from_cache"] for s in samples),
    }
    result = {
        "what": "data pipeline only (no model): decode cache over a generated JPEG folder",
        "images": total, "train": len(report.train), "val": len(report.val), "classes": args.classes,
        "folder": str(folder), "generate_s": gen_s, "scan_s": scan_s,
        "budget_bytes": budget, "entry_bytes": entry_bytes, "batch_size": args.batch_size,
        "image_size": [out_h, out_w], "torch_threads": torch.get_num_threads(),
        "rss_before_epochs_mib": rss_before, "peak_rss_before_epochs_mib": peak_before,
        "rss_after_malloc_trim_mib": rss_trimmed,
        "epochs": rows, "samples": samples, "checks": checks,
    }

    # ---- report -----------------------------------------------------------------------------
    first = rows[0]["wall_s"]
    print()
    print(f"{time.strftime('%Y-%m-%d %H:%M')} · data pipeline only (no model, no backward) · "
          f"{total} JPEGs ({len(report.train)} train + {len(report.val)} val, {args.classes} classes, "
          f"300..500 px) → {out_h}x{out_w} uint8 ({entry_bytes:,} B each) · batch {args.batch_size} · "
          f"num_workers 0 · torch threads {torch.get_num_threads()}")
    print(f"memory budget {budget / 2**20:.0f} MiB ({fit} entries fit) · generation "
          f"{'reused' if gen_s == 0 else f'{gen_s:.0f} s'} · scan {scan_s:.1f} s · RSS before epoch 1 "
          f"{rss_before:.0f} MiB (peak {peak_before:.0f})")
    print()
    print("| epoch | wall s | img/s | vs epoch 1 | decoded | cache hits | memory tier MiB | disk tier MiB (files) "
          "| RSS after MiB | peak RSS MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['epoch']} | {r['wall_s']:.1f} | {r['images_per_sec']:.0f} | {first / r['wall_s']:.1f}x "
              f"| {r['decoded']} | {r['cache_hits']} | {r['memory_tier_bytes'] / 2**20:.0f} "
              f"| {r['disk_tier_bytes'] / 2**20:.0f} ({r['disk_tier_files']}) | {r['rss_after_mib']:.0f} "
              f"| {r['peak_rss_mib']:.0f} |")
    print()
    tiers = {tier: sum(1 for s in samples if s["tier"] == tier) for tier in ("memory", "disk")}
    same = sum(1 for s in samples if s["identical"])
    print(f"bit-identical to an uncached decode: {same}/{len(samples)} sampled images "
          f"({tiers['memory']} from memory, {tiers['disk']} from disk); "
          f"max |diff| {max((s['max_abs_diff'] for s in samples), default=0.0):g}")
    print(f"RSS growth over the epochs: {last['rss_after_mib'] - rss_before:.0f} MiB "
          f"(memory tier {last['memory_tier_bytes'] / 2**20:.0f} MiB); after malloc_trim(0): "
          f"{rss_trimmed - rss_before:.0f} MiB (the rest was freed memory the allocator kept)")
    for name, ok in checks.items():
        print(f"check {'PASS' if ok else 'FAIL'}: {name}")
    print(f"spill folder removed; images {'deleted' if args.clean else f'kept in {folder}'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    if not all(checks.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
