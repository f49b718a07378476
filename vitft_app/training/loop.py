"""The training loop. :func:`train` reads top to bottom in stages: setup (:mod:`.setup`), then per
epoch :func:`train_one_epoch` (one accumulation window = one block: forward, non-finite guard,
backward for each micro-batch, then clip and step), :func:`~vitft_app.training.evaluate`, save the
best model, early stopping, checkpoint, Stop. It reports only through ``emit(event)`` and knows
nothing of Gradio."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..attention import evaluation_attention
from ..augment import mask_patches
from ..baseline import majority_baseline
from ..checkpoint import capture_rng, estimate_checkpoint_bytes, load_checkpoint, low_space_warning, remove_checkpoint
from ..config import TrainConfig
from ..data import DatasetReport
from ..distributed import current_context, process_device
from ..events import Emit, EvalDone, LogMessage, RunFinished, RunStarted, StepLogged, StepProgress
from ..modeling import count_parameters
from ..lora import save_best_model
from ..run_timing import PhaseClock
from ..runs import kept_model_note
from .checks import DatasetError
from .evaluation import evaluate
from .losses import compute_loss
from .options import DECODE_CACHE_DIR, EngineOptions
from .setup import LoopContext, setup_run
from .state import NonFiniteLossError, TrainResult


@dataclass
class _Logits:
    """Stands in for a model output when the suffix computes the logits from cached features."""

    logits: torch.Tensor


def _silent(event: Any) -> None:
    """The ``emit`` of processes other than rank 0 in a data-parallel run."""


class _Sums:
    """Running sums of an epoch and of the current log interval. They stay on the device: adding
    to them never syncs; they are read at the log interval and at the end of the epoch."""

    def __init__(self, epoch_sums: list[float], device: torch.device) -> None:
        self.loss = torch.tensor(epoch_sums[0], device=device)
        self.correct = torch.tensor(epoch_sums[1], device=device)
        self.seen = torch.tensor(int(epoch_sums[2]), device=device)
        self.log_loss = torch.zeros((), device=device)
        self.log_seen = torch.zeros((), dtype=torch.long, device=device)
        self.log_t0 = time.perf_counter()

    def add(self, finite: torch.Tensor, loss_sum: torch.Tensor, logits: torch.Tensor, hard: torch.Tensor,
            multi_label: bool) -> None:
        """Adds a micro-batch whose loss was finite (``finite`` is a device bool: a non-finite one
        adds nothing, without a host sync)."""
        if multi_label:
            correct = ((logits > 0) == (hard > 0.5)).all(dim=1).sum()
        else:
            correct = (logits.argmax(-1) == hard).sum()
        loss = torch.where(finite, loss_sum, 0.0)
        count = torch.where(finite, hard.shape[0], 0)
        self.loss += loss
        self.log_loss += loss
        self.correct += torch.where(finite, correct, 0)
        self.seen += count
        self.log_seen += count

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copies of the epoch sums (a Stop checkpoint restores them)."""
        return self.loss.clone(), self.correct.clone(), self.seen.clone()


def _micro_batch(loop: LoopContext, batch: dict[str, torch.Tensor], window_size: int, last_in_window: bool,
                 features: Any, sums: _Sums) -> torch.Tensor | None:
    """Forward, non-finite guard and backward of one micro-batch.

    The loss is summed over the batch and divided by the window's sample count, so K accumulated
    micro-batches give exactly the gradient of one batch of K x batch_size (and a short last
    window is a per-sample mean too). In a data-parallel run the gradients are all-reduced only at
    the window's last micro-batch (``no_sync`` before it).

    Returns:
        A device bool, True when the loss was not finite (no host sync), or None for a
        micro-batch without images.
    """
    config, dist = loop.config, loop.dist
    sync = contextlib.nullcontext() if last_in_window or not dist.enabled else loop.forward_model.no_sync()
    if batch["labels"].numel() == 0:
        if dist.enabled:
            # No image for this process in this micro-batch (epoch tail, or every file failed): it
            # still joins the gradient all-reduce, with a zero gradient.
            with sync, loop.plan.device.autocast():
                dummy = torch.zeros(1, 3, *loop.data.input_size, device=loop.device)
                (loop.forward_model(pixel_values=dummy).logits.float().sum() * 0.0).backward()
        return None
    pixels = batch["pixel_values"].to(loop.device, non_blocking=True) if features is None else None
    targets = hard = batch["labels"].to(loop.device, non_blocking=True)
    # ---- batch regularizers: MixUp/CutMix soft targets, then patch masking ---------------------
    if loop.mixer is not None:
        pixels, targets = loop.mixer(pixels, targets)
    if config.patch_mask_ratio > 0:
        pixels, _ = mask_patches(pixels, loop.patch_size, config.patch_mask_ratio)
    with sync:
        # ---- forward: the trainable suffix on cached features, or the whole model ----------------
        with loop.plan.device.autocast():
            if features is not None:
                out = _Logits(loop.features.suffix(batch["features"].to(loop.device, non_blocking=True)))
            else:
                with contextlib.ExitStack() as stack:
                    for part in loop.parts:
                        stack.enter_context(part.forward_context())
                    out = loop.forward_model(pixel_values=pixels, output_hidden_states=loop.needs_hidden_states)
            loss_sum = compute_loss(out.logits, targets, loop.plan.multi_label, loop.class_weights,
                                    config.label_smoothing)
            for part in loop.parts:
                extra = part.extra_loss(pixels, out)
                if extra is not None:
                    loss_sum = loss_sum + extra
        # ---- non-finite guard, on the device: a NaN/inf loss is back-propagated (so every process
        # joins the all-reduce) but its window's step is skipped, and it never reaches the sums ----
        finite = torch.isfinite(loss_sum)
        loss = loss_sum * float(dist.world_size) / window_size  # x world_size: DDP averages, we want the sum
        (loop.scaler.scale(loss) if loop.scaler else loss).backward()
    sums.add(finite, loss_sum.detach(), out.logits.detach(), hard, loop.plan.multi_label)
    return ~finite


def _optimizer_step(loop: LoopContext, nonfinite: torch.Tensor, trainable: list[torch.nn.Parameter]) -> None:
    """Clip and step, unless a loss or the gradient norm of the window was not finite; EMA;
    schedule. The skip decision is the one host sync of an optimizer step.

    Raises:
        NonFiniteLossError: ``max_nonfinite_steps`` skipped steps in a row.
    """
    config, state, scaler = loop.config, loop.state, loop.scaler
    max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
    if scaler is None:
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
        skip = loop.any_process(nonfinite | ~torch.isfinite(grad_norm))
    else:  # fp16: the scaler skips inf gradients itself (that is how it finds its scale)
        skip = loop.any_process(nonfinite)
        if not skip:
            scaler.unscale_(loop.optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, max_norm)
    if skip:
        state.nonfinite_in_row += 1
        state.skipped_steps += 1
        loop.emit(LogMessage(f"step {state.step + 1}: non-finite loss or gradient, optimizer step skipped"))
    else:
        state.nonfinite_in_row = 0
        if scaler:
            scaler.step(loop.optimizer)
            scaler.update()
        else:
            loop.optimizer.step()
        for part in loop.parts:
            part.on_step_end(loop)
    loop.scheduler.step()  # on a skipped step too, so the schedule still ends at total_steps
    loop.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    if state.nonfinite_in_row >= config.max_nonfinite_steps:
        raise NonFiniteLossError(
            f"The loss was NaN or infinite for {state.nonfinite_in_row} optimizer steps in a row (at step"
            f" {state.step}); the run stopped: {kept_model_note(loop.run_dir)}. Try a lower learning"
            " rate, precision fp32, or max_grad_norm 1."
        )


def _report_step(loop: LoopContext, epoch_progress: float, window_size: int, sums: _Sums) -> None:
    """StepProgress (at most every ``progress_interval_s``) and, at the log interval, StepLogged
    with the per-sample mean loss over every process's samples since the last log (the first step
    of a (resumed) run too, so the loss plot has a point at once)."""
    state, total = loop.state, loop.total_steps
    loop.images_done += window_size  # images in this window, over every process
    now = time.perf_counter()
    eta_s = (now - loop.t_train) / max(state.step - loop.start_step, 1) * (total - state.step)
    if now - loop.progress_t >= loop.options.progress_interval_s or state.step == total:
        loop.progress_t = now
        loop.emit(StepProgress(step=state.step, epoch=epoch_progress,
                               images_per_sec=loop.images_done / max(now - loop.t_train, 1e-9), eta_s=eta_s))
    if not (state.step % loop.log_every == 0 or state.step == total or state.step == loop.start_step + 1):
        return
    totals = loop.dist.sum(torch.stack([sums.log_loss.double(), sums.log_seen.double()]))
    loss_total, seen_total = float(totals[0]), float(totals[1])
    if seen_total > 0:
        now = time.perf_counter()
        loop.emit(StepLogged(step=state.step, epoch=epoch_progress, loss=loss_total / seen_total,
                             lr=loop.scheduler.get_last_lr()[-1],
                             images_per_sec=seen_total / max(now - sums.log_t0, 1e-9),
                             eta_s=(now - loop.t_train) / max(state.step - loop.start_step, 1) * (total - state.step)))
        sums.log_loss.zero_()
        sums.log_seen.zero_()
        sums.log_t0 = time.perf_counter()


def _epoch_batches(loop: LoopContext) -> Iterator[dict[str, torch.Tensor]]:
    """This epoch's micro-batches (from ``state.position``): the loader's, or the cached features'."""
    features = loop.train_features()
    if features is None:
        return iter(loop.data.train_loader)
    return iter(map(features.take, list(loop.data.batch_sampler.batches)))


def train_one_epoch(loop: LoopContext, epoch: int) -> bool:
    """Trains the rest of one epoch (from ``state.position``), an accumulation window at a time.

    Returns:
        True when Stop ended it: the checkpoint is then at the start of the unfinished window
        (its partial gradients are dropped; resume redoes it with the same data, augmentation
        and RNG).
    """
    config, state, data, dist = loop.config, loop.state, loop.data, loop.dist
    data.set_epoch(state, config.batch_size, dist.rank)
    batches = _epoch_batches(loop)
    features = loop.features.train if loop.features is not None else None
    trainable = [p for p in loop.model.parameters() if p.requires_grad]
    loop.forward_model.train()
    sums = _Sums(state.epoch_sums, loop.device)
    failed, loaded, stopped = 0, 0, False
    for first in range(state.position, data.num_micro, config.grad_accum_steps):
        last = min(first + config.grad_accum_steps, data.num_micro)
        window_size = data.window_sizes[first // config.grad_accum_steps]
        # Window start: what a Stop checkpoint needs to redo this window exactly.
        snapshot = (capture_rng(data.shuffle_gen), first, sums.snapshot())
        # ---- one accumulation window: forward, guard, backward per micro-batch; then clip, step ----
        nonfinite = torch.zeros((), dtype=torch.bool, device=loop.device)
        for micro in range(first, last):
            # Stop is checked every micro-batch, so it takes effect within one step (every process
            # must agree, or one would wait forever for the others' gradients).
            if dist.any(loop.stop_event.is_set(), loop.device):
                stopped = True
                break
            batch = next(batches)
            failed += int(batch["failed"])
            loaded += len(batch["labels"])
            for part in loop.parts:
                part.before_micro_batch(loop)
            bad = _micro_batch(loop, batch, window_size, micro + 1 == last, features, sums)
            if bad is not None:
                nonfinite |= bad
            for part in loop.parts:
                part.after_micro_batch(loop, batch)
        if stopped:
            break
        _optimizer_step(loop, nonfinite, trainable)
        _report_step(loop, epoch + last / data.num_micro, window_size, sums)
    if failed and not loaded:  # nothing trained: the images are gone (folder moved, deleted, unmounted)
        raise DatasetError(f"None of the {failed} images read in epoch {epoch + 1} could be loaded: was the dataset"
                           f" folder {config.data_dir} moved or deleted? Put the images back and resume the run"
                           " from its last checkpoint.")
    if failed:
        loop.emit(LogMessage(f"epoch {epoch + 1}: {failed} image(s) failed to load and were skipped"))
    for part in loop.parts:
        part.on_epoch_end(loop, stopped)
    if stopped:
        rng, state.position, (loss_s, correct_s, seen_s) = snapshot
        state.epoch_sums = [loss_s.item(), correct_s.item(), float(seen_s)]
        loop.save_checkpoint(rng)
        return True
    state.position = data.num_micro
    epoch_sums = dist.sum(torch.stack([sums.loss.double(), sums.correct.double(), sums.seen.double()]))
    state.epoch_sums = [float(v) for v in epoch_sums]
    return False


def _keep_best(loop: LoopContext, result: dict[str, Any], epoch: int) -> None:
    """Saves the model when the epoch is the best so far, counts epochs without improvement (an
    improvement must beat the reference by ``early_stopping_min_delta``), emits EvalDone.

    Raises:
        NonFiniteLossError: the best model's weights are not finite (never saved).
    """
    state, config, multi_label = loop.state, loop.config, loop.plan.multi_label
    value = result["map"] if multi_label else result["accuracy"]
    is_best = state.best_metric is None or value > state.best_metric
    if is_best:
        scored = loop.scored_model
        if not all(torch.isfinite(p).all() for p in scored.parameters()):
            raise NonFiniteLossError(
                f"The weights became NaN or infinite; the run stopped: {kept_model_note(loop.run_dir)}."
                " Try a lower learning rate or precision fp32."
            )
        state.best_metric, state.best_accuracy = value, result["accuracy"]
        if loop.dist.is_main:
            save_best_model(scored, loop.loaded.processor, loop.run_dir, loop.lora)  # LoRA: merged model + adapter
    if state.patience_ref is None or value > state.patience_ref + config.early_stopping_min_delta:
        state.patience_ref, state.epochs_without_improvement = value, 0
    else:
        state.epochs_without_improvement += 1
    seen = max(state.epoch_sums[2], 1)
    loop.emit(EvalDone(
        step=state.step, epoch=epoch + 1, train_loss=state.epoch_sums[0] / seen,
        train_accuracy=state.epoch_sums[1] / seen, val_loss=result["loss"], val_accuracy=result["accuracy"],
        best_val_accuracy=state.best_accuracy, is_best=is_best, val_f1_macro=result["f1_macro"],
        val_f1_micro=result["f1_micro"], val_map=result["map"], monitor=_monitor(loop),
        best_metric=state.best_metric, epochs_without_improvement=state.epochs_without_improvement,
        early_stopping_patience=config.early_stopping_patience,
    ))


def _monitor(loop: LoopContext) -> str:
    """The validation metric that picks the best model."""
    return "val_map" if loop.plan.multi_label else "val_accuracy"


def _announce(loop: LoopContext) -> None:
    """RunStarted (with the plan's and the engine options' lines for train.log), the resume line,
    and a low-disk-space warning now rather than at the end of epoch 1."""
    config, report, plan, state = loop.config, loop.report, loop.plan, loop.state
    trainable, total = count_parameters(loop.model)
    notes = loop.loaded.notes + [plan.device.reason, plan.attention_reason]
    if loop.lora is not None:
        notes.append(loop.lora.describe())
    if config.patch_dropout > 0:
        notes.append(f"PatchDropout: training keeps {1 - config.patch_dropout:.0%} of the patch tokens of each image")
    if config.distill_weight > 0:
        notes.append(f"feature distillation to the starting model, weight {config.distill_weight}")
    notes += [r for r in plan.reasons if r not in notes] + [loop.options.describe()]
    baseline = None if plan.multi_label else majority_baseline((item.label for item in report.val), report.classes)
    loop.emit(RunStarted(
        run_id=loop.run_dir.name, run_dir=str(loop.run_dir), classes=list(report.classes), num_train=len(report.train),
        num_val=len(report.val), epochs=config.epochs, total_steps=loop.total_steps, device=loop.device.type,
        precision=plan.device.precision, trainable_params=trainable, total_params=total, notes=notes,
        resumed_from_step=state.step if loop.resumed else None,
        val_baseline=None if baseline is None else baseline.to_dict(),
    ))
    if loop.resumed:
        loop.emit(LogMessage(f"resumed after step {state.step} (epoch {state.epoch + 1})"))
    if loop.dist.is_main:
        space = low_space_warning(loop.run_dir, 1.4 * estimate_checkpoint_bytes(loop.run_dir, loop.model),
                                  "a checkpoint and the model")
        if space:
            loop.emit(LogMessage(space))


def train(
    config: TrainConfig,
    run_dir: str | Path,
    emit: Emit,
    stop_event: threading.Event | None = None,
    device: str | None = None,
    report: DatasetReport | None = None,
    checkpoint: dict[str, Any] | None = None,
    options: EngineOptions | None = None,
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
        options: engine options (caches, progress cadence); default :class:`EngineOptions`.
            They change speed, never results, and are written to ``train.log``.

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
    run_dir = Path(run_dir)
    dist_ctx = current_context()
    emit = emit if dist_ctx.is_main else _silent  # only rank 0 reports and writes files
    # ---- setup: data, model, plan (caches, attention), optimizer, optional parts, resume ----------
    loop = setup_run(config, run_dir, emit, stop_event or threading.Event(), process_device(dist_ctx, device),
                     report, checkpoint, options or EngineOptions(), dist_ctx)
    state = loop.state
    _announce(loop)
    stopped, reason = False, ""
    loop.start_step, loop.t_train = state.step, time.perf_counter()
    clock.mark("set-up")
    for epoch in range(state.epoch, config.epochs):
        state.epoch = epoch
        for part in loop.parts:
            part.on_epoch_start(loop, epoch)  # gradual unfreezing
        # ---- train one epoch (Stop: checkpoint at the unfinished window's start) ------------------
        stopped = train_one_epoch(loop, epoch)
        clock.mark_training()
        if stopped:
            break
        # ---- evaluate (the EMA weights when on) ----------------------------------------------------
        # forward only: with attention=auto, SDPA (vitft_app.attention.evaluation_attention)
        with evaluation_attention(loop.scored_model) if config.attention == "auto" else contextlib.nullcontext():
            result = evaluate(loop.scored_model, loop.data.val_loader, loop.plan.device, loop.stop_event,
                              loop.plan.multi_label, dist_ctx, loop.val_features())
        clock.mark("validation")
        if result is None:
            stopped = True
            loop.save_checkpoint(capture_rng(loop.data.shuffle_gen))  # trained, not evaluated: resume evaluates first
            break
        # ---- keep the best model, count epochs without improvement -----------------------------------
        _keep_best(loop, result, epoch)
        clock.mark("saving best model")
        # ---- checkpoint: the next epoch starts from here; not after the last epoch (early stopping
        # included), whose checkpoint a completed run deletes at once --------------------------------
        state.epoch, state.position, state.order = epoch + 1, 0, None
        state.epoch_sums = [0.0, 0.0, 0.0]
        last = epoch + 1 >= config.epochs
        early_stop = not last and 0 < config.early_stopping_patience <= state.epochs_without_improvement
        if not (last or early_stop):
            loop.save_checkpoint(capture_rng(loop.data.shuffle_gen))
        clock.mark("checkpoints")
        # ---- early stopping, Stop between epochs --------------------------------------------------
        if early_stop:
            reason = (f"early stopping at epoch {epoch + 1}: no {_monitor(loop)} improvement >"
                      f" {config.early_stopping_min_delta:g} for {state.epochs_without_improvement} epochs")
            emit(LogMessage(reason))
            break
        if dist_ctx.any(loop.stop_event.is_set(), loop.device) and epoch + 1 < config.epochs:
            stopped = True
            break
    # ---- finish: a completed run needs no checkpoint; the decode cache's disk tier goes ------------
    status = "stopped" if stopped else "completed"
    if status == "completed" and dist_ctx.is_main:
        remove_checkpoint(run_dir)
    if loop.data.decode_cache is not None:
        loop.data.decode_cache.clear()
        shutil.rmtree(run_dir / DECODE_CACHE_DIR, ignore_errors=True)
    dist_ctx.barrier()
    clock.mark("other")
    emit(LogMessage(clock.describe()))
    duration = time.perf_counter() - t_start
    emit(RunFinished(status=status, best_val_accuracy=state.best_accuracy, duration_s=duration, reason=reason,
                     step=state.step, monitor=_monitor(loop), best_metric=state.best_metric))
    return TrainResult(status, state.best_accuracy, state.step, duration, reason)


def resume_run(
    run_dir: str | Path,
    emit: Emit,
    stop_event: threading.Event | None = None,
    device: str | None = None,
    checkpoint: dict[str, Any] | None = None,
    options: EngineOptions | None = None,
) -> TrainResult:
    """Continues a stopped, failed or interrupted run from its checkpoint, in the same run folder.

    The config comes from ``run_dir/config.json``; ``metrics.csv`` rows logged after the
    checkpoint's step are dropped, so the curves continue where the checkpoint left them. With
    ``num_workers = 0`` the continuation is exact: the same next-step loss and weights as an
    uninterrupted run with the same seed.

    Args:
        run_dir, emit, stop_event, device, options: as :func:`train`.
        checkpoint: the checkpoint, when the caller already read it with
            :func:`~vitft_app.checkpoint.load_checkpoint` (None: read here).

    Raises:
        ResumeError: no readable checkpoint.
        DatasetError, FileNotFoundError, ModelLoadError, ValueError: as :func:`train`.
    """
    from ..runs import truncate_metrics

    run_dir = Path(run_dir)
    if checkpoint is None:  # the job runner passes the one it read (and checked) before starting
        checkpoint = load_checkpoint(run_dir)
    config = TrainConfig.from_json_file(run_dir / "config.json")
    truncate_metrics(run_dir, checkpoint["loop"]["step"])
    return train(config, run_dir, emit, stop_event=stop_event, device=device, checkpoint=checkpoint, options=options)
