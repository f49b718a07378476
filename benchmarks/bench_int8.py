"""Int8 ONNX export: fp32 vs int8 accuracy, top-1 agreement, single-image latency and file size.

Trains a real run briefly on the built-in digits (or takes ``--run RUN_DIR``), then runs
``vitft export RUN --format onnx-int8 --force`` (forced so the table shows every row, even one the
1-point rule would refuse) and prints a Markdown table from ``MODEL/onnx/int8_check.json``.

    python benchmarks/bench_int8.py                                   # vit-tiny-scratch and pvt-v2-b0-scratch, 64 px, 3 epochs
    python benchmarks/bench_int8.py --models vit-tiny-scratch --epochs 2
    python benchmarks/bench_int8.py --run runs/20250101-120000-my-run  # an existing run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def vitft(*args: str) -> str:
    """Runs the CLI in a subprocess (this checkout first on the path); returns its last stdout line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "vitft_app.cli", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"vitft {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", default=[], help="existing run folder(s) instead of training")
    parser.add_argument("--models", nargs="+", default=["vit-tiny-scratch", "pvt-v2-b0-scratch"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()

    runs = [Path(r) for r in args.run]
    if not runs:
        from vitft_app.data import ensure_example_dataset

        home = Path(os.environ.get("VITFT_HOME", tempfile.mkdtemp(prefix="bench-int8-")))
        data = ensure_example_dataset(home, per_class=100)
        out = Path(tempfile.mkdtemp(prefix="bench-int8-runs-"))
        for model in args.models:
            runs.append(Path(vitft("train", "--data", str(data), "--model", model, "--epochs", str(args.epochs),
                                   "--image-size", str(args.image_size), "--lr", "1e-3", "--augment", "none",
                                   "--output-dir", str(out))))
    print("| run (model, data) | val images | fp32 acc | int8 acc | drop (points) | top-1 agreement |"
          " latency fp32 / int8 (ms, 1 image) | file fp32 / int8 (MB) | majority baseline |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        vitft("export", str(run), "--format", "onnx-int8", "--force")
        config = json.loads((run / "config.json").read_text())
        check = json.loads((run / "model" / "onnx" / "int8_check.json").read_text())
        base = check.get("baseline") or {}
        rate = base.get("majority_count", 0) / base["total"] if base.get("total") else float("nan")
        from vitft_app.baseline import is_weak_rate

        weak = " (weak)" if is_weak_rate(check["fp32_accuracy"], rate) else ""
        print(f"| {Path(config['model']).name}, {Path(config['data_dir']).name} | {check['num_images']}"
              f" | {100 * check['fp32_accuracy']:.1f}%{weak} | {100 * check['int8_accuracy']:.1f}%"
              f" | {100 * (check['fp32_accuracy'] - check['int8_accuracy']):+.1f} | {100 * check['agreement']:.1f}%"
              f" | {check['fp32_latency_ms']:.2f} / {check['int8_latency_ms']:.2f}"
              f" | {check['fp32_bytes'] / 1e6:.2f} / {check['int8_bytes'] / 1e6:.2f} | {100 * rate:.1f}% |")


if __name__ == "__main__":
    main()
