"""Training throughput of vitft against a plain PyTorch loop and the transformers ``Trainer``.

Every row runs in its own process (``subprocess``) on the same data, so one row's caches, threads
and allocator state never help or hurt another, and ``ru_maxrss`` is the row's own peak RSS. The
parent prints one markdown table. Ratios measured side by side in one invocation are what count;
absolute numbers move with the machine's load.

Usage (from the repository root)::

    python benchmarks/bench_train.py --quick            # < 5 min on a 2-core CPU
    python benchmarks/bench_train.py                    # more steps, freeze depths 0,3,6,9,12, ViT-Small
    python benchmarks/bench_train.py --tta              # time-to-accuracy on cifar10-subset (long)
    python benchmarks/bench_train.py --rows trainer-bf16,vitft-cache

Model: ViT-Tiny (hidden 192, 12 blocks, 3 heads, MLP 768, patch 16), random init, 224 px, two
classes, batch 32, full fine-tune unless the row says otherwise (the "ViT-Small" rows: hidden 384,
6 heads, MLP 1536, saved to a temporary folder and loaded like a user's model); AdamW; no random
augmentation in any row (every row decodes and resizes the same JPEGs to 224x224, normalizes with mean = std =
0.5).

Measurement: ``--warmup-steps`` steps are run first, then ``--steps`` optimizer steps are timed.
images/s = images in the timed steps / their wall time, **data loading and JPEG decoding
included**. vitft rows use ``attention="auto"`` (the kernel it picked is in the table) unless the
row forces one; the Trainer rows use the model's default (sdpa) or, where the row says so, eager.
data-wait = share of the timed steps' wall time spent getting the batch. Rows that call
``vitft_app.training.train`` run whole epochs; their steady state is epoch 2 onwards (epoch 1
fills the caches), from the ``StepLogged`` events (``log_every_steps=1``).

FLOPs per training image (analytic, as nanoGPT's ``estimate_mfu`` / the PaLM appendix B count,
with the attention term of Kaplan et al. 2020, table 1)::

    T = (H/P) * (W/P) + 1 tokens, D hidden, M MLP width, L blocks, C classes
    forward  = L * (2 * T * (4*D*D + 2*D*M)   # qkv, proj, fc1, fc2 matmuls
                    + 4 * T*T * D)            # q @ k^T and attn @ v
             + 2 * (T-1) * 3*P*P * D          # patch embedding
             + 2 * D * C                      # head
    training = 3 * forward                    # backward is ~2x forward

(ViT-Tiny 224: forward 2.51 GFLOP, training 7.52 GFLOP per image.) For frozen rows, frozen blocks
count 1x forward and trainable blocks 3x; rows that read cached features count only what they run.
utilization = images/s * FLOPs per image / measured 2048^3 matmul FLOP/s of the row's dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_memory import peak_rss_mib  # beside this script (sys.path[0])

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_DATA = "/work/shared/datasets/hymenoptera"
CIFAR = "/work/shared/datasets/cifar10-subset"
VIT_TINY = dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, patch_size=16)
VIT_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=16)
VIT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16)
ARCHS = {"tiny": VIT_TINY, "small": VIT_SMALL, "base": VIT_BASE}


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------


def vit_forward_flops(image_size: int, patch_size: int, hidden_size: int, intermediate_size: int,
                      num_blocks: int, num_classes: int = 2, blocks: int | None = None,
                      embeddings: bool = True, head: bool = True, token_keep: float = 1.0) -> float:
    """Forward FLOPs of one image through a ViT (see the module docstring for the formula).

    Args:
        image_size, patch_size: pixels.
        hidden_size, intermediate_size: D and M.
        num_blocks: L of the model (unused when ``blocks`` is given).
        num_classes: C.
        blocks: count only this many blocks (e.g. the trainable suffix); default ``num_blocks``.
        embeddings, head: include the patch embedding / classifier.
        token_keep: fraction of patch tokens the blocks see (PatchDropout keeps ``1 - rate``).

    Returns:
        FLOPs (multiply-add = 2 FLOPs) per image.
    """
    patches = (image_size // patch_size) ** 2
    tokens = round(token_keep * patches) + 1
    d, m = hidden_size, intermediate_size
    per_block = 2 * tokens * (4 * d * d + 2 * d * m) + 4 * tokens * tokens * d
    total = (num_blocks if blocks is None else blocks) * per_block
    if embeddings:
        total += 2 * patches * 3 * patch_size * patch_size * d
    if head:
        total += 2 * d * num_classes
    return float(total)


def vit_training_flops(image_size: int = 224, freeze_depth: int = 0, cached: bool = False, arch: dict = VIT_TINY,
                       num_classes: int = 2, token_keep: float = 1.0) -> float:
    """Training FLOPs per image: 3x forward for trainable parts, 1x for frozen ones, 0 for cached ones."""
    L = arch["num_hidden_layers"]
    common = dict(image_size=image_size, patch_size=arch["patch_size"], hidden_size=arch["hidden_size"],
                  intermediate_size=arch["intermediate_size"], num_blocks=L, num_classes=num_classes,
                  token_keep=token_keep)
    trainable = vit_forward_flops(**common, blocks=L - freeze_depth, embeddings=freeze_depth == 0, head=True)
    frozen = vit_forward_flops(**common, blocks=freeze_depth, embeddings=freeze_depth > 0, head=False)
    return 3 * trainable + (0.0 if cached else frozen)


# ------------------------------------------------------------------------------------------------
# Child helpers
# ------------------------------------------------------------------------------------------------


def _vit_config(num_labels: int, image_size: int = 224, attn: str = "sdpa", arch: dict = VIT_TINY):
    from transformers import ViTConfig

    config = ViTConfig(image_size=image_size, num_labels=num_labels, **arch)
    config._attn_implementation = attn
    return config


def _reference_transform(image_size: int):
    """The "standard" torchvision transforms of the plain-loop and Trainer rows."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize([0.5] * 3, [0.5] * 3),
    ])


def matmul_flops(dtype_name: str, n: int = 2048, seconds: float = 2.0) -> float:
    """Measured FLOP/s of an ``n^3`` matmul: the median of repeated timings for ~``seconds``.

    The median, not the best: on a shared machine the best timing catches moments when the other
    tenants are idle, while a training row's images/s is an average over its whole run.
    """
    import statistics

    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def child_ceiling(args) -> dict:
    return {"bf16_flops": matmul_flops("bf16"), "fp32_flops": matmul_flops("fp32")}


def _timed_steps(step_fn, batches, warmup: int, steps: int, batch_images):
    """Runs warmup + steps, returns (images, seconds, data seconds) of the timed steps."""
    images = seconds = data_s = 0.0
    it = batches()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = batches()
            batch = next(it)
        t1 = time.perf_counter()
        step_fn(batch)
        t2 = time.perf_counter()
        if i >= warmup:
            images += batch_images(batch)
            seconds += t2 - t0
            data_s += t1 - t0
    return images, seconds, data_s


def child_plain(args) -> dict:
    """Plain PyTorch loop: torchvision ImageFolder + standard transforms, fp32, AdamW."""
    import torch
    from torchvision.datasets import ImageFolder
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    data = ImageFolder(os.path.join(args.data, "train"), transform=_reference_transform(224))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, num_workers=0)
    model = ViTForImageClassification(_vit_config(len(data.classes), attn=args.attn, arch=ARCHS[args.arch])).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)

    def step(batch):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    images, seconds, data_s = _timed_steps(step, lambda: iter(loader), args.warmup_steps, args.steps,
                                           lambda b: b[1].numel())
    return {"images_per_sec": images / seconds, "data_wait": data_s / seconds, "dtype": "fp32",
            "flops_per_image": vit_training_flops(arch=ARCHS[args.arch])}


def child_trainer(args) -> dict:
    """transformers Trainer, the same decoded data through a Dataset of dicts and a collator."""
    import torch
    from torchvision.datasets import ImageFolder
    from transformers import Trainer, TrainerCallback, TrainingArguments, ViTForImageClassification

    torch.manual_seed(0)
    folder = ImageFolder(os.path.join(args.data, "train"), transform=_reference_transform(224))

    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return len(folder)

        def __getitem__(self, i):
            x, y = folder[i]
            return {"pixel_values": x, "labels": y}

    sizes: list[int] = []  # batch sizes in fetch order (accelerate may fetch one batch ahead)

    def collate(rows):
        sizes.append(len(rows))
        return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
                "labels": torch.tensor([r["labels"] for r in rows])}

    times: list[tuple[str, float]] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            times.append(("begin", time.perf_counter()))

        def on_step_end(self, *a, **k):
            times.append(("end", time.perf_counter()))

    model = ViTForImageClassification(_vit_config(len(folder.classes), attn=args.attn, arch=ARCHS[args.arch]))
    bf16 = args.precision == "bf16"
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.warmup_steps + args.steps,
            learning_rate=5e-5, bf16=bf16, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
            eval_strategy="no", dataloader_num_workers=0, remove_unused_columns=False, seed=0,
            disable_tqdm=True,
        )
        Trainer(model=model, args=targs, train_dataset=Dicts(), data_collator=collate, callbacks=[Clock()]).train()
    ends = [t for k, t in times if k == "end"]
    begins = [t for k, t in times if k == "begin"]
    w = args.warmup_steps
    seconds = ends[-1] - ends[w - 1]
    data_s = sum(begins[i] - ends[i - 1] for i in range(w, len(ends)))
    return {"images_per_sec": sum(sizes[w : len(ends)]) / seconds, "data_wait": data_s / seconds,
            "dtype": "bf16" if bf16 else "fp32", "flops_per_image": vit_training_flops(arch=ARCHS[args.arch])}


def _vitft_run(args, decode_cache: bool, freeze_depth: int = 0, epochs: int | None = None, data: str | None = None,
               image_size: int = 224, lr: float = 5e-5) -> dict:
    """Runs ``vitft_app.training.train`` and reads its events.

    ``decode_cache=True`` is train() as users get it (decode cache and frozen-prefix feature cache
    on); False turns both off (engine options ``EngineOptions(decode_cache=False,
    feature_cache=False)``, passed to train() and written to its log), for the side-by-side comparison.
    """
    from vitft_app import training
    from vitft_app.config import TrainConfig
    from vitft_app.data import ImageDataset
    from vitft_app.events import EvalDone, LogMessage, StepLogged

    data_s = [0.0]

    class TimedDataset(ImageDataset):
        def __getitem__(self, index):
            t0 = time.perf_counter()
            try:
                return super().__getitem__(index)
            finally:
                data_s[0] += time.perf_counter() - t0

    # train() decodes through ImageDataset (augmented or caches off) or the decode cache's
    # CachedImageDataset (images never randomly augmented); both are timed for the data-wait share.
    training.loaders.ImageDataset = TimedDataset  # where the loop builds its datasets
    # the "cache" rows run train() exactly as users get it (the default engine options)
    options = training.EngineOptions(decode_cache=decode_cache, feature_cache=decode_cache)
    if decode_cache:
        from vitft_app import decode_cache as decode_cache_module

        original = decode_cache_module.CachedImageDataset.__getitem__

        def timed_getitem(self, index):
            t0 = time.perf_counter()
            try:
                return original(self, index)
            finally:
                data_s[0] += time.perf_counter() - t0

        decode_cache_module.CachedImageDataset.__getitem__ = timed_getitem

    epochs = epochs or args.epochs
    arch = ARCHS[args.arch]
    model_dir = None
    if args.arch == "tiny":
        model = "vit-tiny-scratch"
    else:  # a random ViT of this size saved with save_pretrained, loaded like a user's local folder
        from transformers import ViTForImageClassification, ViTImageProcessor

        model_dir = tempfile.mkdtemp(prefix="bench-vit-")
        ViTForImageClassification(_vit_config(2, image_size, arch=arch)).save_pretrained(model_dir)
        ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(model_dir)
        model = model_dir
    config = TrainConfig(data_dir=data or args.data, model=model, image_size=image_size if model == "vit-tiny-scratch"
                         else None, freeze_depth=freeze_depth, epochs=epochs, batch_size=args.batch_size, lr=lr,
                         precision=args.precision, augment="none", num_workers=0, log_every_steps=1, seed=0,
                         attention=args.attention, patch_dropout=args.patch_dropout)
    notes: list[str] = []
    steps: list[tuple[int, float, float]] = []  # (epoch index, images, seconds)
    epoch_marks: list[float] = []
    evals: list[tuple[float, float]] = []
    epoch_data: dict[int, float] = {}
    current = [0]
    n_train = [0]
    t_begin = [0.0]

    def emit(event):
        now = time.perf_counter()
        if hasattr(event, "num_train"):
            notes.extend(event.notes)
            n_train[0] = event.num_train
            t_begin[0] = now
            epoch_marks.append(now)
        if isinstance(event, LogMessage):
            notes.append(event.text)
        if isinstance(event, StepLogged):
            epoch_index = current[0]
            step_in_epoch = sum(1 for e, _, _ in steps if e == epoch_index)
            images = min(args.batch_size, n_train[0] - step_in_epoch * args.batch_size)
            steps.append((epoch_index, images, images / event.images_per_sec))
            epoch_data[epoch_index] = data_s[0]
        if isinstance(event, EvalDone):
            evals.append((now - t_begin[0], event.val_accuracy))
            epoch_marks.append(now)
            current[0] += 1
            data_s[0] = 0.0

    with tempfile.TemporaryDirectory() as run_dir:
        training.train(config, run_dir, emit, device="cpu", options=options)
    if model_dir is not None:
        shutil.rmtree(model_dir)
    steady = [s for s in steps if s[0] >= 1] or steps
    images = sum(s[1] for s in steady)
    seconds = sum(s[2] for s in steady)
    data_wait = sum(epoch_data.get(e, 0.0) for e in {s[0] for s in steady}) / seconds
    epoch_times = [b - a for a, b in zip(epoch_marks, epoch_marks[1:])]
    return {"images_per_sec": images / seconds, "data_wait": data_wait, "epoch_s": epoch_times,
            "dtype": args.precision, "evals": evals,
            # the kernel the run settled on (auto: the trial's "attention: eager kept (...)" line)
            "attention": [n.split(" ")[1] for n in notes if n.startswith("attention:")][-1],
            "flops_per_image": vit_training_flops(image_size, freeze_depth, arch=arch,
                                                  token_keep=1 - args.patch_dropout,
                                                  **({"cached": True} if decode_cache and freeze_depth else {}))}


def child_vitft(args) -> dict:
    return _vitft_run(args, decode_cache=False, freeze_depth=args.freeze)


def child_vitft_cache(args) -> dict:
    return _vitft_run(args, decode_cache=True, freeze_depth=args.freeze)


def child_tta_trainer(args) -> dict:
    """Trainer on cifar10-subset at 32 px for ``args.epochs`` epochs; val accuracy after each."""
    import numpy as np
    import torch
    from torchvision.datasets import ImageFolder
    from transformers import Trainer, TrainerCallback, TrainingArguments, ViTForImageClassification

    from vitft_app.modeling import scratch_config

    torch.manual_seed(0)
    tf = _reference_transform(32)
    train, val = (ImageFolder(os.path.join(args.data, s), transform=tf) for s in ("train", "val"))

    class Dicts(torch.utils.data.Dataset):
        def __init__(self, folder):
            self.folder = folder

        def __len__(self):
            return len(self.folder)

        def __getitem__(self, i):
            x, y = self.folder[i]
            return {"pixel_values": x, "labels": y}

    def collate(rows):
        return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
                "labels": torch.tensor([r["labels"] for r in rows])}

    t0 = time.perf_counter()
    evals: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_evaluate(self, a, state, control, metrics=None, **k):
            evals.append((time.perf_counter() - t0, float(metrics["eval_accuracy"])))

    def metrics(p):
        return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}

    model = ViTForImageClassification(scratch_config(32, dict(enumerate(train.classes))))
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=128,
            num_train_epochs=args.epochs, learning_rate=args.lr, warmup_steps=0.1, lr_scheduler_type="cosine",
            weight_decay=0.01, max_grad_norm=1.0, bf16=args.precision == "bf16", use_cpu=True, report_to=[],
            save_strategy="no", logging_strategy="no", eval_strategy="epoch", dataloader_num_workers=0,
            remove_unused_columns=False, seed=0, disable_tqdm=True,
        )
        Trainer(model=model, args=targs, train_dataset=Dicts(train), eval_dataset=Dicts(val), data_collator=collate,
                compute_metrics=metrics, callbacks=[Clock()]).train()
    return {"evals": evals, "dtype": args.precision}


def child_tta_vitft(args) -> dict:
    return _vitft_run(args, decode_cache=True, epochs=args.epochs, data=args.data, image_size=32, lr=args.lr)


CHILDREN = {
    "ceiling": child_ceiling, "plain": child_plain, "trainer": child_trainer, "vitft": child_vitft,
    "vitft-cache": child_vitft_cache, "tta-trainer": child_tta_trainer,
    "tta-vitft": child_tta_vitft,
}


# ------------------------------------------------------------------------------------------------
# Parent
# ------------------------------------------------------------------------------------------------


def run_child(kind: str, extra: list[str], timeout_s: float = 900) -> dict:
    """Runs one row in a fresh interpreter; returns its JSON result (or ``{"error": ...}``)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               VITFT_HOME=os.environ.get("VITFT_HOME", os.path.join(tempfile.gettempdir(), "vitft-bench-home")),
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout_s)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["wall_s"] = time.perf_counter() - t0
            return result
    return {"error": (proc.stderr or proc.stdout)[-2000:]}


ROW_SPECS = {
    # name: (child kind, extra args, label)
    "plain-fp32": ("plain", ["--precision", "fp32"], "plain loop fp32 (ImageFolder)"),
    "trainer-fp32": ("trainer", ["--precision", "fp32"], "Trainer fp32"),
    "trainer-bf16": ("trainer", ["--precision", "bf16"], "Trainer bf16"),
    "trainer-bf16-eager": ("trainer", ["--precision", "bf16", "--attn", "eager"], "Trainer bf16, eager attention"),
    "vitft": ("vitft", ["--precision", "bf16"], "vitft train() bf16, caches off"),
    "vitft-cache": ("vitft-cache", ["--precision", "bf16"], "vitft train() bf16 (decode cache on: augment none)"),
    "vitft-cache-sdpa": ("vitft-cache", ["--precision", "bf16", "--attention", "sdpa"],
                         "vitft train() bf16, decode cache, attention forced sdpa"),
    "vitft-pd25": ("vitft-cache", ["--precision", "bf16", "--patch-dropout", "0.25"],
                   "vitft train() bf16, decode cache, PatchDropout 0.25"),
    "vitft-pd50": ("vitft-cache", ["--precision", "bf16", "--patch-dropout", "0.5"],
                   "vitft train() bf16, decode cache, PatchDropout 0.5"),
    "trainer-bf16-small": ("trainer", ["--precision", "bf16", "--arch", "small"], "ViT-Small: Trainer bf16"),
    "trainer-bf16-eager-small": ("trainer", ["--precision", "bf16", "--attn", "eager", "--arch", "small"],
                                 "ViT-Small: Trainer bf16, eager attention"),
    "vitft-cache-small": ("vitft-cache", ["--precision", "bf16", "--arch", "small"],
                          "ViT-Small: vitft train() bf16, decode cache"),
}


def _fmt(value, spec: str = ".1f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and freeze depths (< 5 min)")
    parser.add_argument("--tta", action="store_true", help="time-to-accuracy on cifar10-subset instead")
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup-steps", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--freeze-depths", default=None, help="e.g. 0,3,6,9,12")
    parser.add_argument("--json", default=None, help="also write all results to this file")
    # child-only
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--attn", default="sdpa", help=argparse.SUPPRESS)
    parser.add_argument("--attention", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--patch-dropout", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--arch", default="tiny", choices=list(ARCHS), help=argparse.SUPPRESS)
    parser.add_argument("--freeze", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, default=5e-4, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = CHILDREN[args.child](args)
        result["peak_rss_mib"] = peak_rss_mib()
        result["arch"] = args.arch
        print("RESULT " + json.dumps(result), flush=True)
        return

    warmup = args.warmup_steps if args.warmup_steps is not None else (2 if args.quick else 3)
    steps = args.steps if args.steps is not None else (6 if args.quick else 16)
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 3)
    common = ["--data", args.data, "--batch-size", str(args.batch_size), "--warmup-steps", str(warmup),
              "--steps", str(steps), "--epochs", str(epochs)]
    if args.tta:
        run_tta(args, common)
        return
    depths = [int(d) for d in (args.freeze_depths or ("6" if args.quick else "3,6,9")).split(",")]
    rows = dict(ROW_SPECS)
    rows["vitft-probe-nocache"] = ("vitft", ["--precision", "bf16", "--freeze", "12"],
                                   "vitft train(), freeze 12 (linear probe), caches off")
    rows["vitft-probe"] = ("vitft-cache", ["--precision", "bf16", "--freeze", "12"],
                           "vitft train(), freeze 12 (linear probe): feature cache")
    for d in depths:
        if d in (0, 12):
            continue
        rows[f"vitft-freeze{d}-nocache"] = ("vitft", ["--precision", "bf16", "--freeze", str(d)],
                                            f"vitft train(), freeze {d}, caches off")
        rows[f"vitft-freeze{d}"] = ("vitft-cache", ["--precision", "bf16", "--freeze", str(d)],
                                    f"vitft train(), freeze {d}: decode + feature cache")
    # --quick leaves out the ViT-Small rows and PatchDropout 0.25 (the full run has them)
    quick_skip = {"vitft-pd25", "trainer-bf16-small", "trainer-bf16-eager-small", "vitft-cache-small"}
    wanted = args.rows.split(",") if args.rows else [r for r in rows if not (args.quick and r in quick_skip)]
    t_all = time.perf_counter()
    ceiling = run_child("ceiling", common)
    print(f"matmul 2048^3: bf16 {ceiling.get('bf16_flops', 0) / 1e9:.0f} GFLOP/s, "
          f"fp32 {ceiling.get('fp32_flops', 0) / 1e9:.0f} GFLOP/s", flush=True)
    results = {}
    for name in wanted:
        kind, extra, label = rows[name]
        results[name] = run_child(kind, common + extra)
        r = results[name]
        print(f"  {name}: " + (f"{r['images_per_sec']:.1f} img/s ({r['wall_s']:.0f} s)" if "error" not in r
                                 else "ERROR " + r["error"][-500:]), flush=True)
    print_table(results, rows, ceiling, args, warmup, steps, epochs, time.perf_counter() - t_all)
    if args.json:
        Path(args.json).write_text(json.dumps({"ceiling": ceiling, "rows": results}, indent=2))


def print_table(results, rows, ceiling, args, warmup, steps, epochs, total_s) -> None:
    ok = {k: v for k, v in results.items() if "error" not in v}

    def trainer_best(arch: str) -> float | None:
        """The Trainer at its best precision (fp32 or bf16; default sdpa attention), same model size."""
        rates = [v["images_per_sec"] for k, v in ok.items()
                 if k.startswith(("trainer-fp32", "trainer-bf16")) and "eager" not in k and v.get("arch") == arch]
        return max(rates) if rates else None

    def trainer_eager(arch: str) -> float | None:
        rates = [v["images_per_sec"] for k, v in ok.items() if "trainer-bf16-eager" in k and v.get("arch") == arch]
        return max(rates) if rates else None

    plain = ok.get("plain-fp32", {}).get("images_per_sec")
    full_epoch = None
    for key in ("vitft-cache", "vitft"):
        if key in ok and len(ok[key].get("epoch_s", [])) >= 2:
            full_epoch = sum(ok[key]["epoch_s"][1:]) / len(ok[key]["epoch_s"][1:])
            break
    print()
    print(f"{time.strftime('%Y-%m-%d %H:%M')} · {os.uname().nodename} · torch threads {_threads()} · "
          f"batch {args.batch_size} · warmup {warmup} + {steps} timed steps (epoch rows: epochs 2..{epochs}) · "
          f"{total_s:.0f} s total")
    print(f"matmul 2048^3: bf16 {ceiling.get('bf16_flops', 0) / 1e9:.0f} GFLOP/s, fp32 "
          f"{ceiling.get('fp32_flops', 0) / 1e9:.0f} GFLOP/s")
    print()
    print("| row | attention | img/s | vs Trainer best | vs Trainer eager | vs plain | utilization | data-wait "
          "| epoch s (ep 1 → ≥2) | full-FT epoch / this epoch | peak RSS MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        label = rows[name][2]
        if "error" in r:
            print(f"| {label} | error: {r['error'].strip().splitlines()[-1][:80]} | | | | | | | | | |")
            continue
        arch = r.get("arch", "tiny")
        best, eager = trainer_best(arch), trainer_eager(arch)
        attention = r.get("attention") or ("eager" if "eager" in name else "sdpa")
        ips = r["images_per_sec"]
        peak = ceiling.get(f"{r['dtype']}_flops")
        util = ips * r["flops_per_image"] / peak if peak and r["flops_per_image"] > 1e8 else None
        ep = r.get("epoch_s") or []
        ep_txt = f"{ep[0]:.1f} → {sum(ep[1:]) / len(ep[1:]):.2f}" if len(ep) >= 2 else "-"
        speedup = (full_epoch / (sum(ep[1:]) / len(ep[1:]))) if full_epoch and len(ep) >= 2 and arch == "tiny" \
            else None
        print(f"| {label} | {attention} | {ips:.1f} | {_fmt(ips / best if best else None, '.2f')}x "
              f"| {_fmt(ips / eager if eager else None, '.2f')}x "
              f"| {_fmt(ips / plain if plain and arch == 'tiny' else None, '.2f')}x | {_fmt(util, '.2f')} "
              f"| {100 * r['data_wait']:.1f}% | {ep_txt} | {_fmt(speedup, '.1f')}x | {r['peak_rss_mib']:.0f} |")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def run_tta(args, common: list[str]) -> None:
    """Time for vitft to reach the best val accuracy the Trainer reaches in 5 epochs (cifar10-subset)."""
    data = args.data if args.data != DEFAULT_DATA else CIFAR
    extra = ["--data", data, "--epochs", str(args.epochs or 5), "--batch-size", str(args.batch_size)]
    trainer = run_child("tta-trainer", extra + ["--precision", "bf16"], timeout_s=3600)
    vitft = run_child("tta-vitft", extra + ["--precision", "bf16"], timeout_s=3600)
    if "error" in trainer or "error" in vitft:
        print("ERROR", trainer.get("error", ""), vitft.get("error", ""))
        return
    target = max(acc for _, acc in trainer["evals"])
    t_trainer = next(t for t, acc in trainer["evals"] if acc >= target)
    t_vitft = next((t for t, acc in vitft["evals"] if acc >= target), None)
    print("| run | val acc per epoch | time to reach Trainer's best | peak RSS MiB |")
    print("|---|---|---:|---:|")
    for name, r, t in (("Trainer bf16", trainer, t_trainer), ("vitft bf16 + decode cache", vitft, t_vitft)):
        accs = ", ".join(f"{acc:.3f}@{s:.0f}s" for s, acc in r["evals"])
        print(f"| {name} | {accs} | {_fmt(t, '.0f', 'not reached')} s | {r['peak_rss_mib']:.0f} |")
    if t_vitft:
        print(f"\ntime-to-accuracy ratio (Trainer / vitft): {t_trainer / t_vitft:.2f}x (target acc {target:.3f})")


if __name__ == "__main__":
    main()
