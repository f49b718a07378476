"""The model picker's catalogue: which model is the default, what each choice is, and how long an
epoch should take on this machine.

- :data:`CATALOG` holds the curated choices as data (parameters, pretraining data, architecture).
- :func:`default_model` is the rule: a small pretrained model that suits the device when the Hub
  is reachable or a curated checkpoint is in the local Hugging Face cache, else the recommended
  scratch model (:data:`RECOMMENDED_SCRATCH_MODEL`) with :data:`SCRATCH_NOTE`.
- :func:`estimate_epoch_seconds` turns FLOPs per image (counted with
  ``torch.utils.flop_counter.FlopCounterMode`` on a meta-device forward) and a quick matmul probe
  into an *estimate* of one training epoch.

No network access happens here except :func:`hub_reachable` (one TCP connect, through
:func:`vitft_app.modeling.hub_reachable`); the cache check reads the local cache only.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable
import json

import torch
from huggingface_hub import try_to_load_from_cache
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForImageClassification, ViTConfig

from . import scratch
from .config import SCRATCH_MODEL
from .device import resolve_device_plan
from .modeling import SCRATCH_DEFAULT_IMAGE_SIZE, load_model_config, scratch_config
from .modeling import hub_reachable as _modeling_hub_reachable

logger = logging.getLogger(__name__)

#: The scratch model used offline with nothing cached. One constant, so the choice can follow
#: whatever :mod:`vitft_app.modeling` recommends for training without pretrained weights.
RECOMMENDED_SCRATCH_MODEL = scratch.RECOMMENDED_SCRATCH_MODEL

#: The visible note beside an offline scratch default.
SCRATCH_NOTE = ("random weights: expect low accuracy on small datasets; connect to the Hub or pick a saved "
                "model")

#: Training FLOPs per forward FLOP: the backward pass costs about twice the forward (Kaplan et al.
#: 2020, "Scaling Laws for Neural Language Models", section 2.1: C ~ 6N per token = 3 x 2N).
TRAIN_FLOPS_FACTOR = 3.0

#: Share of the matmul probe's rate a training step reaches (attention softmax, layer norms, GELU,
#: data loading and the optimizer run slower than a large matmul). benchmarks/README.md measured
#: 0.44-0.64 for vitft's training rows (ViT-Tiny and ViT-Small, bf16, 2 CPU cores); 0.5 is an
#: assumption for other machines, so the result is labelled an estimate everywhere it is shown.
TRAIN_EFFICIENCY = 0.5


@dataclass(frozen=True)
class CatalogEntry:
    """One curated model.

    Attributes:
        model_id: Hub id (or :data:`~vitft_app.config.SCRATCH_MODEL`).
        params_millions: published parameter count of the backbone, millions.
        pretrained_on: what the weights were trained on, in a few words.
        hidden_size, num_layers, num_heads, intermediate_size, patch_size, image_size: the ViT
            shape (from the checkpoint's ``config.json``), used to count FLOPs offline.
        devices: device types the model suits as a default (``"cpu"``, ``"cuda"``, ``"mps"``).
        source: where the numbers come from.
        config: for a model that is not a plain ViT, its ``config.json`` shape instead:
            ``{"model_type": ..., **fields}`` (``"timm_wrapper"`` takes ``architecture``).
        family: the :mod:`vitft_app.families` name.
    """

    model_id: str
    params_millions: float
    pretrained_on: str
    hidden_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    intermediate_size: int = 0
    patch_size: int = 16
    image_size: int = 224
    devices: tuple[str, ...] = ()
    source: str = ""
    config: dict[str, Any] | None = None
    family: str = "vit"


#: The curated choices, smallest pretrained first. Parameter counts and pretraining data from the
#: model cards (Dosovitskiy et al. 2021 for ViT; Touvron et al. 2021 for DeiT).
CATALOG: dict[str, CatalogEntry] = {
    entry.model_id: entry
    for entry in (
        CatalogEntry(SCRATCH_MODEL, 5.5, "nothing (random weights)", 192, 12, 3, 768,
                     source="ViT-Tiny shape (DeiT-Ti), vitft_app.modeling.scratch_config"),
        CatalogEntry("facebook/deit-tiny-patch16-224", 5.7, "ImageNet-1k (1.3M images, 1,000 classes)",
                     192, 12, 3, 768, devices=("cpu", "mps"), source="DeiT paper table 1; model card"),
        CatalogEntry("facebook/deit-small-patch16-224", 22.0, "ImageNet-1k (1.3M images, 1,000 classes)",
                     384, 12, 6, 1536, devices=("cpu", "mps"), source="DeiT paper table 1; model card"),
        CatalogEntry("google/vit-base-patch16-224", 86.0,
                     "ImageNet-21k (14M images), then fine-tuned on ImageNet-1k",
                     768, 12, 12, 3072, devices=("cuda",), source="ViT paper table 1; model card"),
        CatalogEntry("google/vit-base-patch16-224-in21k", 86.0, "ImageNet-21k (14M images, 21,843 classes)",
                     768, 12, 12, 3072, devices=("cuda",), source="ViT paper table 1; model card"),
        # Newer and stronger checkpoints of the other families (vitft_app.families), small then base.
        CatalogEntry("facebook/deit-small-distilled-patch16-224", 22.4,
                     "ImageNet-1k (1.3M images), distilled from a RegNetY-16GF teacher",
                     384, 12, 6, 1536, family="deit", source="DeiT paper table 1 (DeiT-S⚗); model card"),
        CatalogEntry("timm/vit_small_patch16_224.augreg_in21k_ft_in1k", 22.1,
                     "ImageNet-21k, then fine-tuned on ImageNet-1k (AugReg recipe)",
                     config={"model_type": "timm_wrapper", "architecture": "vit_small_patch16_224"}, family="timm",
                     source="timm model card; Steiner et al. 2021, 'How to train your ViT?'"),
        CatalogEntry("timm/vit_base_patch16_224.augreg_in21k_ft_in1k", 86.6,
                     "ImageNet-21k, then fine-tuned on ImageNet-1k (AugReg recipe)",
                     config={"model_type": "timm_wrapper", "architecture": "vit_base_patch16_224"}, family="timm",
                     source="timm model card; Steiner et al. 2021"),
        CatalogEntry("facebook/dinov2-small", 22.1, "LVD-142M (142M curated images, self-supervised, no labels)",
                     config={"model_type": "dinov2", "hidden_size": 384, "num_hidden_layers": 12,
                             "num_attention_heads": 6, "patch_size": 14, "image_size": 224}, family="dinov2",
                     source="DINOv2 paper (Oquab et al. 2023) table 1; model card"),
        CatalogEntry("facebook/dinov2-base", 86.6, "LVD-142M (142M curated images, self-supervised, no labels)",
                     config={"model_type": "dinov2", "hidden_size": 768, "num_hidden_layers": 12,
                             "num_attention_heads": 12, "patch_size": 14, "image_size": 224}, family="dinov2",
                     source="DINOv2 paper table 1; model card"),
        CatalogEntry("microsoft/beit-base-patch16-224", 86.5,
                     "ImageNet-21k self-supervised (BEiT), fine-tuned on ImageNet-22k, then ImageNet-1k",
                     config={"model_type": "beit", "use_relative_position_bias": True, "use_mean_pooling": True,
                             "layer_scale_init_value": 0.1}, family="beit",
                     source="BEiT paper (Bao et al. 2021); model card"),
        CatalogEntry("microsoft/swinv2-tiny-patch4-window8-256", 28.3, "ImageNet-1k (1.3M images, 1,000 classes)",
                     config={"model_type": "swinv2", "image_size": 256, "window_size": 8, "embed_dim": 96,
                             "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24]}, family="swin",
                     source="Swin V2 paper (Liu et al. 2022); model card"),
        CatalogEntry("apple/mobilevit-small", 5.6, "ImageNet-1k (1.3M images, 1,000 classes)",
                     config={"model_type": "mobilevit", "image_size": 256}, family="mobilevit",
                     source="MobileViT paper (Mehta & Rastegari 2022) table 1; model card"),
    )
}

#: Default preference per device type, best first (small models on CPU and MPS; ViT-B/16 on a GPU).
PREFERRED_DEFAULTS: dict[str, tuple[str, ...]] = {
    "cuda": ("google/vit-base-patch16-224", "google/vit-base-patch16-224-in21k",
             "facebook/deit-small-patch16-224", "facebook/deit-tiny-patch16-224"),
    "cpu": ("facebook/deit-tiny-patch16-224", "facebook/deit-small-patch16-224",
            "google/vit-base-patch16-224", "google/vit-base-patch16-224-in21k"),
}
PREFERRED_DEFAULTS["mps"] = PREFERRED_DEFAULTS["cpu"]


def default_model(device: str, hub_reachable: bool, cached: Iterable[str]) -> str:
    """The model the Train tab starts with.

    The rule: with the Hub reachable, the first pretrained model preferred for the device
    (``facebook/deit-tiny-patch16-224`` on CPU and MPS, ``google/vit-base-patch16-224`` on a GPU);
    offline, the first preferred model that is in the local cache; with nothing cached,
    :data:`RECOMMENDED_SCRATCH_MODEL`.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"mps"`` (a ``torch.device`` string such as
            ``"cuda:0"`` is reduced to its type).
        hub_reachable: the Hugging Face Hub answers (see :func:`hub_reachable`).
        cached: curated model ids whose weights are in the local cache (see
            :func:`cached_models`).

    Returns:
        A model id for the model picker.
    """
    order = PREFERRED_DEFAULTS.get(str(device).split(":")[0], PREFERRED_DEFAULTS["cpu"])
    if hub_reachable:
        return order[0]
    cached = set(cached)
    for model_id in order:
        if model_id in cached:
            return model_id
    return RECOMMENDED_SCRATCH_MODEL


def is_scratch(model_id: str) -> bool:
    """True for a model with random weights (any :data:`vitft_app.scratch.SCRATCH_MODELS` name)."""
    return scratch.is_scratch_model(model_id)


def default_model_note(model_id: str) -> str:
    """The note shown beside a model: :data:`SCRATCH_NOTE` for a scratch model, else ''."""
    return SCRATCH_NOTE if is_scratch(model_id) else ""


def hub_reachable() -> bool:
    """True when a TCP connection to the Hub opens (``HF_HUB_OFFLINE=1`` means no)."""
    return _modeling_hub_reachable()


#: Files that make a cached checkpoint usable without the network: its config and its weights.
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_cached(model_id: str, cache_dir: str | Path | None = None) -> bool:
    """True when ``config.json`` and a weights file of ``model_id`` are in the local Hugging Face
    cache (``huggingface_hub.try_to_load_from_cache``; no network).

    Args:
        model_id: a Hub id.
        cache_dir: the hub cache folder; default ``HF_HUB_CACHE`` (``~/.cache/huggingface/hub``).
    """
    def present(filename: str) -> bool:
        try:
            return isinstance(try_to_load_from_cache(model_id, filename, cache_dir=cache_dir), str)
        except Exception:  # noqa: BLE001 - an unreadable cache counts as empty
            logger.debug("cache check of %s/%s failed", model_id, filename, exc_info=True)
            return False

    return present("config.json") and any(present(name) for name in _WEIGHT_FILES)


def cached_models(cache_dir: str | Path | None = None) -> list[str]:
    """The curated Hub models (every :data:`CATALOG` entry but the scratch one) in the local cache."""
    return [model_id for model_id, entry in CATALOG.items()
            if model_id != SCRATCH_MODEL and is_cached(model_id, cache_dir)]


def resolve_default_model(device: str | None = None, cache_dir: str | Path | None = None) -> tuple[str, str]:
    """Applies :func:`default_model` to this machine: device policy, Hub check, cache check.

    Returns:
        ``(model id, note)``; the note is :data:`SCRATCH_NOTE` for the scratch fallback, else ''.
    """
    device_type = resolve_device_plan("auto", device).device.type
    cached = cached_models(cache_dir)
    order = PREFERRED_DEFAULTS.get(device_type, PREFERRED_DEFAULTS["cpu"])
    # The device's first choice cached already: the answer is the same either way, skip the network.
    reachable = order[0] in cached or hub_reachable()
    choice = default_model(device_type, reachable, cached)
    return choice, default_model_note(choice)


# --------------------------------------------------------------------------------------------
# FLOPs and the epoch-time estimate


def model_config_for(model_id: str, image_size: int | None = None) -> Any:
    """A ``PretrainedConfig`` describing ``model_id``'s shape, without weights or network when it
    can: catalogue entries from their data, the scratch model from its builder, other names
    (local folders, cached Hub ids) through :func:`vitft_app.modeling.load_model_config`.

    Raises:
        ModelLoadError: an unknown Hub id offline, or a missing folder.
    """
    if model_id == SCRATCH_MODEL:
        return scratch_config(image_size or SCRATCH_DEFAULT_IMAGE_SIZE, {0: "a", 1: "b"})
    if scratch.is_scratch_model(model_id):
        return scratch.scratch_model(model_id).config(image_size or SCRATCH_DEFAULT_IMAGE_SIZE, {0: "a", 1: "b"})
    entry = CATALOG.get(model_id)
    if entry is not None and entry.config is not None:
        from transformers import AutoConfig

        values = dict(entry.config)
        return AutoConfig.for_model(values.pop("model_type"), num_labels=2, **values)
    if entry is not None:
        return ViTConfig(hidden_size=entry.hidden_size, num_hidden_layers=entry.num_layers,
                         num_attention_heads=entry.num_heads, intermediate_size=entry.intermediate_size,
                         patch_size=entry.patch_size, image_size=entry.image_size, num_labels=2)
    return load_model_config(model_id)


def _config_key(config: Any) -> str:
    return config.to_json_string(use_diff=True)


@functools.lru_cache(maxsize=64)
def _count_forward(config_json: str) -> tuple[float, int]:

    data = json.loads(config_json)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    size = getattr(config, "image_size", 224)
    size = size if isinstance(size, int) else int(size[0])
    channels = int(getattr(config, "num_channels", 3))
    from .families import model_class_for

    model_class = model_class_for(config)
    with torch.device("meta"):
        model = (AutoModelForImageClassification.from_config(config) if model_class is AutoModelForImageClassification
                 else model_class(config))
        pixels = torch.empty(1, channels, size, size)
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=pixels)
    return float(counter.get_total_flops()), int(params)


def forward_flops_per_image(config: Any) -> float:
    """FLOPs of one image's forward pass (a multiply-add counts 2), at the config's image size.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention) on
    a forward pass of the model built on the ``meta`` device: no weights, no memory, ~0.1 s. For a
    ViT this equals the analytic count ``2 * (L * (4 N D^2 + 2 N^2 D + 2 N D M) + N_p 3 P^2 D)``
    (N tokens, D width, M MLP width, L blocks, P patch): 2.5 GFLOPs for DeiT-Ti, 35.1 for ViT-B/16.

    Args:
        config: a transformers image-classification ``PretrainedConfig``.

    Returns:
        FLOPs per image (float).
    """
    return _count_forward(_config_key(config))[0]


@functools.lru_cache(maxsize=8)
def matmul_flops_per_second(device: str = "cpu", size: int = 2048, repeats: int = 2) -> float:
    """Measured matmul throughput of ``device`` in the precision training would use there (bf16
    autocast where the device policy picks it, else fp32); measured once per process and device.

    A ``size x size`` by ``size x size`` matmul (``2 size^3`` FLOPs) is timed ``repeats`` times
    after one warm-up, and the best time is kept (2048, as ``benchmarks/bench_train.py``'s
    utilization column: smaller matmuls under-report a CPU's AMX/AVX-512 rate several times).

    Returns:
        FLOPs per second (float, > 0).
    """
    plan = resolve_device_plan("auto", device)
    dtype = plan.autocast_dtype or torch.float32
    a = torch.randn(size, size, device=plan.device, dtype=dtype)
    b = torch.randn(size, size, device=plan.device, dtype=dtype)
    best = float("inf")
    for i in range(repeats + 1):
        if plan.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        (a @ b).sum().item()
        elapsed = time.perf_counter() - start
        if i:  # the first call warms up the kernels
            best = min(best, elapsed)
    return 2.0 * size**3 / max(best, 1e-9)


#: The least time one training image costs on a CPU whatever its FLOPs (decoding, augmentation,
#: the optimizer step and framework overhead per batch): the PVTv2-b0 scratch model at 32 px, whose
#: FLOPs alone predict about 1 s per epoch of the 4,000 built-in digits, took about 14.6 s per
#: epoch including validation in ``benchmarks/bench_quality.py`` (3.6 ms per training image).
MIN_SECONDS_PER_IMAGE = 0.003


def estimate_epoch_seconds(forward_flops: float, num_images: int, flops_per_second: float,
                           efficiency: float = TRAIN_EFFICIENCY) -> float:
    """An *estimate* of one full fine-tuning epoch: ``3 x forward FLOPs x images / (probe rate x
    efficiency)`` (training = forward + a backward of about twice its cost; see
    :data:`TRAIN_FLOPS_FACTOR`, :data:`TRAIN_EFFICIENCY`), and at least
    :data:`MIN_SECONDS_PER_IMAGE` per image (small models are bound by overheads, not FLOPs). Freezing blocks or a cached linear probe
    makes the real epoch shorter; evaluation of the validation split is not included.

    Args:
        forward_flops: FLOPs of one image's forward pass (:func:`forward_flops_per_image`).
        num_images: training images per epoch.
        flops_per_second: the device's measured matmul rate (:func:`matmul_flops_per_second`).
        efficiency: share of that rate training reaches (0..1].

    Returns:
        Seconds (float).

    Raises:
        ValueError: a non-positive rate or efficiency, or a negative count.
    """
    if flops_per_second <= 0 or not 0 < efficiency <= 1:
        raise ValueError(f"flops_per_second and efficiency must be positive, got {flops_per_second}, {efficiency}")
    if forward_flops < 0 or num_images < 0:
        raise ValueError(f"forward_flops and num_images must be >= 0, got {forward_flops}, {num_images}")
    return max(TRAIN_FLOPS_FACTOR * forward_flops * num_images / (flops_per_second * efficiency),
               MIN_SECONDS_PER_IMAGE * num_images)


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"3.2 min"`` or ``"1.5 h"``."""
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class ModelInfo:
    """What the model picker shows for one choice.

    Attributes:
        model_id: the choice.
        params_millions: parameters in millions (catalogue data, else counted).
        pretrained_on: pretraining data, or ``None`` when unknown (a local folder or other Hub id).
        forward_gflops: forward GFLOPs per image at the model's input size.
        epoch_seconds: estimated seconds per training epoch, or None without a dataset.
        device: the device type the estimate is for.
    """

    model_id: str
    params_millions: float
    pretrained_on: str | None
    forward_gflops: float
    epoch_seconds: float | None
    device: str

    def markdown(self) -> str:
        """One line for the model picker, the estimate labelled as such."""
        pretrained = self.pretrained_on or "see the checkpoint's model card"
        if self.pretrained_on is None and Path(self.model_id).expanduser().is_dir():
            pretrained = "a saved model (its own weights)"
        text = (f"**{self.params_millions:.1f}M parameters** · pretrained on: {pretrained}"
                f" · {self.forward_gflops:.1f} GFLOPs per image")
        if self.epoch_seconds is not None:
            text += (f" · **about {format_duration(self.epoch_seconds)} per epoch** on this {self.device.upper()}"
                     " (estimate: FLOPs and a quick matmul probe)")
        return text


def describe_model(model_id: str, num_train_images: int | None, image_size: int | None = None,
                   device: str | None = None) -> ModelInfo:
    """Parameters, pretraining data and the epoch-time estimate of one model-picker choice.

    Args:
        model_id: a catalogue id, another Hub id, or a local folder.
        num_train_images: training images of the chosen dataset (None: no estimate).
        image_size: input size of the scratch model (ignored for pretrained models).
        device: force a device; default from the device policy.

    Returns:
        A :class:`ModelInfo`.

    Raises:
        ModelLoadError: the model's config cannot be read (offline and not cached, or no folder).
    """
    config = model_config_for(model_id, image_size)
    flops, counted_params = _count_forward(_config_key(config))
    entry = CATALOG.get(model_id)
    params = entry.params_millions if entry is not None and model_id != SCRATCH_MODEL else counted_params / 1e6
    if is_scratch(model_id):
        pretrained = CATALOG[SCRATCH_MODEL].pretrained_on
    else:
        pretrained = entry.pretrained_on if entry is not None else None
    dev = resolve_device_plan("auto", device).device.type
    seconds = None
    if num_train_images:
        seconds = estimate_epoch_seconds(flops, num_train_images, matmul_flops_per_second(dev))
    return ModelInfo(model_id, params, pretrained, flops / 1e9, seconds, dev)
