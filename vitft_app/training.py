"""The training loop. It reads top to bottom in stages: data, model, optimizer and schedule,
then per step forward/backward with accumulation, non-finite guard, clip, step, EMA, log; per
epoch evaluate, save the best model, checkpoint, early stopping, Stop. It reports only through
``emit(event)`` and knows nothing of Gradio."""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import (AttentionTrial, can_switch_attention, current_attention, evaluation_attention,
                        set_attention)
from .augment import PatchDropout, create_batch_mixer, mask_patches
from .checkpoint import (ResumeError, capture_rng, estimate_checkpoint_bytes, load_checkpoint, low_space_warning,
                         remove_checkpoint, restore_rng, save_checkpoint)
from .config import TrainConfig
from .data import DatasetReport, ImageDataset, build_transforms, collate_skipping_failures, processor_spec, scan_dataset
from .device import DevicePlan, resolve_device_plan
from .distributed import DistContext, current_context, process_device
from .baseline import majority_baseline
from .events import Emit, EvalDone, LogMessage, RunFinished, RunStarted, StepLogged, StepProgress
from .filecheck import Progress
from .modeling import build_model, count_parameters, freeze_layers, has_cls_token, num_blocks
from .optim import create_ema, create_optimizer, create_scheduler
from .runs import save_model_atomically
from .run_timing import PhaseClock

__all__ = [
    "DatasetError",
    "NonFiniteLossError",
    "TrainResult",
    "class_weight_tensor",
    "compute_loss",
    "create_optimizer",
    "create_scheduler",
    "evaluate",
    "feature_distill_loss",
    "optimizer_steps_per_epoch",
    "preflight",
    "prepare_data",
    "resume_run",
    "train",
]


#: Frozen-prefix feature caching (on by default; tests and benchmarks turn it off to compare).
USE_FEATURE_CACHE = True
#: Decode cache for images that are never randomly augmented (on by default; see above).
USE_DECODE_CACHE = True
#: Memory tier of the decode cache; beyond it entries go to ``run_dir/DECODE_CACHE_DIR``.
DECODE_CACHE_BUDGET_BYTES = 2 * 1024**3
DECODE_CACHE_DIR = ".decode-cache"


class DatasetError(ValueError):
    """The dataset cannot be trained on (fewer than 2 classes, no validation images, ...)."""


class NonFiniteLossError(RuntimeError):
    """The loss or gradient was NaN/inf for ``max_nonfinite_steps`` optimizer steps in a row."""


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        status: ``"completed"`` or ``"stopped"``.
        best_val_accuracy: validation accuracy of the best epoch (0..1), or None when no epoch finished.
        steps: optimizer steps taken (including steps skipped by the non-finite guard).
        duration_s: wall time of the whole call, seconds.
        reason: why the run ended early (early stopping), else empty.
    """

    status: str
    best_val_accuracy: float | None
    steps: int
    duration_s: float
    reason: str = ""


def optimizer_steps_per_epoch(num_micro_batches: int, grad_accum_steps: int) -> int:
    """Optimizer steps in one epoch: ``ceil(micro-batches / grad_accum_steps)``.

    The rule for leftovers: the last micro-batches of an epoch (fewer than ``grad_accum_steps``)
    still make one optimizer step, with the loss averaged over the samples they actually hold, so
    no image is dropped and the scheduler's total equals the steps really taken.
    """
    return math.ceil(num_micro_batches / grad_accum_steps)


#: Seconds between two :class:`~vitft_app.events.StepProgress` events (the live view polls once a second).
PROGRESS_INTERVAL_S = 1.0


def log_interval(log_every_steps: int, steps_per_epoch: int) -> int:
    """Optimizer steps between two loss rows: ``log_every_steps``, but at least about four rows per
    epoch, so a small dataset (hymenoptera: 8 steps per epoch) draws a curve in its first epoch.

    Args:
        log_every_steps: the configured interval (TrainConfig.log_every_steps).
        steps_per_epoch: optimizer steps in one epoch.

    Returns:
        ``min(log_every_steps, max(1, steps_per_epoch // 4))``.
    """
    return max(1, min(log_every_steps, steps_per_epoch // 4))


def _baseline_dict(report: DatasetReport) -> dict[str, Any] | None:
    """The validation split's majority-class rate for ``RunStarted`` (None when empty)."""
    baseline = majority_baseline((item.label for item in report.val), report.classes)
    return None if baseline is None else baseline.to_dict()


def _window_sizes(num_samples: int, batch_size: int, grad_accum_steps: int) -> list[int]:
    """Samples per accumulation window of one epoch (the divisor of the per-sample mean loss)."""
    micro = [min(batch_size, num_samples - i) for i in range(0, num_samples, batch_size)]
    return [sum(micro[i : i + grad_accum_steps]) for i in range(0, len(micro), grad_accum_steps)]


def class_weight_tensor(report: DatasetReport, kind: str) -> torch.Tensor | None:
    """Per-class loss weights from the training split.

    ``balanced`` is scikit-learn's ``compute_class_weight("balanced")``: ``n_samples /
    (n_classes * n_samples_of_class)``, so every class contributes the same total weight. For a
    multi-label dataset it returns BCE ``pos_weight`` instead: ``negatives / positives`` per
    label (the ``BCEWithLogitsLoss`` documentation's rule), clamped to [1/100, 100].

    Args:
        report: the dataset report (``train`` items, ``classes``, ``multi_label``).
        kind: ``"none"`` or ``"balanced"``.

    Returns:
        float32 ``(C,)``, or None for ``"none"``. A class with no training image gets weight 0
        (single-label) or 1 (multi-label).
    """
    if kind == "none":
        return None
    num_classes = len(report.classes)
    if report.multi_label:
        positives = torch.zeros(num_classes)
        for item in report.train:
            positives[list(item.labels or (item.label,))] += 1
        negatives = len(report.train) - positives
        weights = torch.where(positives > 0, negatives / positives.clamp(min=1), torch.ones(num_classes))
        return weights.clamp(0.01, 100.0)
    counts = torch.bincount(torch.tensor([item.label for item in report.train]), minlength=num_classes).float()
    return torch.where(counts > 0, len(report.train) / (num_classes * counts.clamp(min=1)), torch.zeros(num_classes))


def compute_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    multi_label: bool = False,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Summed per-sample classification loss of a batch (divide by the sample count for the mean).

    Single-label: ``F.cross_entropy`` with class-index targets ``(B,)`` int64 or soft targets
    ``(B, C)`` float (MixUp/CutMix), optional class weights and label smoothing (PyTorch applies
    the smoothing to soft targets too). Multi-label: ``BCEWithLogitsLoss`` on multi-hot targets,
    averaged over the C labels per sample (the value ``ViTForImageClassification`` reports),
    ``class_weights`` used as ``pos_weight``.

    Args:
        logits: ``(B, C)``, any float dtype (computed in float32).
        targets: see above.
        multi_label: BCE instead of cross-entropy.
        class_weights: ``(C,)`` from :func:`class_weight_tensor`, or None.
        label_smoothing: epsilon in [0, 1) (single-label only).

    Returns:
        A float32 scalar: the sum over the batch of the per-sample losses.
    """
    logits = logits.float()
    if multi_label:
        per_label = F.binary_cross_entropy_with_logits(
            logits, targets.float(), pos_weight=class_weights, reduction="none"
        )
        return per_label.mean(dim=1).sum()
    return F.cross_entropy(logits, targets, weight=class_weights, label_smoothing=label_smoothing, reduction="sum")


def feature_distill_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
    """Feature-matching loss between two ViTs' CLS features, summed over the batch.

    For every encoder block's output (``hidden_states[1:]``), the CLS token of each model is
    normalized with a parameter-free LayerNorm and the two are compared by mean squared error;
    the per-sample loss is the mean over blocks and channels. MSE on normalized features, not KL
    between softened distributions: CLS features are not probability vectors, and whitened
    feature distillation (Wei et al. 2022, "Contrastive Learning Rivals Masked Image Modeling in
    Fine-tuning via Feature Distillation") normalizes them the same way so the loss does not
    depend on each block's feature scale. Blocks that are frozen in both models contribute 0.

    Args:
        student_hidden: ``hidden_states`` of the trained model, tuple of ``(B, T, D)``.
        teacher_hidden: the frozen starting model's ``hidden_states``, same shapes.

    Returns:
        float32 scalar: sum over the batch of the per-sample loss.
    """
    losses = []
    for student, teacher in zip(student_hidden[1:], teacher_hidden[1:]):
        s = F.layer_norm(student[:, 0].float(), student.shape[-1:])
        t = F.layer_norm(teacher[:, 0].float(), teacher.shape[-1:])
        losses.append((s - t).pow(2).mean(dim=1))
    return torch.stack(losses).mean(dim=0).sum()


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    plan: DevicePlan,
    stop_event: threading.Event | None = None,
    multi_label: bool = False,
    dist_ctx: DistContext | None = None,
    cached: tuple[nn.Module, Any, int] | None = None,
) -> dict[str, float | None] | None:
    """Validation metrics over a loader (no augmentation, eval mode).

    Single-label: mean cross-entropy, accuracy and macro-F1 of the argmax. Multi-label: mean BCE,
    subset accuracy (every label right), micro and macro F1 at threshold 0.5 and mean average
    precision over the labels that have a positive (``sklearn.metrics``).

    In a data-parallel run each process evaluates its shard of the validation images and the
    logits are gathered, so every process computes the same metrics over the whole split.

    ``cached = (suffix, features, batch_size)`` evaluates the trainable suffix on the frozen
    prefix's stored outputs instead of running the whole model on the loader's images (the same
    logits; see :mod:`vitft_app.feature_cache`).

    Returns:
        ``{"loss", "accuracy", "f1_macro", "f1_micro", "map"}`` (the last two None for
        single-label), or None when ``stop_event`` was set during evaluation.
    """
    from sklearn.metrics import average_precision_score, f1_score

    dist_ctx = dist_ctx or DistContext()
    model.eval()
    all_logits, all_targets = [], []
    if cached is not None:
        suffix, features, batch_size = cached
        suffix.eval()
        batches = features.batches(batch_size)
    else:
        batches = loader
    for batch in batches:
        if stop_event is not None and stop_event.is_set() and not dist_ctx.enabled:
            return None
        if batch["labels"].shape[0] == 0:
            continue
        with plan.autocast():
            if cached is not None:
                logits = suffix(batch["features"].to(plan.device, non_blocking=True))
            else:
                logits = model(pixel_values=batch["pixel_values"].to(plan.device, non_blocking=True)).logits
        all_logits.append(logits.float().cpu())
        all_targets.append(batch["labels"])
    if dist_ctx.enabled:
        if dist_ctx.any(stop_event is not None and stop_event.is_set(), plan.device):
            return None
        shards = dist_ctx.gather((all_logits, all_targets))
        all_logits = [t for logits_list, _ in shards for t in logits_list]
        all_targets = [t for _, targets_list in shards for t in targets_list]
    if not all_logits:
        return {"loss": float("nan"), "accuracy": 0.0, "f1_macro": 0.0, "f1_micro": None, "map": None}
    logits, targets = torch.cat(all_logits), torch.cat(all_targets)
    loss = compute_loss(logits, targets, multi_label).item() / len(targets)
    if not multi_label:
        predicted = logits.argmax(-1)
        return {
            "loss": loss,
            "accuracy": (predicted == targets).float().mean().item(),
            "f1_macro": float(f1_score(targets.numpy(), predicted.numpy(), average="macro", zero_division=0)),
            "f1_micro": None,
            "map": None,
        }
    truth = targets.numpy().astype(int)
    scores = torch.sigmoid(logits).numpy()
    predicted = (scores >= 0.5).astype(int)
    has_positive = truth.sum(axis=0) > 0
    mean_ap = float(average_precision_score(truth[:, has_positive], scores[:, has_positive], average="macro")) if has_positive.any() else 0.0
    return {
        "loss": loss,
        "accuracy": float((predicted == truth).all(axis=1).mean()),
        "f1_macro": float(f1_score(truth, predicted, average="macro", zero_division=0)),
        "f1_micro": float(f1_score(truth, predicted, average="micro", zero_division=0)),
        "map": mean_ap,
    }


def supports_feature_cache(model: torch.nn.Module) -> bool:
    """True for ViT-style models (CLS token + transformer blocks), whose frozen prefix
    :mod:`vitft_app.feature_cache` can split off; hierarchical models (PVTv2, MobileViT) cannot be."""
    return has_cls_token(model)


def preflight(config: TrainConfig, device: str | None = None, progress: Progress | None = None) -> DatasetReport:
    """Checks everything that can be checked before a run folder is created, so a run that cannot
    work is refused with a message instead of becoming a "failed" run: the dataset (scanned, or
    read from the scan cache), the precision on the device, the model's config (no weights are
    read), the image size of vit-tiny-scratch and the freeze depth.

    Args:
        config: the run's settings.
        device: force a device (tests use ``"cpu"``).
        progress: ``progress(done, total)`` while the dataset's images are decoded.

    Returns:
        The dataset report (give it to :func:`train` so the run does not scan again).

    Raises:
        FileNotFoundError: the dataset folder (or labels CSV) does not exist.
        DatasetError: the dataset cannot be trained on (the message says what to do).
        ValueError: precision not supported on the device, bad image size, freeze depth too large.
        ModelLoadError: the model cannot be loaded (offline and not cached, unknown id, missing folder).
    """
    from .modeling import summarize_model
    from .scratch import is_scratch_model

    data = Path(config.data_dir).expanduser()
    if not (data.is_dir() or (data.is_file() and data.suffix.lower() == ".csv")):
        kind = "is a file, not a dataset folder or a labels .csv" if data.exists() else "not found"
        raise FileNotFoundError(f"Dataset folder (or labels CSV) {kind}: {config.data_dir}")
    resolve_device_plan(config.precision, device)
    report = prepare_data(config, lambda event: None, progress)
    check_recipe(config, report)
    scratch = is_scratch_model(config.model)
    summary = summarize_model(config.model, report.classes, 0, config.image_size if scratch else None)
    if config.freeze_depth > summary.num_blocks:
        raise ValueError(
            f"freeze_depth must be between 0 and {summary.num_blocks} for this model, got {config.freeze_depth}"
        )
    if config.patch_dropout > 0 and not summary.has_cls_token:
        raise ValueError(
            "patch_dropout needs a model that classifies from a CLS token; this model has none. Set patch_dropout to 0."
        )
    return report


def prepare_data(config: TrainConfig, emit: Emit, progress: Progress | None = None) -> DatasetReport:
    """Scans the dataset (the scan cache makes a repeat cheap) and checks it can be trained on.

    Args:
        config: the run's settings (``data_dir``, ``val_fraction``, ``seed``).
        emit: receives a ``LogMessage`` per skipped file and per warning.
        progress: passed to :func:`~vitft_app.data.scan_dataset`.

    Raises:
        FileNotFoundError: the folder does not exist.
        DatasetError: the dataset cannot be trained on; the message says what to do.
    """
    report = scan_dataset(config.data_dir, val_fraction=config.val_fraction, seed=config.seed, progress=progress)
    return check_trainable(report, emit)


def check_trainable(report: DatasetReport, emit: Emit) -> DatasetReport:
    """Logs skipped files and warnings; raises when the report's dataset cannot be trained on.

    Raises:
        DatasetError: errors in the report.
    """
    for path, reason in report.skipped:
        emit(LogMessage(f"skipped {path}: {reason}"))
    for warning in report.warnings:
        emit(LogMessage(f"warning: {warning}"))
    if not report.ok:
        raise DatasetError(" ".join(report.errors))
    return report


def check_recipe(config: TrainConfig, report: DatasetReport) -> None:
    """Refuses option combinations that have no meaning for this dataset.

    Raises:
        ValueError: MixUp/CutMix or label smoothing on a multi-label dataset (their targets
            are defined for one label per image).
    """
    if report.multi_label:
        conflicts = [name for name in ("mixup", "cutmix", "label_smoothing") if getattr(config, name) > 0]
        if conflicts:
            names = ", ".join(conflicts)
            raise ValueError(
                f"{names} {'applies' if len(conflicts) == 1 else 'apply'} to single-label datasets; this CSV is"
                f" multi-label. Set {names} to 0 (the best preset turns them on: use balanced, or add"
                f" {' '.join('--' + n.replace('_', '-') + ' 0' for n in conflicts)})."
            )


class _OrderBatchSampler(torch.utils.data.Sampler):
    """Yields the micro-batches (lists of indices) it was last given: the loop cuts each epoch's
    order itself (and, on resume, the rest of it; in a data-parallel run this process's share),
    so the order is part of the checkpoint. A micro-batch may be empty (a process with no share
    of an epoch's last batch)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter([list(b) for b in self.batches])

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class _LoopState:
    """The loop's counters; with the module and RNG states they make a checkpoint."""

    epoch: int = 0
    """Index of the epoch in progress (0-based)."""
    position: int = 0
    """Micro-batches of this epoch already done; always at an accumulation-window boundary."""
    order: list[int] | None = None
    """This epoch's sample order (None before the epoch drew it)."""
    step: int = 0
    best_metric: float | None = None
    best_accuracy: float | None = None
    patience_ref: float | None = None
    epochs_without_improvement: int = 0
    nonfinite_in_row: int = 0
    skipped_steps: int = 0
    attention: str | None = None
    """The attention kernel once chosen (a resumed run keeps it rather than timing again)."""
    epoch_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    """Training loss sum, correct count and sample count of the epoch so far."""


@dataclass
class _Logits:
    """Stands in for a model output when the suffix computes the logits from cached features."""

    logits: torch.Tensor


def _silent(event: Any) -> None:
    """The ``emit`` of processes other than rank 0 in a data-parallel run."""


def resume_run(
    run_dir: str | Path,
    emit: Emit,
    stop_event: threading.Event | None = None,
    device: str | None = None,
    checkpoint: dict[str, Any] | None = None,
) -> TrainResult:
    """Continues a stopped, failed or interrupted run from its checkpoint, in the same run folder.

    The config comes from ``run_dir/config.json``; ``metrics.csv`` rows logged after the
    checkpoint's step are dropped, so the curves continue where the checkpoint left them. With
    ``num_workers = 0`` the continuation is exact: the same next-step loss and weights as an
    uninterrupted run with the same seed.

    Args:
        run_dir, emit, stop_event, device: as :func:`train`.
        checkpoint: the checkpoint, when the caller already read it with
            :func:`~vitft_app.checkpoint.load_checkpoint` (None: read here).

    Raises:
        ResumeError: no readable checkpoint.
        DatasetError, FileNotFoundError, ModelLoadError, ValueError: as :func:`train`.
    """
    from .runs import truncate_metrics

    run_dir = Path(run_dir)
    if checkpoint is None:  # the job runner passes the one it read (and checked) before starting
        checkpoint = load_checkpoint(run_dir)
    config = TrainConfig.from_json_file(run_dir / "config.json")
    truncate_metrics(run_dir, checkpoint["loop"]["step"])
    return train(config, run_dir, emit, stop_event=stop_event, device=device, checkpoint=checkpoint)


def train(
    config: TrainConfig,
    run_dir: str | Path,
    emit: Emit,
    stop_event: threading.Event | None = None,
    device: str | None = None,
    report: DatasetReport | None = None,
    checkpoint: dict[str, Any] | None = None,
) -> TrainResult:
    """Fine-tunes a model on a dataset folder and saves the best model to ``run_dir/model``.

    Args:
        config: the run's settings.
        run_dir: the run folder (created by :class:`~vitft_app.runs.RunStore`).
        emit: receives :mod:`~vitft_app.events` in order: ``RunStarted``, then ``StepLogged`` and
            ``EvalDone`` as they happen, then ``RunFinished``. Exceptions propagate; the job runner
            turns them into ``RunFailed``.
        stop_event: when set, the loop exits before the next micro-batch, writes a checkpoint at
            the start of the unfinished accumulation window, and ends with status ``"stopped"``.
        device: force a device (tests use ``"cpu"``); default from the device policy.
        report: the dataset report from :func:`preflight`; scanned here when None.
        checkpoint: a checkpoint from :func:`~vitft_app.checkpoint.load_checkpoint` to continue
            (see :func:`resume_run`).

    Returns:
        A :class:`TrainResult`.

    Raises:
        DatasetError, FileNotFoundError: bad dataset.
        ModelLoadError: the model cannot be loaded.
        ValueError: a setting the device, model or dataset does not support.
        NonFiniteLossError: ``max_nonfinite_steps`` non-finite steps in a row; the best model
            saved so far (never a NaN one) and the last epoch's checkpoint stay on disk.
    """
    t_start = time.perf_counter()
    clock = PhaseClock(t_start)  # the "time:" line of train.log (vitft_app.run_timing)
    stop_event = stop_event or threading.Event()
    run_dir = Path(run_dir)
    dist_ctx = current_context()
    if not dist_ctx.is_main:
        emit = _silent  # only rank 0 reports and writes files
    device = process_device(dist_ctx, device)

    # ---- data -------------------------------------------------------------------------------
    report = prepare_data(config, emit) if report is None else check_trainable(report, emit)
    check_recipe(config, report)
    multi_label = report.multi_label
    num_classes = len(report.classes)

    # ---- model: seeded so the head (and a scratch model) initialize the same way every run,
    # which also rebuilds the distillation teacher exactly on resume -----------------------------
    plan = resolve_device_plan(config.precision, device)
    torch.manual_seed(config.seed)
    loaded = build_model(config.model, report.classes, config.image_size)
    model, processor = loaded.model, loaded.processor
    model.config.problem_type = "multi_label_classification" if multi_label else "single_label_classification"
    patch_size = int(getattr(model.config, "patch_size", 16))
    teacher = None
    if dist_ctx.enabled:
        # Each process augments differently (rank-offset seed); model init above used the same seed.
        torch.manual_seed(config.seed + 1000 * dist_ctx.rank)
    if config.distill_weight > 0:
        # A frozen copy of the starting model; only its features are used, so its head is irrelevant.
        teacher = copy.deepcopy(model).requires_grad_(False).eval().to(plan.device)

    def depth_at(epoch: int) -> int:
        """Gradual unfreezing: one block fewer frozen every ``gradual_unfreeze`` epochs."""
        if config.gradual_unfreeze <= 0:
            return config.freeze_depth
        return max(0, config.freeze_depth - epoch // config.gradual_unfreeze)

    freeze_layers(model, config.freeze_depth)
    model.to(plan.device)
    trainable, total = count_parameters(model)

    out_h, out_w = processor_spec(processor).output_size
    train_draft = (2 * out_w, 2 * out_h) if config.augment != "none" else (out_w, out_h)
    loader_args = dict(
        batch_size=config.batch_size,
        collate_fn=collate_skipping_failures,
        num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,
        pin_memory=plan.device.type == "cuda",
    )
    train_transform = build_transforms(
        processor, True, config.augment, config.crop_scale_min, config.color_jitter, config.random_erasing
    )
    target_classes = num_classes if multi_label else None
    # ---- decode cache: an image that is never randomly augmented is decoded and resized once and
    # kept as uint8 (bit-identical inputs; beyond the memory budget it spills to the run folder).
    # Augmented training decodes every epoch, so random crops keep the full resolution. ---------
    decode_cache = None
    if USE_DECODE_CACHE:
        from .decode_cache import DecodeCache, recipe_from_spec, tensor_transform

        budget = DECODE_CACHE_BUDGET_BYTES if config.num_workers == 0 else 0  # workers share the disk tier
        decode_cache = DecodeCache(run_dir / DECODE_CACHE_DIR, memory_budget_bytes=budget)
        spec = processor_spec(processor)

        def eval_dataset(items: Sequence[Any]) -> torch.utils.data.Dataset:
            from .decode_cache import CachedImageDataset

            return CachedImageDataset(items, decode_cache, recipe_from_spec(spec), tensor_transform(spec), target_classes)
    else:
        def eval_dataset(items: Sequence[Any]) -> torch.utils.data.Dataset:
            return ImageDataset(items, build_transforms(processor, False), (out_w, out_h), target_classes)

    deterministic_train = config.augment == "none" and config.random_erasing == 0
    train_set = eval_dataset(report.train) if deterministic_train else \
        ImageDataset(report.train, train_transform, train_draft, target_classes)
    val_items = report.val[dist_ctx.rank :: dist_ctx.world_size]  # each process evaluates a shard
    val_set = eval_dataset(val_items)
    batch_sampler = _OrderBatchSampler()
    shuffle_gen = torch.Generator().manual_seed(config.seed)  # the same order in every process
    # The loader's own generator seeds its workers, so creating an iterator (at every epoch and
    # on resume) never draws from the global RNG that augmentation uses.
    loader_gen = torch.Generator().manual_seed(config.seed + 1 + dist_ctx.rank)
    batch_args = {k: v for k, v in loader_args.items() if k != "batch_size"}
    train_loader = torch.utils.data.DataLoader(train_set, batch_sampler=batch_sampler, generator=loader_gen,
                                               **batch_args)
    val_loader = torch.utils.data.DataLoader(val_set, shuffle=False, **loader_args)
    # A micro-batch is batch_size images per process: batch_size x world_size in all.
    global_batch = config.batch_size * dist_ctx.world_size
    num_micro = math.ceil(len(train_set) / global_batch)

    # ---- frozen-prefix feature caching: frozen blocks cannot change, so their output on images
    # that are not randomly augmented is computed once. Validation always qualifies (it never
    # augments); training does when nothing random touches its pixels. -------------------------
    stable_depth = USE_FEATURE_CACHE and config.freeze_depth >= 1 and config.gradual_unfreeze == 0 \
        and supports_feature_cache(model)
    cache_val = stable_depth
    cache_train = stable_depth and not dist_ctx.enabled and config.augment == "none" and config.distill_weight == 0 \
        and config.mixup == 0 and config.cutmix == 0 and config.patch_mask_ratio == 0 and config.random_erasing == 0 \
        and config.patch_dropout == 0
    val_cache = train_cache = prefix = suffix = None
    if cache_val:
        from .feature_cache import cache_features, split_frozen_model

        prefix, suffix = split_frozen_model(model, config.freeze_depth)

    # ---- losses and batch-level regularizers -----------------------------------------------------
    class_weights = class_weight_tensor(report, config.class_weights)
    if class_weights is not None:
        class_weights = class_weights.to(plan.device)
    mixer = None if multi_label else create_batch_mixer(config.mixup, config.cutmix, num_classes)

    # ---- optimizer and schedule: stepped once per optimizer step, not per micro-batch ---------
    optimizer = create_optimizer(
        model, config.lr, config.weight_decay, config.optimizer, config.layer_decay,
        include_frozen=config.gradual_unfreeze > 0,
    )
    steps_per_epoch = optimizer_steps_per_epoch(num_micro, config.grad_accum_steps)
    total_steps = steps_per_epoch * config.epochs
    log_every = log_interval(config.log_every_steps, steps_per_epoch)
    scheduler = create_scheduler(optimizer, total_steps, config.warmup_ratio, config.scheduler)
    scaler = torch.amp.GradScaler(plan.device.type) if plan.use_grad_scaler else None
    ema = create_ema(model, config.ema_decay) if config.ema_decay > 0 else None
    window_sizes = _window_sizes(len(train_set), global_batch, config.grad_accum_steps)
    # DDP averages gradients over processes; scaling each process's loss by world_size makes the
    # result the sum, i.e. exactly the gradient of the single-process run with the global batch.
    loss_scale = float(dist_ctx.world_size)

    def wrap(module: nn.Module) -> nn.Module:
        """DDP around the model in a data-parallel run (re-wrapped when the trainable set changes)."""
        if not dist_ctx.enabled:
            return module
        ids = [plan.device.index] if plan.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    # ---- resume: module states, RNG states and counters from the checkpoint -------------------
    state = _LoopState()
    if checkpoint is not None:
        try:  # a checkpoint that does not fit this model and config: one line, not a state_dict dump
            state = _LoopState(**checkpoint["loop"])
            freeze_layers(model, depth_at(state.epoch))
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            if scaler is not None and checkpoint.get("scaler"):
                scaler.load_state_dict(checkpoint["scaler"])
            if ema is not None and checkpoint.get("ema"):
                ema.load_state_dict(checkpoint["ema"])
            restore_rng(checkpoint["rng"], shuffle_gen)
        except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise ResumeError(
                f"The checkpoint of {run_dir.name} does not fit the run's model and settings ({first}); start a new"
                " run."
            ) from None
        if not dist_ctx.is_main:  # the checkpoint holds rank 0's RNG; the others draw afresh
            torch.manual_seed(config.seed + 1000 * dist_ctx.rank + state.step)
    current_depth = depth_at(state.epoch)

    # ---- attention kernel: forced, kept from the checkpoint, or (auto) chosen by timing the first
    # training micro-batches with each kernel in turn (vitft_app.attention.AttentionTrial) -------
    def use_attention(implementation: str) -> None:
        """The kernel for the model and its copies (EMA, distillation teacher)."""
        state.attention = implementation
        for module in (model, teacher, ema.module if ema is not None else None):
            if module is not None:
                set_attention(module, implementation)

    attention_trial = None
    if state.attention is not None and config.attention in ("auto", state.attention):
        use_attention(state.attention)
        attention_reason = f"attention: {state.attention} (chosen when the run started)"
    elif config.attention != "auto":
        use_attention(config.attention)
        attention_reason = f"attention: {config.attention} (as requested)"
    elif cache_train and config.freeze_depth == num_blocks(model):
        attention_reason = (f"attention: {current_attention(model)} (linear probe on cached features: no attention"
                            " runs in training, nothing to time)")
    elif can_switch_attention(model):
        attention_trial = AttentionTrial(model, plan.device)
        attention_reason = (f"attention: auto (the first {len(attention_trial.schedule)} micro-batches alternate"
                            " sdpa and eager; the faster is kept)")
    else:
        attention_reason = f"attention: {current_attention(model)} (this model's kernel cannot be switched)"

    def finish_attention_trial() -> None:
        """Decides the kernel (every process votes, at the same micro-batch) and logs the timings."""
        eager = dist_ctx.any(attention_trial.faster_is_eager(), plan.device)
        use_attention(attention_trial.decide(eager))
        emit(LogMessage(f"attention: {state.attention} kept ({attention_trial.describe()})"))

    # PatchDropout: a hook on the embeddings, active only around the training forward below.
    patch_dropout = PatchDropout(model, config.patch_dropout) if config.patch_dropout > 0 else None
    forward_model = wrap(model)

    def save_state(rng: dict[str, Any]) -> None:
        """Checkpoint with the given RNG snapshot and the current module states and counters."""
        if not dist_ctx.is_main:
            return
        warning = low_space_warning(run_dir, estimate_checkpoint_bytes(run_dir, model), "the checkpoint")
        if warning:
            emit(LogMessage(warning))
        save_checkpoint(
            run_dir,
            {
                "loop": dict(state.__dict__),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "ema": ema.state_dict() if ema is not None else None,
                "rng": rng,
                "config": config.to_dict(),
            },
        )

    notes = loaded.notes + [plan.reason, attention_reason]
    if patch_dropout is not None:
        notes.append(f"PatchDropout: training keeps {1 - config.patch_dropout:.0%} of the patch tokens of each image")
    if config.distill_weight > 0:
        notes.append(f"feature distillation to the starting model, weight {config.distill_weight}")
    emit(
        RunStarted(
            run_id=run_dir.name,
            run_dir=str(run_dir),
            classes=list(report.classes),
            num_train=len(report.train),
            num_val=len(report.val),
            epochs=config.epochs,
            total_steps=total_steps,
            device=plan.device.type,
            precision=plan.precision,
            trainable_params=trainable,
            total_params=total,
            notes=notes,
            resumed_from_step=state.step if checkpoint is not None else None,
            val_baseline=None if multi_label else _baseline_dict(report),
        )
    )
    if checkpoint is not None:
        emit(LogMessage(f"resumed after step {state.step} (epoch {state.epoch + 1})"))
    if dist_ctx.is_main:  # a checkpoint and the saved model: warn now, not at the end of epoch 1
        space = low_space_warning(run_dir, 1.4 * estimate_checkpoint_bytes(run_dir, model), "a checkpoint and the model")
        if space:
            emit(LogMessage(space))

    monitor = "val_map" if multi_label else "val_accuracy"
    stopped, reason = False, ""
    start_step, t_train = state.step, time.perf_counter()
    clock.mark("set-up")
    progress_t, images_done = 0.0, 0  # last StepProgress time; images trained since start_step
    for epoch in range(state.epoch, config.epochs):
        state.epoch = epoch
        # ---- gradual unfreezing: the optimizer already holds every parameter; a frozen one has
        # no gradient, so it is skipped (decay included) until it is unfrozen -----------------
        depth = depth_at(epoch)
        if depth != current_depth:
            freeze_layers(model, depth)
            current_depth = depth
            forward_model = wrap(model)
            emit(LogMessage(f"epoch {epoch + 1}: freeze depth now {depth} ({count_parameters(model)[0]:,} trainable parameters)"))
        trainable_params = [p for p in model.parameters() if p.requires_grad]

        # ---- this epoch's order: drawn once, kept in checkpoints, continued on resume ----------
        if state.order is None:
            state.order = torch.randperm(len(train_set), generator=shuffle_gen).tolist()
            state.position = 0
            state.epoch_sums = [0.0, 0.0, 0.0]
        batch_sampler.batches = [
            state.order[m * global_batch + dist_ctx.rank * config.batch_size :][: config.batch_size]
            for m in range(state.position, num_micro)
        ]
        if cache_train and train_cache is None:
            train_cache = cache_features(prefix, train_set, plan.device, plan.autocast, config.batch_size,
                                         spill_dir=run_dir)
            emit(LogMessage("frozen blocks cached: each epoch now trains only the unfrozen blocks and the head"))
        batches = iter(train_loader) if train_cache is None else iter(map(train_cache.take, list(batch_sampler.batches)))

        forward_model.train()
        # Running sums stay on the device: `.item()` is a sync, only done at the log interval.
        epoch_loss = torch.tensor(state.epoch_sums[0], device=plan.device)
        epoch_correct = torch.tensor(state.epoch_sums[1], device=plan.device)
        epoch_seen = int(state.epoch_sums[2])
        log_loss = torch.zeros((), device=plan.device)
        log_seen, log_t0 = 0, time.perf_counter()
        failed = 0
        window_bad = False
        snapshot: dict[str, Any] = {}
        for micro in range(state.position, num_micro):
            window = micro // config.grad_accum_steps
            if micro % config.grad_accum_steps == 0:
                # Window start: what a Stop checkpoint needs to redo this window exactly.
                snapshot = {
                    "rng": capture_rng(shuffle_gen),
                    "position": micro,
                    "sums": (epoch_loss.clone(), epoch_correct.clone(), epoch_seen),
                }
            # ---- stop: checked every micro-batch, so Stop takes effect within one step (every
            # process must agree, or one would wait forever for the others' gradients) ----------
            if dist_ctx.any(stop_event.is_set(), plan.device):
                stopped = True
                break
            batch = next(batches)
            failed += int(batch["failed"])
            last_in_window = (micro + 1) % config.grad_accum_steps == 0 or micro + 1 == num_micro
            sync = contextlib.nullcontext() if last_in_window or not dist_ctx.enabled else forward_model.no_sync()
            timing = attention_trial is not None and not attention_trial.done
            if timing:
                attention_trial.begin()
            if batch["labels"].numel() == 0 and dist_ctx.enabled:
                # No image for this process in this micro-batch (epoch tail, or every file failed):
                # it still joins the gradient all-reduce, with a zero gradient.
                with sync, plan.autocast():
                    dummy = torch.zeros(1, 3, out_h, out_w, device=plan.device)
                    (forward_model(pixel_values=dummy).logits.float().sum() * 0.0).backward()
            elif batch["labels"].numel() > 0:
                pixels = batch["pixel_values"].to(plan.device, non_blocking=True) if train_cache is None else None
                targets = batch["labels"].to(plan.device, non_blocking=True)
                hard = targets
                # ---- batch regularizers: MixUp/CutMix soft targets, then patch masking -----------
                if mixer is not None:
                    pixels, targets = mixer(pixels, targets)
                if config.patch_mask_ratio > 0:
                    pixels, _ = mask_patches(pixels, patch_size, config.patch_mask_ratio)
                # ---- forward and backward; loss summed then divided by the window's sample
                # count, so K accumulated micro-batches give exactly the gradient of one batch of
                # K x batch_size (and a short last window is a per-sample mean too) ------------
                with sync:
                    with plan.autocast():
                        if train_cache is not None:
                            out = _Logits(suffix(batch["features"].to(plan.device, non_blocking=True)))
                        else:
                            with patch_dropout.applied() if patch_dropout else contextlib.nullcontext():
                                out = forward_model(pixel_values=pixels, output_hidden_states=teacher is not None)
                        loss_sum = compute_loss(out.logits, targets, multi_label, class_weights, config.label_smoothing)
                        if teacher is not None:
                            with torch.no_grad():
                                teacher_out = teacher(pixel_values=pixels, output_hidden_states=True)
                            loss_sum = loss_sum + config.distill_weight * feature_distill_loss(
                                out.hidden_states, teacher_out.hidden_states
                            )
                    # ---- non-finite guard: a NaN/inf loss never reaches the weights or the plots
                    # (in a data-parallel run it is back-propagated so every process joins the
                    # all-reduce, and the step is skipped everywhere below) --------------------
                    finite = bool(torch.isfinite(loss_sum).item())
                    if not finite:
                        window_bad = True
                    if finite or dist_ctx.enabled:
                        loss = loss_sum * loss_scale / window_sizes[window]
                        (scaler.scale(loss) if scaler else loss).backward()
                if finite:
                    detached = loss_sum.detach()
                    epoch_loss += detached
                    log_loss += detached
                    logits = out.logits.detach()
                    if multi_label:
                        epoch_correct += ((logits > 0) == (hard > 0.5)).all(dim=1).sum()
                    else:
                        epoch_correct += (logits.argmax(-1) == hard).sum()
                    epoch_seen += hard.shape[0]
                    log_seen += hard.shape[0]
            # Only full micro-batches are compared (an epoch's short last one would favour its kernel).
            if timing and attention_trial.end(valid=batch["labels"].shape[0] == config.batch_size):
                finish_attention_trial()
            if not last_in_window:
                continue
            # ---- clip, step (unless non-finite), EMA, schedule ----------------------------------
            skip = dist_ctx.any(window_bad, plan.device)
            if not skip:
                if scaler:
                    scaler.unscale_(optimizer)
                max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable_params, max_norm)
                # With fp16 the scaler skips inf gradients itself (that is how it finds its scale).
                skip = scaler is None and not torch.isfinite(grad_norm).item()
            if skip:
                state.nonfinite_in_row += 1
                state.skipped_steps += 1
                emit(LogMessage(f"step {state.step + 1}: non-finite loss or gradient, optimizer step skipped"))
            else:
                state.nonfinite_in_row = 0
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                if ema is not None:
                    ema.update_parameters(model)
            # The schedule advances on a skipped step too, so it still ends at total_steps.
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window_bad = False
            state.step += 1
            if state.nonfinite_in_row >= config.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"The loss was NaN or infinite for {state.nonfinite_in_row} optimizer steps in a row (at step"
                    f" {state.step}); the run stopped. The best model saved so far is kept. Try a lower learning"
                    " rate, precision fp32, or max_grad_norm 1."
                )
            # ---- progress: the live view moves at every step (at most once a second) -----------
            images_done += window_sizes[window]  # images in this window, over every process
            now = time.perf_counter()
            if now - progress_t >= PROGRESS_INTERVAL_S or state.step == total_steps:
                progress_t = now
                done = state.step - start_step
                emit(StepProgress(step=state.step, epoch=epoch + (micro + 1) / num_micro,
                                  images_per_sec=images_done / max(now - t_train, 1e-9),
                                  eta_s=(now - t_train) / max(done, 1) * (total_steps - state.step)))
            # ---- log: the first step of a (resumed) run too, so the loss plot has a point at once
            if state.step % log_every == 0 or state.step == total_steps or state.step == start_step + 1:
                # Per-sample mean over every process's samples since the last log.
                totals = dist_ctx.sum(torch.stack([log_loss.double(), torch.tensor(float(log_seen), device=plan.device).double()]))
                loss_total, seen_total = float(totals[0]), float(totals[1])
            else:
                seen_total = 0.0
            if seen_total > 0:
                now = time.perf_counter()
                done = state.step - start_step
                emit(
                    StepLogged(
                        step=state.step,
                        epoch=epoch + (micro + 1) / num_micro,
                        loss=loss_total / seen_total,
                        lr=scheduler.get_last_lr()[-1],
                        images_per_sec=seen_total / max(now - log_t0, 1e-9),
                        eta_s=(now - t_train) / max(done, 1) * (total_steps - state.step),
                    )
                )
                log_loss.zero_()
                log_seen, log_t0 = 0, time.perf_counter()
        clock.mark_training()
        if failed:
            emit(LogMessage(f"epoch {epoch + 1}: {failed} image(s) failed to load and were skipped"))
        if not stopped and attention_trial is not None and not attention_trial.done:
            finish_attention_trial()  # an epoch shorter than the trial: decide with what was timed
        if stopped:
            # ---- checkpoint at the start of the unfinished window (its partial gradients are
            # dropped; resume redoes it with the same data, augmentation and RNG) --------------
            state.position = snapshot["position"]
            loss_s, correct_s, seen_s = snapshot["sums"]
            state.epoch_sums = [loss_s.item(), correct_s.item(), float(seen_s)]
            save_state(snapshot["rng"])
            break

        # ---- evaluate (the EMA weights when on), keep the best model -------------------------------
        state.position = num_micro
        sums = dist_ctx.sum(torch.stack([epoch_loss.double(), epoch_correct.double(),
                                         torch.tensor(float(epoch_seen), device=plan.device).double()]))
        state.epoch_sums = [float(v) for v in sums]
        scored = ema.module if ema is not None else model
        evaluated = None
        if cache_val:
            if val_cache is None:
                val_cache = cache_features(prefix, val_set, plan.device, plan.autocast, config.batch_size,
                                           spill_dir=run_dir)
            evaluated = (split_frozen_model(scored, config.freeze_depth)[1] if ema is not None else suffix,
                         val_cache, config.batch_size)
        # forward only: with attention=auto, SDPA (vitft_app.attention.evaluation_attention)
        with evaluation_attention(scored) if config.attention == "auto" else contextlib.nullcontext():
            result = evaluate(scored, val_loader, plan, stop_event, multi_label, dist_ctx, evaluated)
        clock.mark("validation")
        if result is None:
            stopped = True
            save_state(capture_rng(shuffle_gen))  # trained, not evaluated: resume evaluates first
            break
        value = result["map"] if multi_label else result["accuracy"]
        is_best = state.best_metric is None or value > state.best_metric
        if is_best:
            if not all(torch.isfinite(p).all() for p in scored.parameters()):
                raise NonFiniteLossError(
                    "The weights became NaN or infinite; the run stopped and the best model saved so far is kept."
                    " Try a lower learning rate or precision fp32."
                )
            state.best_metric, state.best_accuracy = value, result["accuracy"]
            if dist_ctx.is_main:
                save_model_atomically(scored, processor, run_dir / "model")
                clock.mark("saving best model")
        # ---- early stopping: an improvement must beat the reference by min_delta -----------------
        if state.patience_ref is None or value > state.patience_ref + config.early_stopping_min_delta:
            state.patience_ref, state.epochs_without_improvement = value, 0
        else:
            state.epochs_without_improvement += 1
        emit(
            EvalDone(
                step=state.step,
                epoch=epoch + 1,
                train_loss=state.epoch_sums[0] / max(state.epoch_sums[2], 1),
                train_accuracy=state.epoch_sums[1] / max(state.epoch_sums[2], 1),
                val_loss=result["loss"],
                val_accuracy=result["accuracy"],
                best_val_accuracy=state.best_accuracy,
                is_best=is_best,
                val_f1_macro=result["f1_macro"],
                val_f1_micro=result["f1_micro"],
                val_map=result["map"],
                monitor=monitor,
                best_metric=state.best_metric,
                epochs_without_improvement=state.epochs_without_improvement,
                early_stopping_patience=config.early_stopping_patience,
            )
        )
        # ---- checkpoint: the next epoch starts from here ------------------------------------------
        state.epoch, state.position, state.order = epoch + 1, 0, None
        state.epoch_sums = [0.0, 0.0, 0.0]
        clock.mark("other")
        save_state(capture_rng(shuffle_gen))
        clock.mark("checkpoints")
        if 0 < config.early_stopping_patience <= state.epochs_without_improvement and epoch + 1 < config.epochs:
            reason = (
                f"early stopping at epoch {epoch + 1}: no {monitor} improvement > {config.early_stopping_min_delta:g}"
                f" for {state.epochs_without_improvement} epochs"
            )
            emit(LogMessage(reason))
            break
        if dist_ctx.any(stop_event.is_set(), plan.device) and epoch + 1 < config.epochs:
            stopped = True
            break

    status = "stopped" if stopped else "completed"
    if status == "completed" and dist_ctx.is_main:
        remove_checkpoint(run_dir)
    if decode_cache is not None:
        decode_cache.clear()
        shutil.rmtree(run_dir / DECODE_CACHE_DIR, ignore_errors=True)
    dist_ctx.barrier()
    clock.mark("other")
    emit(LogMessage(clock.describe()))
    duration = time.perf_counter() - t_start
    emit(RunFinished(status=status, best_val_accuracy=state.best_accuracy, duration_s=duration, reason=reason,
                     step=state.step, monitor=monitor, best_metric=state.best_metric))
    return TrainResult(status, state.best_accuracy, state.step, duration, reason)
