"""The training loop. It reads top to bottom in stages: data, model, optimizer and schedule,
then per step forward/backward with accumulation, clip, step, log; per epoch evaluate, save the
best model, check Stop. It reports only through ``emit(event)`` and knows nothing of Gradio."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import get_cosine_schedule_with_warmup
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
from transformers.trainer_pt_utils import get_parameter_names

from .config import TrainConfig
from .data import DatasetReport, ImageDataset, build_transforms, collate_skipping_failures, processor_spec, scan_dataset
from .device import DevicePlan, resolve_device_plan
from .events import Emit, EvalDone, LogMessage, RunFinished, RunStarted, StepLogged
from .filecheck import Progress
from .modeling import build_model, count_parameters, freeze_layers
from .runs import save_model_atomically


class DatasetError(ValueError):
    """The dataset cannot be trained on (fewer than 2 classes, no validation images, ...)."""


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        status: ``"completed"`` or ``"stopped"``.
        best_val_accuracy: best validation accuracy (0..1), or None when no epoch finished.
        steps: optimizer steps taken.
        duration_s: wall time of the whole call, seconds.
    """

    status: str
    best_val_accuracy: float | None
    steps: int
    duration_s: float


def create_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.999, eps 1e-8) over the trainable parameters only.

    Biases and LayerNorm weights get no weight decay, the rule of the transformers ``Trainer``
    (``get_parameter_names(model, ALL_LAYERNORM_LAYERS)``). Frozen parameters
    (``requires_grad=False``) are not given to the optimizer at all, so weight decay cannot move
    them.
    """
    decay_names = {n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if not n.endswith("bias")}
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if n in decay_names], "weight_decay": weight_decay},
        {"params": [p for n, p in params if n not in decay_names], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8)


def optimizer_steps_per_epoch(num_micro_batches: int, grad_accum_steps: int) -> int:
    """Optimizer steps in one epoch: ``ceil(micro-batches / grad_accum_steps)``.

    The leftover micro-batches at the end of an epoch (fewer than ``grad_accum_steps``) still make
    one optimizer step, with the loss averaged over the samples they actually hold, so no image is
    dropped and the scheduler's total equals the steps really taken.
    """
    return math.ceil(num_micro_batches / grad_accum_steps)


def create_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float) -> Any:
    """Linear warmup over ``ceil(warmup_ratio * total_steps)`` optimizer steps, then cosine decay
    to 0, as ``transformers.get_cosine_schedule_with_warmup`` (the Trainer's warmup rounding)."""
    warmup = math.ceil(warmup_ratio * total_steps)
    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _window_sizes(num_samples: int, batch_size: int, grad_accum_steps: int) -> list[int]:
    """Samples per accumulation window of one epoch (the divisor of the per-sample mean loss)."""
    micro = [min(batch_size, num_samples - i) for i in range(0, num_samples, batch_size)]
    return [sum(micro[i : i + grad_accum_steps]) for i in range(0, len(micro), grad_accum_steps)]


@torch.inference_mode()
def evaluate(
    model: nn.Module, loader: torch.utils.data.DataLoader, plan: DevicePlan, stop_event: threading.Event | None = None
) -> tuple[float, float] | None:
    """Mean cross-entropy and accuracy over a loader (no augmentation, eval mode).

    Returns:
        ``(loss, accuracy)``, or None when ``stop_event`` was set during evaluation.
    """
    model.eval()
    loss_sum = torch.zeros((), device=plan.device)
    correct = torch.zeros((), device=plan.device, dtype=torch.long)
    seen = 0
    for batch in loader:
        if stop_event is not None and stop_event.is_set():
            return None
        if batch["labels"].numel() == 0:
            continue
        pixels = batch["pixel_values"].to(plan.device, non_blocking=True)
        labels = batch["labels"].to(plan.device, non_blocking=True)
        with plan.autocast():
            logits = model(pixel_values=pixels).logits
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(-1) == labels).sum()
        seen += labels.numel()
    if seen == 0:
        return float("nan"), 0.0
    return loss_sum.item() / seen, correct.item() / seen


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
    from .config import SCRATCH_MODEL
    from .modeling import summarize_model

    data = Path(config.data_dir).expanduser()
    if not (data.is_dir() or (data.is_file() and data.suffix.lower() == ".csv")):
        kind = "is a file, not a dataset folder or a labels .csv" if data.exists() else "not found"
        raise FileNotFoundError(f"Dataset folder (or labels CSV) {kind}: {config.data_dir}")
    resolve_device_plan(config.precision, device)
    report = prepare_data(config, lambda event: None, progress)
    scratch = config.model == SCRATCH_MODEL
    summary = summarize_model(config.model, report.classes, 0, config.image_size if scratch else None)
    if config.freeze_depth > summary.num_blocks:
        raise ValueError(
            f"freeze_depth must be between 0 and {summary.num_blocks} for this model, got {config.freeze_depth}"
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
        DatasetError: errors in the report, or a multi-label dataset.
    """
    for path, reason in report.skipped:
        emit(LogMessage(f"skipped {path}: {reason}"))
    for warning in report.warnings:
        emit(LogMessage(f"warning: {warning}"))
    if not report.ok:
        raise DatasetError(" ".join(report.errors))
    if report.multi_label:
        raise DatasetError(
            "This CSV is multi-label (label cells hold several labels separated by ';' or '|'). This version"
            " trains single-label classifiers only; give each image one label, or wait for multi-label training"
            " (sigmoid head, BCE loss)."
        )
    return report


def train(
    config: TrainConfig,
    run_dir: str | Path,
    emit: Emit,
    stop_event: threading.Event | None = None,
    device: str | None = None,
    report: DatasetReport | None = None,
) -> TrainResult:
    """Fine-tunes a model on a dataset folder and saves the best model to ``run_dir/model``.

    Args:
        config: the run's settings.
        run_dir: the run folder (created by :class:`~vitft_app.runs.RunStore`).
        emit: receives :mod:`~vitft_app.events` in order: ``RunStarted``, then ``StepLogged`` and
            ``EvalDone`` as they happen, then ``RunFinished``. Exceptions propagate; the job runner
            turns them into ``RunFailed``.
        stop_event: when set, the loop exits before the next micro-batch; status ``"stopped"``.
        device: force a device (tests use ``"cpu"``); default from the device policy.
        report: the dataset report from :func:`preflight`; scanned here when None.

    Returns:
        A :class:`TrainResult`.

    Raises:
        DatasetError, FileNotFoundError: bad dataset.
        ModelLoadError: the model cannot be loaded.
        ValueError: a setting the device or model does not support.
    """
    t_start = time.perf_counter()
    stop_event = stop_event or threading.Event()
    run_dir = Path(run_dir)

    # ---- data -------------------------------------------------------------------------------
    report = prepare_data(config, emit) if report is None else check_trainable(report, emit)

    # ---- model: seeded so the head (and a scratch model) initialize the same way every run ----
    plan = resolve_device_plan(config.precision, device)
    torch.manual_seed(config.seed)
    loaded = build_model(config.model, report.classes, config.image_size)
    model, processor = loaded.model, loaded.processor
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
    train_set = ImageDataset(report.train, build_transforms(processor, True, config.augment), train_draft)
    val_set = ImageDataset(report.val, build_transforms(processor, False), (out_w, out_h))
    shuffle_gen = torch.Generator().manual_seed(config.seed)
    train_loader = torch.utils.data.DataLoader(train_set, shuffle=True, generator=shuffle_gen, **loader_args)
    val_loader = torch.utils.data.DataLoader(val_set, shuffle=False, **loader_args)

    # ---- optimizer and schedule: stepped once per optimizer step, not per micro-batch ---------
    optimizer = create_optimizer(model, config.lr, config.weight_decay)
    steps_per_epoch = optimizer_steps_per_epoch(len(train_loader), config.grad_accum_steps)
    total_steps = steps_per_epoch * config.epochs
    scheduler = create_scheduler(optimizer, total_steps, config.warmup_ratio)
    scaler = torch.amp.GradScaler(plan.device.type) if plan.use_grad_scaler else None
    window_sizes = _window_sizes(len(train_set), config.batch_size, config.grad_accum_steps)
    trainable_params = [p for p in model.parameters() if p.requires_grad]

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
            notes=loaded.notes + [plan.reason],
        )
    )

    step = 0
    best_acc: float | None = None
    stopped = False
    t_train = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        # Running sums stay on the device: `.item()` is a sync, only done at the log interval.
        epoch_loss = torch.zeros((), device=plan.device)
        epoch_correct = torch.zeros((), device=plan.device, dtype=torch.long)
        epoch_seen = 0
        log_loss = torch.zeros((), device=plan.device)
        log_seen, log_t0 = 0, time.perf_counter()
        failed = 0
        for micro, batch in enumerate(train_loader):
            # ---- stop: checked every micro-batch, so Stop takes effect within one step ---------
            if stop_event.is_set():
                stopped = True
                break
            failed += int(batch["failed"])
            window = micro // config.grad_accum_steps
            last_in_window = (micro + 1) % config.grad_accum_steps == 0 or micro + 1 == len(train_loader)
            if batch["labels"].numel() > 0:
                pixels = batch["pixel_values"].to(plan.device, non_blocking=True)
                labels = batch["labels"].to(plan.device, non_blocking=True)
                # ---- forward and backward; loss summed then divided by the window's sample
                # count, so K accumulated micro-batches give exactly the gradient of one batch of
                # K x batch_size (and a short last window is a per-sample mean too) ------------
                with plan.autocast():
                    logits = model(pixel_values=pixels).logits
                loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
                loss = loss_sum / window_sizes[window]
                (scaler.scale(loss) if scaler else loss).backward()
                detached = loss_sum.detach()
                epoch_loss += detached
                log_loss += detached
                epoch_correct += (logits.detach().argmax(-1) == labels).sum()
                epoch_seen += labels.numel()
                log_seen += labels.numel()
            if not last_in_window:
                continue
            # ---- clip, step, schedule -------------------------------------------------------
            if scaler:
                scaler.unscale_(optimizer)
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable_params, config.max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            # ---- log ---------------------------------------------------------------------------
            if step % config.log_every_steps == 0 or step == total_steps:
                now = time.perf_counter()
                elapsed = now - t_train
                emit(
                    StepLogged(
                        step=step,
                        epoch=epoch + (micro + 1) / len(train_loader),
                        loss=log_loss.item() / max(log_seen, 1),
                        lr=scheduler.get_last_lr()[0],
                        images_per_sec=log_seen / max(now - log_t0, 1e-9),
                        eta_s=elapsed / step * (total_steps - step),
                    )
                )
                log_loss.zero_()
                log_seen, log_t0 = 0, time.perf_counter()
        if failed:
            emit(LogMessage(f"epoch {epoch + 1}: {failed} image(s) failed to load and were skipped"))
        if stopped:
            break

        # ---- evaluate, keep the best model ------------------------------------------------------
        result = evaluate(model, val_loader, plan, stop_event)
        if result is None:
            stopped = True
            break
        val_loss, val_acc = result
        is_best = best_acc is None or val_acc > best_acc
        if is_best:
            best_acc = val_acc
            save_model_atomically(model, processor, run_dir / "model")
        emit(
            EvalDone(
                step=step,
                epoch=epoch + 1,
                train_loss=epoch_loss.item() / max(epoch_seen, 1),
                train_accuracy=epoch_correct.item() / max(epoch_seen, 1),
                val_loss=val_loss,
                val_accuracy=val_acc,
                best_val_accuracy=best_acc,
                is_best=is_best,
            )
        )
        if stop_event.is_set() and epoch + 1 < config.epochs:
            stopped = True
            break

    status = "stopped" if stopped else "completed"
    duration = time.perf_counter() - t_start
    emit(RunFinished(status=status, best_val_accuracy=best_acc, duration_s=duration))
    return TrainResult(status, best_acc, step, duration)
