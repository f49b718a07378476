"""Setup of a run, before its first step: data, model, plan, optimizer and schedule, optional
parts, resume. :func:`setup_run` returns the :class:`LoopContext` the loop works on.

Hook points for features that change how a run is built: model construction and freezing
(:func:`_build_model`), the optimizer (:func:`_build_optimizer`), the optional parts
(:func:`_build_parts`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..attention import AttentionTrial
from ..augment import create_batch_mixer
from ..checkpoint import ResumeError, estimate_checkpoint_bytes, low_space_warning, restore_rng, save_checkpoint
from ..config import TrainConfig
from ..data import DatasetReport, processor_spec
from ..device import resolve_device_plan
from ..distributed import DistContext
from ..events import Emit, LogMessage
from ..feature_cache import CachedFeatures, cache_features, split_frozen_model
from ..auto_batch import resolve_auto_batch_size, training_step_probe
from ..lora import LoraSetup, apply_lora
from ..modeling import LoadedModel, build_model, freeze_layers
from ..optim import create_optimizer, create_scheduler
from ..runs import saved_model_readable
from .checks import check_recipe, check_trainable, prepare_data
from .loaders import TrainData, build_train_data, optimizer_steps_per_epoch
from .losses import class_weight_tensor
from .options import EngineOptions
from .parts import AttentionChoice, Distillation, GradualUnfreeze, Part, TokenDropout, WeightEma, use_attention
from .plan import TrainPlan, resolve_train_plan
from .state import _LoopState


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


class FrozenFeatures:
    """The frozen prefix's outputs, computed once per split (:mod:`vitft_app.feature_cache`).

    Args:
        model: the model, frozen at ``depth`` (the prefix and suffix share its parameters).
        depth: the freeze depth.
    """

    def __init__(self, model: nn.Module, depth: int) -> None:
        self.depth = depth
        self.prefix, self.suffix = split_frozen_model(model, depth)
        self.train: CachedFeatures | None = None
        self.val: CachedFeatures | None = None


@dataclass
class LoopContext:
    """Everything the loop works on, built once by :func:`setup_run`."""

    config: TrainConfig
    run_dir: Path
    emit: Emit
    stop_event: threading.Event
    dist: DistContext
    options: EngineOptions
    plan: TrainPlan
    report: DatasetReport
    loaded: LoadedModel
    data: TrainData
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    state: _LoopState
    parts: list[Part]
    ema: WeightEma | None
    features: FrozenFeatures | None
    class_weights: torch.Tensor | None
    mixer: Any
    patch_size: int
    steps_per_epoch: int
    total_steps: int
    log_every: int
    resumed: bool
    lora: LoraSetup | None = None
    forward_model: nn.Module = field(init=False)
    needs_hidden_states: bool = field(init=False)
    # clock: the step the run (or resume) started at, when, the last StepProgress, images since
    start_step: int = 0
    t_train: float = 0.0
    progress_t: float = 0.0
    images_done: int = 0

    def __post_init__(self) -> None:
        self.forward_model = self.model  # DDP-wrapped by rewrap() once the states are restored
        self.needs_hidden_states = any(part.needs_hidden_states for part in self.parts)

    @property
    def model(self) -> nn.Module:
        """The model being trained (unwrapped)."""
        return self.loaded.model

    @property
    def device(self) -> torch.device:
        """Where the run computes (from the plan)."""
        return self.plan.device.device

    @property
    def scored_model(self) -> nn.Module:
        """The model evaluated and saved: the EMA weights when on."""
        return self.ema.module if self.ema is not None else self.model

    def rewrap(self) -> None:
        """DDP around the model in a data-parallel run (again when the trainable set changes)."""
        self.forward_model = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def any_process(self, flag: torch.Tensor) -> bool:
        """True when the device flag is set in any process: the one host sync of a decision."""
        if not self.dist.enabled:
            return bool(flag)
        value = flag.float().reshape(1)
        self.dist.sum(value)
        return bool(value.item() > 0)

    def save_checkpoint(self, rng: dict[str, Any]) -> None:
        """Checkpoint with the given RNG snapshot and the current module states and counters."""
        if not self.dist.is_main:
            return
        warning = low_space_warning(self.run_dir, estimate_checkpoint_bytes(self.run_dir, self.model), "the checkpoint")
        if warning:
            self.emit(LogMessage(warning))
        save_checkpoint(self.run_dir, {
            "loop": dict(self.state.__dict__),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.averaged.state_dict() if self.ema is not None else None,
            "rng": rng,
            "config": self.config.to_dict(),
        })

    def train_features(self) -> CachedFeatures | None:
        """The training split's frozen features (computed at the first call), or None when the
        plan does not cache training."""
        if not self.plan.feature_cache_train:
            return None
        if self.features.train is None:
            self.features.train = self._cache(self.data.train_set)
            self.emit(LogMessage("frozen blocks cached: each epoch now trains only the unfrozen blocks and the head"))
        return self.features.train

    def val_features(self) -> tuple[nn.Module, CachedFeatures, int] | None:
        """``(suffix of the scored model, validation features, batch size)`` for
        :func:`~vitft_app.training.evaluate`, or None when the plan does not cache validation."""
        if not self.plan.feature_cache_val:
            return None
        if self.features.val is None:
            self.features.val = self._cache(self.data.val_set)
        suffix = split_frozen_model(self.scored_model, self.features.depth)[1] if self.ema is not None \
            else self.features.suffix
        return suffix, self.features.val, self.config.batch_size

    def _cache(self, dataset: Any) -> CachedFeatures:
        return cache_features(self.features.prefix, dataset, self.device, self.plan.device.autocast,
                              self.config.batch_size, spill_dir=self.run_dir)


def _build_model(config: TrainConfig, report: DatasetReport, dist_ctx: DistContext) -> LoadedModel:
    """The model for the dataset's classes, seeded so the head (and a scratch model) initialize the
    same way every run, which also rebuilds the distillation teacher exactly on resume."""
    torch.manual_seed(config.seed)
    loaded = build_model(config.model, report.classes, config.image_size)
    loaded.model.config.problem_type = "multi_label_classification" if report.multi_label \
        else "single_label_classification"
    if dist_ctx.enabled:
        # Each process augments differently (rank-offset seed); model init above used the same seed.
        torch.manual_seed(config.seed + 1000 * dist_ctx.rank)
    return loaded


def _build_optimizer(config: TrainConfig, model: nn.Module, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """Optimizer (every parameter when gradual unfreezing will unfreeze some) and its schedule,
    stepped once per optimizer step, not per micro-batch."""
    optimizer = create_optimizer(model, config.lr, config.weight_decay, config.optimizer, config.layer_decay,
                                 include_frozen=config.gradual_unfreeze > 0)
    return optimizer, create_scheduler(optimizer, total_steps, config.warmup_ratio, config.scheduler)


def _build_parts(config: TrainConfig, model: nn.Module, plan: TrainPlan, teacher: Distillation | None,
                 state: _LoopState, data_parallel: bool) -> tuple[list[Part], WeightEma | None]:
    """The optional parts of this run (EMA, distillation, PatchDropout, gradual unfreezing, the
    attention trial) and its EMA part; sets the attention kernel the plan chose. A data-parallel
    run's trial keeps one schedule in every process (no redone micro-batches)."""
    ema = WeightEma(model, config.ema_decay) if config.ema_decay > 0 else None
    parts: list[Part] = [p for p in (ema, teacher) if p is not None]
    if config.patch_dropout > 0:  # a hook on the embeddings, active only around the training forward
        parts.append(TokenDropout(model, config.patch_dropout))
    if config.gradual_unfreeze > 0:
        unfreeze = GradualUnfreeze(config.freeze_depth, config.gradual_unfreeze, depth=config.freeze_depth)
        unfreeze.depth = unfreeze.depth_at(state.epoch)
        parts.append(unfreeze)
    copies = [model, teacher.teacher if teacher else None, ema.module if ema else None]
    if plan.attention is not None:
        use_attention(state, copies, plan.attention)
    if plan.attention_trial:
        parts.append(AttentionChoice(AttentionTrial(model, plan.device.device, redo_invalid=not data_parallel),
                                     lambda kernel: use_attention(state, copies, kernel), plan.attention_memory))
    return parts, ema


def _restore(loop: LoopContext, checkpoint: dict[str, Any]) -> None:
    """Module states and RNG states from the checkpoint (the counters are already in
    ``loop.state``); a checkpoint that does not fit this model and config is one line."""
    try:
        loop.model.load_state_dict(checkpoint["model"])
        loop.optimizer.load_state_dict(checkpoint["optimizer"])
        loop.scheduler.load_state_dict(checkpoint["scheduler"])
        if loop.scaler is not None and checkpoint.get("scaler"):
            loop.scaler.load_state_dict(checkpoint["scaler"])
        if loop.ema is not None and checkpoint.get("ema"):
            loop.ema.averaged.load_state_dict(checkpoint["ema"])
        restore_rng(checkpoint["rng"], loop.data.shuffle_gen)
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise _resume_error(loop.run_dir, exc) from None
    if not loop.dist.is_main:  # the checkpoint holds rank 0's RNG; the others draw afresh
        torch.manual_seed(loop.config.seed + 1000 * loop.dist.rank + loop.state.step)


def _resume_error(run_dir: Path, exc: Exception) -> ResumeError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    return ResumeError(f"The checkpoint of {run_dir.name} does not fit the run's model and settings ({first});"
                       " start a new run.")


def setup_run(config: TrainConfig, run_dir: Path, emit: Emit, stop_event: threading.Event, device: str | None,
              report: DatasetReport | None, checkpoint: dict[str, Any] | None, options: EngineOptions,
              dist_ctx: DistContext) -> LoopContext:
    """Builds everything a run needs before its first step (see the module docstring).

    Raises:
        DatasetError, FileNotFoundError, ModelLoadError, ValueError, ResumeError: as
        :func:`~vitft_app.training.train`.
    """
    # ---- data and device ------------------------------------------------------------------------
    report = prepare_data(config, emit) if report is None else check_trainable(report, emit)
    check_recipe(config, report)
    device_plan = resolve_device_plan(config.precision, device)
    # ---- model, then the plan (the model's family decides the caches and the attention kernel) --
    loaded = _build_model(config, report, dist_ctx)
    model = loaded.model
    try:
        state = _LoopState(**checkpoint["loop"]) if checkpoint is not None else _LoopState()
    except (KeyError, TypeError) as exc:
        raise _resume_error(run_dir, exc) from None
    plan = resolve_train_plan(config, report, device_plan, model, options, dist_ctx, state.attention)
    teacher = Distillation(model, config.distill_weight, device_plan.device) if config.distill_weight > 0 else None
    freeze_layers(model, config.freeze_depth)
    lora = apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets, config.freeze_depth) \
        if config.lora_rank > 0 else None  # adapters in place: `model` stays the module the loop trains
    model.to(device_plan.device)
    if config.auto_batch_size:  # --batch-size auto: the largest micro-batch that fits (vitft_app/auto_batch.py)
        out_h, out_w = processor_spec(loaded.processor).output_size
        config, note = resolve_auto_batch_size(config, training_step_probe(model, (3, out_h, out_w), device_plan.device,
                                                                           device_plan.autocast))
        loaded.notes.append(note)
    data = build_train_data(config, report, loaded.processor, plan, run_dir, options, dist_ctx)
    features = FrozenFeatures(model, config.freeze_depth) if plan.feature_cache_val else None
    # ---- losses and batch-level regularizers ------------------------------------------------------
    class_weights = class_weight_tensor(report, config.class_weights)
    mixer = None if plan.multi_label else create_batch_mixer(config.mixup, config.cutmix, plan.num_classes)
    # ---- optimizer and schedule ---------------------------------------------------------------------
    steps_per_epoch = optimizer_steps_per_epoch(data.num_micro, config.grad_accum_steps)
    optimizer, scheduler = _build_optimizer(config, model, steps_per_epoch * config.epochs)
    scaler = torch.amp.GradScaler(device_plan.device.type) if device_plan.use_grad_scaler else None
    # ---- optional parts, then resume (module states, RNG states) ---------------------------------
    if checkpoint is not None and config.gradual_unfreeze > 0 and lora is None:  # LoRA: apply_lora fixed the set
        freeze_layers(model, GradualUnfreeze(config.freeze_depth, config.gradual_unfreeze, 0).depth_at(state.epoch))
    parts, ema = _build_parts(config, model, plan, teacher, state, dist_ctx.enabled)
    loop = LoopContext(
        config=config, run_dir=run_dir, emit=emit, stop_event=stop_event, dist=dist_ctx, options=options, plan=plan,
        report=report, loaded=loaded, data=data, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
        state=state, parts=parts, ema=ema, features=features,
        class_weights=None if class_weights is None else class_weights.to(device_plan.device), mixer=mixer,
        patch_size=int(getattr(model.config, "patch_size", 16)), steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * config.epochs, log_every=log_interval(config.log_every_steps, steps_per_epoch),
        resumed=checkpoint is not None, lora=lora,
    )
    if checkpoint is not None:
        _restore(loop, checkpoint)
        _forget_lost_best(loop)
    loop.rewrap()
    return loop


def _forget_lost_best(loop: LoopContext) -> None:
    """On resume, a best model the checkpoint remembers but the run folder no longer holds (deleted,
    cut short, damaged) is forgotten: the best metric is reset, so the next validation saves that
    epoch's model instead of a run "completing" with an unreadable model (the checkpoint, deleted
    at the end, was the only way back)."""
    state = loop.state
    if state.best_metric is None or saved_model_readable(loop.run_dir):
        return
    state.best_metric, state.best_accuracy = None, None
    loop.emit(LogMessage("warning: the saved model of this run is missing or damaged: the next validation saves"
                         " that epoch's model, and the best so far is counted again from there"))
