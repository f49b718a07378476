"""Memory across runs in one process: does the app leak between training runs?

Runs the same training job N times in a row through the app's ``JobRunner`` (the Train tab's
path: a background thread per run), reads the process RSS (``/proc/self/status`` VmRSS) after each
run ends and after ``gc.collect()``, and prints one table with every run's RSS and its ratio to the
first. The goal (speed issue, target 7): runs 2..N end within 5% of run 1. On CUDA it also prints
``torch.cuda.memory_allocated`` after each run (the runner releases cached blocks when a run ends).

Usage (from the repository root)::

    python benchmarks/bench_memory.py                                  # 3 runs, hymenoptera, 224 px
    python benchmarks/bench_memory.py --runs 5 --data DIR --image-size 32 --epochs 1
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mib() -> float:
    """Resident set size of this process in MiB (``VmRSS`` of ``/proc/self/status``)."""
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    """Peak RSS of this process so far in MiB (``ru_maxrss``, KiB on Linux); shared by the other
    benchmark scripts."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data", default="/work/shared/datasets/hymenoptera")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    from vitft_app.config import TrainConfig
    from vitft_app.jobs import JobRunner

    runs_dir = Path(tempfile.mkdtemp(prefix="vitft-bench-memory-"))
    runner = JobRunner(runs_dir)
    rows = []
    for index in range(args.runs):
        config = TrainConfig(data_dir=args.data, model="vit-tiny-scratch", image_size=args.image_size,
                             epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, augment="basic",
                             output_dir=str(runs_dir), run_name=f"memory-{index + 1}")
        t0 = time.perf_counter()
        job = runner.start(config)
        job.wait()
        gc.collect()
        cuda = torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else None
        rows.append((index + 1, time.perf_counter() - t0, rss_mib(), cuda))
        print(f"run {index + 1}: {rows[-1][1]:.1f} s, RSS {rows[-1][2]:.0f} MiB", flush=True)
    first = rows[0][2]
    print()
    print(f"{time.strftime('%Y-%m-%d %H:%M')} · {args.runs} runs of vit-tiny-scratch {args.image_size} px,"
          f" {args.epochs} epoch(s), {Path(args.data).name}, one process")
    print()
    print("| run | wall s | RSS after run, MiB | ratio to run 1 | CUDA allocated MiB |")
    print("|---:|---:|---:|---:|---:|")
    for number, wall, rss, cuda in rows:
        print(f"| {number} | {wall:.1f} | {rss:.0f} | {rss / first:.3f} | {'-' if cuda is None else f'{cuda:.0f}'} |")
    worst = max(abs(rss / first - 1) for _, _, rss, _ in rows[1:]) if len(rows) > 1 else 0.0
    print()
    print(f"largest change after run 1: {worst:.1%} (goal: within 5%)")


if __name__ == "__main__":
    main()
