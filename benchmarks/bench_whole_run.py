"""Whole-run time of ``vitft train`` against the transformers ``Trainer`` doing the same work.

What a user waits for is the whole run, not the steady-state loop, so both sides run as separate
processes and are timed from process start to exit (imports, dataset scan, model load, training,
validation every epoch, keeping the best model on disk, vitft's model card):

- **vitft**: ``python -m vitft_app.cli train --data D --model DIR --epochs E --batch-size 32
  --precision bf16 --augment none|basic --lr 5e-5`` (everything else at its default: decode
  cache, ``attention=auto``, a checkpoint per epoch, the best model saved, the model card).
- **Trainer**: a child of this script: ``ViTForImageClassification.from_pretrained(DIR)``,
  ``torchvision.datasets.ImageFolder`` on ``train/`` and ``val/`` with the same transforms
  (``none``: resize to 224x224, normalize with the processor's mean and std; ``basic``: the same
  ``RandomResizedCrop(224, scale=(0.08, 1))`` + horizontal flip as vitft's ``basic``),
  ``eval_strategy = save_strategy = "epoch"``, ``load_best_model_at_end=True``
  (``metric_for_best_model="accuracy"``), ``save_total_limit=1``, ``bf16``, batch 32, lr 5e-5,
  cosine schedule with warmup 0.1 of the steps (``warmup_steps=0.1``: a
  float is a ratio in transformers 5), weight decay 0.01, max grad norm 1, no workers, then
  ``trainer.save_model()`` (the best model, as vitft keeps it).

Both start from the same random-init weights: a ViT-Tiny (hidden 192, 12 blocks, 3 heads) or
ViT-Small (hidden 384, 6 heads) config at 224 px saved with ``save_pretrained`` to a temporary
folder and loaded like a user's model. The two sides of a row alternate (vitft, Trainer, vitft,
Trainer, ...) and each side's best of ``--repeats`` is kept, so a change in the machine's load
hits both alike. **Ratios from one invocation are what count**; on a busy machine the absolute
seconds are pessimistic.

vitft runs with one ``VITFT_HOME`` per invocation, empty at the start: the first vitft run of a
model (ViT-Tiny or ViT-Small, batch 32, bf16) fills the dataset scan cache and runs the attention
trial; later runs of that model (the other rows of the same architecture, and repeats) find both
and skip them (``vitft_app.attention.recall``), as a user's second run on the same machine would.
The attention column says ``(trial)`` or ``(remembered)`` for the kept run; "all runs" lists
every run's seconds in order, the first run of each side included.

vitft's breakdown comes from its own run folder: the ``time:`` line :func:`train` writes to
``train.log`` (set-up, attention trial, training, validation, saving the best model,
checkpoints), ``RunFinished``'s duration (``status.json``), the model card's line, and the
process wall time (what is left is interpreter start-up, imports, the dataset scan and the
CLI's own work).

Usage (from the repository root)::

    python benchmarks/bench_whole_run.py --quick              # ViT-Tiny, 3 epochs, no augmentation, 1 repeat
    python benchmarks/bench_whole_run.py                      # tiny+small x 3+10 epochs x none+basic, best of 2
    python benchmarks/bench_whole_run.py --rows tiny-3-none,small-3-none --repeats 3
    python benchmarks/bench_whole_run.py --epochs 3 --rows tiny-3-basic
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_DATA = "/work/shared/datasets/hymenoptera"
ARCHS = {
    "tiny": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, patch_size=16),
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=16),
}
TARGETS = {"tiny": 1.5, "small": 1.4}
LR, BATCH = 5e-5, 32


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


def save_model(arch: str, folder: Path, num_labels: int = 2) -> Path:
    """A random-init ViT of ``arch`` at 224 px, saved with its image processor (seeded)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=224, num_labels=num_labels, **ARCHS[arch])
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------
# Trainer child
# ------------------------------------------------------------------------------------------------


def child_trainer(args: argparse.Namespace) -> None:
    """The transformers Trainer with evaluation and saving every epoch; prints its JSON last."""
    t_imports = time.perf_counter()
    import numpy as np
    import torch
    from torchvision import transforms
    from torchvision.datasets import ImageFolder
    from transformers import Trainer, TrainingArguments, ViTForImageClassification

    imported = time.perf_counter() - t_imports
    torch.manual_seed(0)
    normalize = [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
    if args.augment == "none":
        train_tf = transforms.Compose([transforms.Resize((224, 224)), *normalize])
    else:
        train_tf = transforms.Compose([transforms.RandomResizedCrop(224, scale=(0.08, 1.0)),
                                       transforms.RandomHorizontalFlip(), *normalize])
    val_tf = transforms.Compose([transforms.Resize((224, 224)), *normalize])

    class Dicts(torch.utils.data.Dataset):
        def __init__(self, folder):
            self.folder = folder

        def __len__(self):
            return len(self.folder)

        def __getitem__(self, i):
            x, y = self.folder[i]
            return {"pixel_values": x, "labels": y}

    train = ImageFolder(os.path.join(args.data, "train"), transform=train_tf)
    val = ImageFolder(os.path.join(args.data, "val"), transform=val_tf)

    def collate(rows):
        return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
                "labels": torch.tensor([r["labels"] for r in rows])}

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    model = ViTForImageClassification.from_pretrained(args.model)
    targs = TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
        num_train_epochs=args.epochs, learning_rate=LR, weight_decay=0.01, lr_scheduler_type="cosine",
        warmup_steps=0.1, max_grad_norm=1.0, bf16=True, use_cpu=True, report_to=[], eval_strategy="epoch",
        save_strategy="epoch", save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="accuracy",
        logging_strategy="epoch", dataloader_num_workers=0, remove_unused_columns=False, seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=Dicts(train), eval_dataset=Dicts(val),
                      data_collator=collate, compute_metrics=accuracy)
    trainer.train()
    trainer.save_model(os.path.join(args.out, "best"))
    best = trainer.state.best_metric
    print(json.dumps({"imports_s": imported, "best_val_accuracy": best}))


# ------------------------------------------------------------------------------------------------
# vitft side: run it, read its run folder
# ------------------------------------------------------------------------------------------------


def _timed(cmd: list[str], env: dict[str, str], timeout_s: float) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    return time.perf_counter() - t0, proc


def run_vitft(model: Path, epochs: int, augment: str, data: str, work: Path, timeout_s: float) -> dict:
    """One ``vitft train`` process; returns its wall time and the breakdown from its run folder."""
    home = work / "vitft-home"
    out = work / "vitft-runs"
    env = {**os.environ, "VITFT_HOME": str(home), "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "vitft_app.cli", "train", "--data", data, "--model", str(model),
           "--epochs", str(epochs), "--batch-size", str(BATCH), "--lr", str(LR), "--precision", "bf16",
           "--augment", augment, "--output-dir", str(out), "--seed", "0"]
    wall, proc = _timed(cmd, env, timeout_s)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["exit " + str(proc.returncode)]}
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    row = {"wall_s": wall, **vitft_breakdown(run_dir, wall)}
    shutil.rmtree(out, ignore_errors=True)
    return row


TIME_LINE = re.compile(r"time: (.*)$")


def vitft_breakdown(run_dir: Path, wall: float) -> dict:
    """Phases of one vitft run from ``train.log`` and ``status.json`` (seconds)."""
    status = json.loads((run_dir / "status.json").read_text())
    log = (run_dir / "train.log").read_text().splitlines()
    row: dict = {"train_call_s": float(status.get("duration_s") or 0.0), "best_val_accuracy": status.get("best_val_accuracy")}
    for line in log:
        match = TIME_LINE.search(line)
        if match:
            for name, value in re.findall(r"([a-z -]+?) ([0-9.]+) s", match.group(1)):
                row[name.strip().replace(" ", "_").replace("-", "")] = float(value)
        if "attention:" in line and " kept " in line:  # this run's trial decided
            row["attention"] = line.split("attention:")[1].split()[0] + " (trial)"
        if "attention:" in line and "this machine's trial of" in line:  # an earlier run's trial, remembered
            row["attention"] = line.split("attention:")[1].split()[0] + " (remembered)"
        card = re.search(r"model card written:.*\(([0-9.]+) s\)", line)
        if card:
            row["card_s"] = float(card.group(1))
    row["outside_train_s"] = wall - row["train_call_s"] - row.get("card_s", 0.0)
    return row


def run_trainer(model: Path, epochs: int, augment: str, data: str, work: Path, timeout_s: float) -> dict:
    out = work / "trainer-out"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "trainer", "--model", str(model), "--data", data,
           "--epochs-child", str(epochs), "--augment", augment, "--out", str(out)]
    wall, proc = _timed(cmd, dict(os.environ), timeout_s)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, **info}


# ------------------------------------------------------------------------------------------------
# Parent
# ------------------------------------------------------------------------------------------------


def all_rows(epochs: list[int]) -> list[str]:
    return [f"{arch}-{e}-{aug}" for arch in ARCHS for e in epochs for aug in ("none", "basic")]


BREAKDOWN = [  # (key, label) in the order a run goes
    ("outside_train_s", "start-up, imports, scan, CLI"),
    ("setup", "set-up in train()"),
    ("training_first_epoch", "training, epoch 1 (attention trial, cache filling)"),
    ("training_later_epochs", "training, later epochs"),
    ("validation", "validation"),
    ("saving_best_model", "saving best model"),
    ("checkpoints", "checkpoints"),
    ("other", "other in train()"),
    ("card_s", "model card"),
]


def majority_baseline(val_dir: Path) -> float:
    """Accuracy of always answering the largest class of ``val_dir`` (one subfolder per class), the
    baseline beside the val accuracies (hymenoptera: 83 bees of 153, 0.542)."""
    counts = [sum(1 for f in d.iterdir() if f.is_file()) for d in val_dir.iterdir() if d.is_dir()]
    return max(counts) / max(sum(counts), 1)


def breakdown_cells(run: dict) -> list[str]:
    """One cell per :data:`BREAKDOWN` phase of a vitft run: seconds with one decimal, or "-"."""
    return [f"{run[key]:.1f}" if isinstance(run.get(key), (int, float)) else "-" for key, _ in BREAKDOWN]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--rows", default=None, help="comma-separated ARCH-EPOCHS-AUGMENT, e.g. tiny-3-none,small-10-basic")
    parser.add_argument("--epochs", default="3,10", help="epoch counts for the default rows (comma-separated)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side and row; the best is kept")
    parser.add_argument("--quick", action="store_true", help="tiny-3-none only, one repeat")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per process")
    # child mode
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--epochs-child", type=int, default=3, dest="epochs_child", help=argparse.SUPPRESS)
    parser.add_argument("--augment", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "trainer":
        args.epochs = args.epochs_child
        child_trainer(args)
        return 0

    if args.quick:
        rows, repeats = ["tiny-3-none"], 1
    else:
        rows = args.rows.split(",") if args.rows else all_rows([int(e) for e in args.epochs.split(",")])
        repeats = args.repeats
    started = time.time()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-whole-") as tmp:
        work = Path(tmp)
        models = {}
        for row in rows:
            arch, epochs, augment = row.split("-")
            if arch not in models:
                models[arch] = save_model(arch, work / f"vit-{arch}")
            vitft_runs, trainer_runs = [], []
            for r in range(repeats):
                vitft_runs.append(run_vitft(models[arch], int(epochs), augment, args.data, work, args.timeout))
                trainer_runs.append(run_trainer(models[arch], int(epochs), augment, args.data, work, args.timeout))
                v = vitft_runs[-1]
                # The run's breakdown now, so a grid stopped part-way keeps it (the tables print at the end).
                parts = ", ".join(f"{label} {cell}" for (_, label), cell in zip(BREAKDOWN, breakdown_cells(v))
                                  if cell != "-")
                print(f"# {row} repeat {r + 1}: vitft {v.get('wall_s', v.get('error'))}"
                      f" trainer {trainer_runs[-1].get('wall_s', trainer_runs[-1].get('error'))}"
                      + (f" · vitft breakdown (s): {parts}" if parts else ""), flush=True)
            ok_v = [x for x in vitft_runs if "wall_s" in x]
            ok_t = [x for x in trainer_runs if "wall_s" in x]
            results[row] = {
                "vitft": min(ok_v, key=lambda x: x["wall_s"]) if ok_v else vitft_runs[0],
                "trainer": min(ok_t, key=lambda x: x["wall_s"]) if ok_t else trainer_runs[0],
                "all_vitft": [x.get("wall_s") for x in vitft_runs],
                "all_trainer": [x.get("wall_s") for x in trainer_runs],
            }

    load = os.getloadavg()
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')} · {os.uname().nodename} · {os.cpu_count()} CPUs · load average "
          f"{load[0]:.1f} · best of {repeats}, alternated · {time.time() - started:.0f} s total · "
          f"hymenoptera {args.data} · validation majority baseline {majority_baseline(Path(args.data) / 'val'):.3f}")
    print("\n| row | vitft s | Trainer s | ratio | target | met? | vitft attention | vitft best val acc | Trainer best val acc |")
    print("|---|---:|---:|---:|---:|---|---|---:|---:|")
    for row, res in results.items():
        v, t = res["vitft"], res["trainer"]
        arch = row.split("-")[0]
        if "wall_s" not in v or "wall_s" not in t:
            print(f"| {row} | {v.get('wall_s', v.get('error'))} | {t.get('wall_s', t.get('error'))} | - | - | - | - | - | - |")
            continue
        ratio = t["wall_s"] / v["wall_s"]
        target = TARGETS[arch]
        acc_v = v.get("best_val_accuracy")
        acc_t = t.get("best_val_accuracy")
        print(f"| {row} | {v['wall_s']:.1f} | {t['wall_s']:.1f} | {ratio:.2f}x | {target:.1f}x | "
              f"{'yes' if ratio >= target else 'no'} | {v.get('attention', '-')} | "
              f"{acc_v if acc_v is None else f'{acc_v:.3f}'} | {acc_t if acc_t is None else f'{acc_t:.3f}'} |")
    print("\nvitft breakdown (seconds, from its train.log / status.json; the best run of each row):\n")
    print("| row | " + " | ".join(label for _, label in BREAKDOWN) + " | whole |")
    print("|---|" + "---:|" * (len(BREAKDOWN) + 1))
    for row, res in results.items():
        v = res["vitft"]
        if "wall_s" not in v:
            continue
        cells = breakdown_cells(v)
        print(f"| {row} | " + " | ".join(cells) + f" | {v['wall_s']:.1f} |")
    print("\nall runs (s): " + "; ".join(f"{row}: vitft {res['all_vitft']}, Trainer {res['all_trainer']}"
                                          for row, res in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
