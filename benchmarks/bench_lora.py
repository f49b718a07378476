"""LoRA against full fine-tuning: trainable parameters, peak memory, speed, and accuracy.

Two parts:

1. ``--part speed``: ViT-Small (hidden 384, 12 blocks, 6 heads) and ViT-Base (768, 12, 12) configs
   at 224 px, patch 16, **random weights** (no Hub here; weights do not change the cost), one
   subprocess per row so each peak RSS (``ru_maxrss``, :func:`bench_memory.peak_rss_mib`) is its
   own. A row builds the model, applies LoRA (vitft_app.lora.apply_lora: query/value projections
   + full head) or not, creates the optimizer the loop uses (vitft_app.optim.create_optimizer:
   AdamW over the trainable parameters), and times ``--steps`` training steps (forward, backward,
   clip, step) on random ``(batch, 3, 224, 224)`` tensors after one warmup step.
2. ``--part accuracy``: validation accuracy on a real dataset starting from a model folder we
   trained ourselves: a small random ViT is trained on cifar10-subset (5,000 CIFAR-10 images) at
   64 px, then its ``model/`` is fine-tuned on hymenoptera (ants vs bees, 244 train / 153 val)
   in full and with LoRA, through the real ``train()`` loop. The pretrained model is a small ViT
   (:func:`save_small_vit`; vit-tiny-scratch was too slow to pretrain on the shared CPU). The majority-class baseline is
   printed beside the accuracies.

Usage (from the repository root)::

    python benchmarks/bench_lora.py                       # both parts
    python benchmarks/bench_lora.py --part speed --steps 3 --batch-size 8
    python benchmarks/bench_lora.py --part accuracy --pretrain-epochs 2 --epochs 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SIZES = {"vit-small": dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536),
         "vit-base": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072)}


def speed_row(size: str, rank: int, batch_size: int, steps: int) -> dict:
    """One row of part 1, in this (fresh) process."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from bench_memory import peak_rss_mib
    from vitft_app.lora import apply_lora
    from vitft_app.modeling import count_parameters
    from vitft_app.optim import create_optimizer

    torch.manual_seed(0)
    config = ViTConfig(num_hidden_layers=12, image_size=224, patch_size=16, num_labels=2, **SIZES[size])
    model = ViTForImageClassification(config)
    if rank:
        apply_lora(model, rank, 2 * rank, None)
    trainable, total = count_parameters(model)
    optimizer = create_optimizer(model, 1e-4, 0.01)
    params = [p for p in model.parameters() if p.requires_grad]
    pixels = torch.randn(batch_size, 3, 224, 224)
    labels = torch.randint(0, 2, (batch_size,))
    model.train()

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warmup: allocator, optimizer state
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - t0
    return {"model": size, "mode": f"LoRA r{rank}" if rank else "full", "trainable": trainable, "total": total,
            "peak_rss_mib": peak_rss_mib(), "images_per_sec": steps * batch_size / seconds}


def run_speed(args: argparse.Namespace) -> list[dict]:
    rows = []
    for size in ("vit-small", "vit-base"):
        for rank in (0, args.rank):
            command = [sys.executable, __file__, "--row", f"{size}:{rank}", "--batch-size", str(args.batch_size),
                       "--steps", str(args.steps)]
            out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if out.returncode != 0:
                raise SystemExit(out.stderr[-3000:])
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            row = rows[-1]
            print(f"  {row['model']:9s} {row['mode']:8s} {row['trainable']:>12,} trainable  "
                  f"{row['peak_rss_mib']:7.0f} MiB  {row['images_per_sec']:5.2f} img/s", flush=True)
    return rows


def train_run(config) -> tuple[float | None, float, int, Path]:
    """(best validation accuracy, seconds, trainable parameters, run folder) of one real training run."""
    from vitft_app.events import RunStarted
    from vitft_app.runs import RunRecorder, RunStore
    from vitft_app.training import preflight, train

    report = preflight(config)
    run_dir = RunStore(config.output_dir).create_run(config)
    recorder = RunRecorder(run_dir)
    started = []

    def emit(event) -> None:
        recorder(event)
        if isinstance(event, RunStarted):
            started.append(event)

    t0 = time.perf_counter()
    result = train(config, run_dir, emit, report=report)
    return result.best_val_accuracy, time.perf_counter() - t0, started[0].trainable_params, run_dir


def save_small_vit(folder: Path, image_size: int) -> Path:
    """A random small ViT (4 blocks, hidden 128, 4 heads, MLP 512, patch 16: 16 patch tokens at 64 px)
    saved with its processor, trained from its path like a user's model: small enough to pretrain
    on 5,000 images within minutes on a shared 2-core CPU."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                       image_size=image_size, patch_size=16)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def run_accuracy(args: argparse.Namespace) -> list[dict]:
    from vitft_app.baseline import majority_baseline
    from vitft_app.config import TrainConfig
    from vitft_app.data import scan_dataset

    out = Path(tempfile.mkdtemp(prefix="vitft-bench-lora-"))
    start = save_small_vit(out / "small-vit", args.image_size)
    pre = TrainConfig(data_dir=args.pretrain_data, model=str(start), epochs=args.pretrain_epochs, batch_size=64,
                      lr=1e-3, augment="basic", output_dir=str(out), run_name="pretrain")
    accuracy, seconds, _, pre_dir = train_run(pre)
    pre_report = scan_dataset(args.pretrain_data)
    base = majority_baseline((item.label for item in pre_report.val), pre_report.classes)
    print(f"  pretrain: small ViT {args.image_size} px on {Path(args.pretrain_data).name},"
          f" {args.pretrain_epochs} epochs: val accuracy {accuracy:.3f} (majority {base.rate:.3f}), {seconds:.0f} s",
          flush=True)
    report = scan_dataset(args.data)
    baseline = majority_baseline((item.label for item in report.val), report.classes)
    rows = [{"mode": "pretrain", "accuracy": accuracy, "baseline": base.rate, "seconds": seconds}]
    for rank in (0, args.rank):
        lr = args.lora_lr if rank else args.lr
        config = TrainConfig(data_dir=args.data, model=str(pre_dir / "model"), epochs=args.epochs, batch_size=32,
                             lr=lr, augment="basic", output_dir=str(out), lora_rank=rank, lora_alpha=2.0 * max(rank, 1),
                             run_name=f"lora{rank}" if rank else "full")
        accuracy, seconds, trainable, _ = train_run(config)
        rows.append({"mode": f"LoRA r{rank}" if rank else "full", "accuracy": accuracy, "baseline": baseline.rate,
                     "seconds": seconds, "trainable": trainable, "lr": lr})
        print(f"  {rows[-1]['mode']:8s} lr {lr:g}: val accuracy {accuracy:.3f} (majority {baseline.rate:.3f}),"
              f" {trainable:,} trainable, {seconds:.0f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("speed", "accuracy", "both"), default="both")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # SIZE:RANK, run by part 1 in a subprocess
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--batch-size", type=int, default=8, help="part 1 batch size")
    parser.add_argument("--steps", type=int, default=3, help="part 1 timed steps per row")
    parser.add_argument("--pretrain-data", default="/work/shared/datasets/cifar10-subset")
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--data", default="/work/shared/datasets/hymenoptera")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-4, help="full fine-tuning lr")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA lr (adapters take a larger step)")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.row:
        size, rank = args.row.split(":")
        print(json.dumps(speed_row(size, int(rank), args.batch_size, args.steps)))
        return
    import torch

    print(f"{time.strftime('%Y-%m-%d %H:%M')} · torch {torch.__version__} · {os.cpu_count()} CPUs", flush=True)
    if args.part in ("speed", "both"):
        print(f"part 1: 224 px, random weights, batch {args.batch_size}, {args.steps} timed steps per row", flush=True)
        run_speed(args)
    if args.part in ("accuracy", "both"):
        print("part 2: accuracy from our own pretrained model folder", flush=True)
        run_accuracy(args)


if __name__ == "__main__":
    main()
