"""GPU benchmark for a lent CUDA machine (run through ``benchmarks/gpu.sh``; a few minutes).

Measures, at 224 px in bf16 autocast with SDPA attention and fused AdamW:

1. the bf16 matmul ceiling (8192^3, best of ~2 s);
2. ViT-Tiny and ViT-B/16 training and inference images/s on synthetic tensors already on the
   GPU, and utilization = images/s * analytic FLOPs per image / the ceiling (formula in
   ``bench_train.py``: training = 3x forward);
3. ViT-Tiny and ViT-B/16 training fed by the decode cache (synthetic JPEGs written to a temp
   folder, decoded once in epoch 1 by DataLoader workers, read back from the cache's disk tier in
   epoch 2), with the data-wait fraction of step time;
4. peak CUDA memory per row, and memory still allocated after the run is released.

Results go to ``$OUT/gpu_results.json`` and ``$OUT/gpu_results.md`` (``$OUT`` defaults to the
current folder) and to stdout.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_train import VIT_BASE, VIT_TINY, vit_forward_flops, vit_training_flops  # noqa: E402

OUT = Path(os.environ.get("OUT", "."))


def ceiling(n: int = 8192, seconds: float = 2.0) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    a @ b
    torch.cuda.synchronize()
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            a @ b
        stop.record()
        stop.synchronize()
        best = min(best, start.elapsed_time(stop) / 5e3)
    return 2 * n**3 / best


def build(arch: dict):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=224, num_labels=10, **arch)
    config._attn_implementation = "sdpa"
    return ViTForImageClassification(config).cuda().train()


def train_steps(model, batches, steps: int, warmup: int = 5):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    images, data_s, it = 0, 0.0, iter(batches)
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        td = time.perf_counter()
        x, y = next(it)
        x, y = x.cuda(non_blocking=True), y.cuda(non_blocking=True)
        if i >= warmup:
            data_s += time.perf_counter() - td
            images += y.numel()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(pixel_values=x).logits
        torch.nn.functional.cross_entropy(logits.float(), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return images / seconds, data_s / seconds


@torch.inference_mode()
def infer(model, batch: int, steps: int = 20) -> float:
    model.eval()
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    for i in range(5 + steps):
        if i == 5:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(pixel_values=x)
    torch.cuda.synchronize()
    model.train()
    return batch * steps / (time.perf_counter() - t0)


def synthetic(batch: int):
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 10, (batch,), device="cuda")
    while True:
        yield x, y


def write_jpegs(folder: Path, count: int) -> list:
    import numpy as np
    from PIL import Image

    from vitft_app.data import ImageItem

    rng = np.random.default_rng(0)
    items = []
    for i in range(count):
        path = folder / f"{i:05d}.jpg"
        small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)  # smooth-ish photo-like content
        Image.fromarray(small).resize((500, 375), Image.BILINEAR).save(path, quality=90)
        items.append(ImageItem(str(path), i % 10))
    return items


def cached_loader(items, batch: int, cache_dir: Path, workers: int):
    from vitft_app.data import collate_skipping_failures, processor_spec
    from vitft_app.decode_cache import CachedImageDataset, DecodeCache, recipe_from_spec, tensor_transform
    from vitft_app.modeling import scratch_processor

    spec = processor_spec(scratch_processor(224))
    # workers are processes: the disk tier (page cache) is what they share, so no memory tier
    dataset = CachedImageDataset(items, DecodeCache(cache_dir, memory_budget_bytes=0), recipe_from_spec(spec),
                                 tensor_transform(spec))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         collate_fn=collate_skipping_failures, pin_memory=True,
                                         persistent_workers=True, drop_last=True, prefetch_factor=4)

    def forever():
        while True:
            for b in loader:
                yield b["pixel_values"], b["labels"]

    return loader, forever()


def main() -> None:
    assert torch.cuda.is_available(), "gpu_bench.py needs CUDA"
    torch.backends.cuda.matmul.allow_tf32 = True
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "date": time.strftime("%Y-%m-%d %H:%M")}
    peak = ceiling()
    results["bf16_matmul_flops"] = peak
    print(f"bf16 matmul 8192^3: {peak / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    workers = min(8, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        items = write_jpegs(Path(tmp), 2048)
        for name, arch, batch in (("ViT-Tiny", VIT_TINY, 256), ("ViT-B/16", VIT_BASE, 128)):
            flops_train = vit_training_flops(224, 0, arch=arch, num_classes=10)
            flops_fwd = vit_forward_flops(224, arch["patch_size"], arch["hidden_size"], arch["intermediate_size"],
                                          arch["num_hidden_layers"], 10)
            torch.cuda.reset_peak_memory_stats()
            model = build(arch)
            ips, _ = train_steps(model, synthetic(batch), 20)
            rows.append({"row": f"{name} train, synthetic", "images_per_sec": ips, "data_wait": 0.0,
                         "utilization": ips * flops_train / peak, "peak_mib": torch.cuda.max_memory_allocated() / 2**20})
            ips = infer(model, batch * 2)
            rows.append({"row": f"{name} inference, synthetic", "images_per_sec": ips, "data_wait": 0.0,
                         "utilization": ips * flops_fwd / peak, "peak_mib": torch.cuda.max_memory_allocated() / 2**20})
            loader, batches = cached_loader(items, batch, Path(tmp) / f"cache-{batch}", workers)
            t0 = time.perf_counter()
            for _ in loader:  # epoch 1: decode once into the cache
                pass
            fill_s = time.perf_counter() - t0
            ips, wait = train_steps(model, batches, 2 * len(loader), warmup=2)
            rows.append({"row": f"{name} train, decode cache ({workers} workers, epoch 1 fill {fill_s:.1f} s)",
                         "images_per_sec": ips, "data_wait": wait, "utilization": ips * flops_train / peak,
                         "peak_mib": torch.cuda.max_memory_allocated() / 2**20})
            del model, loader, batches
            import gc

            gc.collect()
            torch.cuda.empty_cache()
            rows[-1]["allocated_after_release_mib"] = torch.cuda.memory_allocated() / 2**20
            for r in rows[-3:]:
                print(json.dumps(r), flush=True)
    results["rows"] = rows
    lines = [f"{results['date']} · {results['device']} · torch {results['torch']} · bf16 matmul "
             f"{peak / 1e12:.0f} TFLOP/s", "",
             "| row | img/s | utilization | data-wait | peak CUDA MiB | allocated after release MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['images_per_sec']:.0f} | {r['utilization']:.2f} | {100 * r['data_wait']:.1f}% "
                     f"| {r['peak_mib']:.0f} | {r.get('allocated_after_release_mib', '-')} |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpu_results.json").write_text(json.dumps(results, indent=2))
    (OUT / "gpu_results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
