"""Latency and throughput of the Predict path (``vitft_app.predict.Predictor``).

Single-image latency: ``Predictor.predict([path])`` on a real JPEG from hymenoptera, **file
decoding and preprocessing included**, median (and p90) of 50 calls after 5 warmup calls.
Batch throughput: ``Predictor.predict(paths, batch_size=B)`` over ``--batch-images`` JPEGs,
images/s, decoding included.

Model: a ViT-Tiny (hidden 192, 12 blocks, 3 heads, MLP 768, patch 16) at 224 px with random
weights, saved with ``save_pretrained`` (with vit-tiny-scratch's image processor) and loaded by
path, so the real loading code runs. Each precision runs in its own process.

Usage (from the repository root)::

    python benchmarks/bench_predict.py                 # precisions fp32 and auto
    python benchmarks/bench_predict.py --precisions fp32,bf16 --repeats 50
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_memory import peak_rss_mib  # beside this script (sys.path[0])

ROOT = Path(__file__).resolve().parent.parent
DATA = "/work/shared/datasets/hymenoptera"


def save_vit_tiny(folder: Path, image_size: int = 224) -> Path:
    """Saves a random ViT-Tiny classifier (2 labels) and its processor to ``folder``."""
    import torch
    from transformers import ViTForImageClassification

    from vitft_app.modeling import scratch_config, scratch_processor

    torch.manual_seed(0)
    model = ViTForImageClassification(scratch_config(image_size, {0: "ants", 1: "bees"}))
    model.config.architectures = ["ViTForImageClassification"]
    model.save_pretrained(folder)
    scratch_processor(image_size).save_pretrained(folder)
    return folder


def child(args) -> dict:
    import torch

    from vitft_app.predict import Predictor

    paths = sorted(glob.glob(os.path.join(args.data, "val", "*", "*.jpg")))
    with tempfile.TemporaryDirectory() as folder:
        save_vit_tiny(Path(folder))
        t0 = time.perf_counter()
        threads = None if args.threads == "default" else int(args.threads)
        predictor = Predictor(folder, device="cpu", precision=args.precision, num_threads=threads)
        load_s = time.perf_counter() - t0
        single = paths[0]
        for _ in range(5):
            predictor.predict([single])
        times = []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            predictor.predict([paths[i % len(paths)]] if args.vary else [single])
            times.append(time.perf_counter() - t0)
        batch_paths = (paths * 4)[: args.batch_images]
        predictor.predict(batch_paths[: args.batch_size], batch_size=args.batch_size)  # warmup
        t0 = time.perf_counter()
        predictor.predict(batch_paths, batch_size=args.batch_size)
        batch_s = time.perf_counter() - t0
        # agreement with fp32 on the batch (top-1 and max |prob diff|)
        reference = Predictor(folder, device="cpu", precision="fp32").predict_proba(paths[:64])
        probs = predictor.predict_proba(paths[:64])
    times.sort()
    return {
        "precision": predictor.plan.precision,
        "median_ms": 1e3 * statistics.median(times),
        "p90_ms": 1e3 * times[int(0.9 * len(times)) - 1],
        "batch_images_per_sec": len(batch_paths) / batch_s,
        "top1_agreement": float((probs.argmax(-1) == reference.argmax(-1)).float().mean()),
        "max_prob_diff": float((probs - reference).abs().max()),
        "load_s": load_s,
        "threads": args.threads,
        "peak_rss_mib": peak_rss_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--precisions", default="fp32,auto")
    parser.add_argument("--threads", default="default,1", help="num_threads values: 'default' or ints")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batch-images", type=int, default=256)
    parser.add_argument("--vary", action="store_true", help="a different JPEG each call (cold file cache)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1")
    rows = []
    for precision, threads in [(p, t) for p in args.precisions.split(",") for t in args.threads.split(",")]:
        cmd = [sys.executable, __file__, "--child", "--precision", precision, "--threads", threads, "--data", args.data, "--repeats",
               str(args.repeats), "--batch-size", str(args.batch_size), "--batch-images", str(args.batch_images)]
        if args.vary:
            cmd.append("--vary")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"{precision}: ERROR\n{proc.stderr[-2000:]}")
            continue
        rows.append((precision, json.loads(line[7:])))
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')} · {os.uname().nodename} · ViT-Tiny 224 · single image = median of "
          f"{args.repeats} (decode + preprocessing + model) · batch {args.batch_size} over {args.batch_images} JPEGs\n")
    print("| precision asked | ran as | single-image median ms | p90 ms | batch img/s | top-1 = fp32 "
          "| max prob diff vs fp32 | threads | peak RSS MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for precision, r in rows:
        print(f"| {precision} | {r['precision']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | "
              f"{r['batch_images_per_sec']:.1f} | {100 * r['top1_agreement']:.0f}% | {r['max_prob_diff']:.4f} "
              f"| {r['threads']} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
