"""The run's plan: every "which path?" of a run decided once, with its reason, before the first
step (as nanoGPT and timm resolve their setup at the top of ``train.py``), and written to
``train.log``. The loop only reads it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..attention import (CANDIDATES, MEMORY_DAYS, AttentionTrial, can_switch_attention, current_attention,
                         describe_recalled, memory_key, recall)
from ..config import TrainConfig
from ..data import DatasetReport
from ..device import DevicePlan
from ..distributed import DistContext
from ..families import feature_cache_blocker
from ..modeling import num_blocks
from .options import EngineOptions


def supports_feature_cache(model: nn.Module) -> bool:
    """True when the frozen prefix of the model, as frozen now, can be cached exactly: the
    per-family rule :func:`vitft_app.families.feature_cache_blocker` finds no blocker."""
    return feature_cache_blocker(model) is None


@dataclass(frozen=True)
class TrainPlan:
    """What a run does, decided once by :func:`resolve_train_plan`.

    Attributes:
        device: device and precision (:class:`~vitft_app.device.DevicePlan`, with its reason).
        multi_label: sigmoid + BCE head (a multi-label dataset) instead of softmax + cross-entropy.
        num_classes: classes (labels) of the dataset.
        decode_cache: decoded, resized images are kept (:mod:`vitft_app.decode_cache`) for the
            splits that are never randomly transformed per image; a randomly transformed training
            split keeps its decoded images (not resized) up to the memory budget, without workers.
        train_transform_random: the training split's per-image transform is random (augment,
            random erasing): it runs every epoch, on the decoded image.
        decoded_train_cached: that random training split reads its decoded images through the
            decode cache (decode cache on, no DataLoader workers).
        feature_cache_val: validation runs the trainable suffix on the frozen prefix's stored
            outputs (:mod:`vitft_app.feature_cache`).
        feature_cache_train: training does too (nothing random touches the pixels).
        attention: the kernel to set at the start (``"sdpa"``/``"vitft_eager"``/``"eager"``), or None to keep the
            model's (an attention trial sets it, or the kernel cannot be switched).
        attention_trial: time the first micro-batches with each kernel and keep the faster.
        attention_memory: the key (:func:`vitft_app.attention.memory_key`) under which the
            trial's decision is remembered for later runs, or None (no trial, or the engine
            option is off, or a data-parallel run or ``--batch-size auto``).
        reasons: one line per decision, for ``train.log`` (device, caches, attention).
    """

    device: DevicePlan
    multi_label: bool
    num_classes: int
    decode_cache: bool
    train_transform_random: bool
    decoded_train_cached: bool
    feature_cache_val: bool
    feature_cache_train: bool
    attention: str | None
    attention_trial: bool
    reasons: tuple[str, ...]
    attention_memory: str | None = None

    @property
    def attention_reason(self) -> str:
        """The attention line of :attr:`reasons`."""
        return next(r for r in self.reasons if r.startswith("attention:"))


def _feature_cache_decision(config: TrainConfig, model: nn.Module, options: EngineOptions,
                            dist_ctx: DistContext) -> tuple[bool, bool, str]:
    """``(validation cached, training cached, reason)``: frozen blocks cannot change, so their
    output on pixels nothing random touches is computed once. Validation always qualifies (it
    never augments); training does when ``config.random_pixels`` is False."""
    why_not = (
        "the engine option is off" if not options.feature_cache
        else "freeze depth 0: no frozen block" if config.freeze_depth < 1
        else "gradual unfreezing changes the frozen blocks" if config.gradual_unfreeze > 0
        else ""
    )
    blocker = None if why_not else feature_cache_blocker(model, config.freeze_depth)
    if blocker:
        why_not = blocker
    if why_not:
        return False, False, f"frozen-feature cache: off ({why_not})"
    sources = config.random_pixel_sources()
    train_not = (
        f"random pixels in training: {', '.join(sources)}" if sources
        else "distillation runs the teacher on the pixels" if config.distill_weight > 0
        else "data-parallel run" if dist_ctx.enabled
        else ""
    )
    if train_not:
        return True, False, f"frozen-feature cache: validation only ({train_not})"
    return True, True, (f"frozen-feature cache: validation and training ({config.freeze_depth} frozen blocks,"
                        " nothing random touches the pixels)")


def trial_shape(config: TrainConfig) -> dict[str, object]:
    """The settings that change what a training step computes, for the attention memory key."""
    return {"batch_size": config.batch_size, "image_size": config.image_size, "freeze_depth": config.freeze_depth,
            "lora_rank": config.lora_rank, "patch_dropout": config.patch_dropout,
            "distillation": config.distill_weight > 0, "gradual_unfreeze": config.gradual_unfreeze}


def _attention_decision(config: TrainConfig, model: nn.Module, resumed_attention: str | None,
                        linear_probe_cached: bool, device: DevicePlan, options: EngineOptions,
                        dist_ctx: DistContext) -> tuple[str | None, bool, str, str | None]:
    """``(kernel to set or None, trial?, reason, memory key or None)``: forced, kept from the
    checkpoint, or (auto) remembered from this machine's trial for the same shape
    (:func:`vitft_app.attention.recall`), or chosen by timing the first training micro-batches
    (:class:`vitft_app.attention.AttentionTrial`)."""
    if resumed_attention is not None and config.attention in ("auto", resumed_attention):
        return resumed_attention, False, f"attention: {resumed_attention} (chosen when the run started)", None
    if config.attention != "auto":
        return config.attention, False, f"attention: {config.attention} (as requested)", None
    if linear_probe_cached:
        return None, False, (f"attention: {current_attention(model)} (linear probe on cached features: no attention"
                             " runs in training, nothing to time)"), None
    if not can_switch_attention(model):
        return None, False, f"attention: {current_attention(model)} (this model's kernel cannot be switched)", None
    key = None
    if options.attention_memory and not dist_ctx.enabled and not config.auto_batch_size:
        key = memory_key(model, device.device, device.precision, trial_shape(config))
        entry = recall(key)
        if entry is not None:
            return entry["kernel"], False, (f"attention: {entry['kernel']} ({describe_recalled(entry)}; measured"
                                            f" again after {MEMORY_DAYS} days)"), None
    rounds = len(AttentionTrial(model, device.device).schedule)  # nothing runs: reads the schedule
    return None, True, (f"attention: auto (the first {rounds} micro-batches alternate sdpa and"
                        f" {CANDIDATES[1]}; the faster is kept)"), key


def resolve_train_plan(
    config: TrainConfig,
    report: DatasetReport,
    device: DevicePlan,
    model: nn.Module,
    options: EngineOptions | None = None,
    dist_ctx: DistContext | None = None,
    resumed_attention: str | None = None,
) -> TrainPlan:
    """Decides once, with reasons, what a run does: precision, caches, attention kernel.

    Args:
        config: the run's settings.
        report: the dataset report (multi-label, classes).
        device: from :func:`~vitft_app.device.resolve_device_plan`.
        model: the built model (its family decides the feature cache and attention kernels).
        options: the engine options (default :class:`EngineOptions`).
        dist_ctx: the data-parallel context (default: single process).
        resumed_attention: the kernel a resumed run's checkpoint chose, or None.

    Returns:
        A :class:`TrainPlan`.
    """
    options = options or EngineOptions()
    dist_ctx = dist_ctx or DistContext()
    val_cached, train_cached, feature_reason = _feature_cache_decision(config, model, options, dist_ctx)
    image_random = config.random_pixel_sources("image")
    decoded_train_cached = bool(image_random) and options.decode_cache and config.num_workers == 0
    if not options.decode_cache:
        decode_reason = "decode cache: off (the engine option is off)"
    elif image_random and not decoded_train_cached:
        decode_reason = ("decode cache: validation only (training transforms each image at random:"
                         f" {', '.join(image_random)}; DataLoader workers decode every epoch)")
    elif decoded_train_cached:
        decode_reason = ("decode cache: validation, and training's decoded images up to the memory budget"
                         f" (the random transforms run on them every epoch: {', '.join(image_random)})")
    else:
        decode_reason = "decode cache: validation and training (no per-image randomness)"
    linear_probe_cached = train_cached and config.freeze_depth == num_blocks(model)
    attention, trial, attention_reason, memory = _attention_decision(config, model, resumed_attention,
                                                                     linear_probe_cached, device, options, dist_ctx)
    return TrainPlan(
        device=device,
        multi_label=report.multi_label,
        num_classes=len(report.classes),
        decode_cache=options.decode_cache,
        train_transform_random=bool(image_random),
        decoded_train_cached=decoded_train_cached,
        feature_cache_val=val_cached,
        feature_cache_train=train_cached,
        attention=attention,
        attention_trial=trial,
        reasons=(device.reason, attention_reason, decode_reason, feature_reason),
        attention_memory=memory,
    )
