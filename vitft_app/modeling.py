"""Model choice, loading (Hub, local folder or from scratch) and freezing."""

from __future__ import annotations

import logging
import copy
import functools
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn
from transformers import (  # imported up front: transformers' lazy imports race across threads
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    ViTForImageClassification,
)

from .config import SCRATCH_MODEL
from .runs import is_model_folder, model_dir
from .scratch import (
    RECOMMENDED_SCRATCH_MODEL,
    SCRATCH_MODELS,
    is_scratch_model,
    scratch_config,
    scratch_model,
    scratch_patch_size,
    scratch_processor,
)
from .data import processor_spec
from .families import (GENERIC, apply_freeze_depth, encoder_parts, family_of, freeze_unit_name,  # noqa: F401 (encoder_parts: re-exported)
                       is_distilled_deit, model_class_for, num_freeze_units, sync_label_names)

logger = logging.getLogger(__name__)

#: Hub checkpoints offered in the model dropdown (any other Hub id or local folder works too).
CURATED_MODELS = (
    "google/vit-base-patch16-224-in21k",
    "google/vit-base-patch16-224",
    "facebook/deit-tiny-patch16-224",
    "facebook/deit-small-patch16-224",
    # Other families (vitft_app.families; README "Models"): the strongest small and base checkpoints.
    "facebook/deit-small-distilled-patch16-224",
    "timm/vit_small_patch16_224.augreg_in21k_ft_in1k",
    "timm/vit_base_patch16_224.augreg_in21k_ft_in1k",
    "facebook/dinov2-small",
    "facebook/dinov2-base",
    "microsoft/beit-base-patch16-224",
    "microsoft/swinv2-tiny-patch4-window8-256",
    "apple/mobilevit-small",
)
#: Every choice of the model dropdown, the offline ones first (see vitft_app.scratch.SCRATCH_MODELS).
MODEL_CHOICES = tuple(SCRATCH_MODELS) + CURATED_MODELS
#: Default input size of vit-tiny-scratch.
SCRATCH_DEFAULT_IMAGE_SIZE = 224


class ModelLoadError(ValueError):
    """A model that cannot be loaded, with a message a user can act on (a ``ValueError``, so
    every handler of bad input shows it as one line)."""


def offline_message(name: str) -> str:
    """The message shown when a Hub model is neither reachable nor cached."""
    return (
        f"Cannot load model '{name}': the Hugging Face Hub cannot be reached and the model is not "
        "in the local cache. Offline choices: "
        f"'{RECOMMENDED_SCRATCH_MODEL}' (a PVTv2 trained from scratch), 'vit-tiny-scratch' (a ViT-Tiny), "
        "or a local folder saved with save_pretrained, such as the model/ folder of an earlier run."
    )


@dataclass
class LoadedModel:
    """A model ready to train, with its processor and what loading changed.

    Attributes:
        model: ``*ForImageClassification`` with ``num_labels``, ``id2label``, ``label2id`` set.
        processor: the image processor (resize target, mean and std).
        head_reinitialized: True when the classification head was freshly initialized.
        notes: sentences for the UI and log (head re-initialized, source of weights).
    """

    model: nn.Module
    processor: Any
    head_reinitialized: bool
    notes: list[str] = field(default_factory=list)


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """True when a TCP connection to the Hub endpoint opens within ``timeout_s`` seconds (a fast
    fail instead of the Hub client's retries); False at once when ``HF_HUB_OFFLINE`` is set."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout_s):
            return True
    except OSError:
        return False


#: The former private name (kept for callers outside the package).
_hub_reachable = hub_reachable


def is_local_model(name: str) -> bool:
    """True when ``name`` is a folder on this machine (a save_pretrained model or a run)."""
    return Path(name).expanduser().is_dir()


def resolve_model_path(name: str) -> str:
    """A run folder stands for its saved ``model/``; other names are returned as given."""
    path = Path(name).expanduser()
    if not path.is_dir() or is_model_folder(path):
        return str(path) if path.is_dir() else name
    saved = model_dir(path)
    return str(saved) if saved is not None else str(path)


def cache_only_kwargs(loader: Any) -> dict[str, Any]:
    """Keyword arguments for a ``loader.from_pretrained`` that reads the local Hugging Face cache
    and never the network: ``local_files_only``, and for transformers' ``AutoModel*`` classes the
    same again for their PEFT-adapter lookup, which transformers 5.x does not pass it on to (it
    then retried the Hub 5 times: a cached checkpoint took 23 s longer to load offline).

    Args:
        loader: a transformers class with ``from_pretrained`` (``AutoConfig``, an image
            processor, a model class or an ``AutoModel*`` class).
    """
    kwargs: dict[str, Any] = {"local_files_only": True}
    if getattr(loader, "_model_mapping", None) is not None:  # the AutoModel* factories
        kwargs["adapter_kwargs"] = {"local_files_only": True}
    return kwargs


def _call_hub(loader: Any, name: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(name)`` with a fast, clear failure when offline and uncached."""
    target = resolve_model_path(name)
    if is_local_model(target):
        try:
            return loader.from_pretrained(target, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"Cannot load model from folder '{target}': {exc}") from exc
    if name.startswith(("/", "./", "../", "~")) or (len(name) > 1 and name[1] == ":"):  # a path, not a Hub id
        raise ModelLoadError(f"Model folder not found: {Path(name).expanduser()}")
    try:  # cached already? No network needed then.
        return loader.from_pretrained(target, **cache_only_kwargs(loader), **kwargs)
    except (OSError, ValueError):
        pass
    if not hub_reachable():
        logger.info("model %s: not in the local cache and the Hub is unreachable", name)
        raise ModelLoadError(offline_message(name))
    try:
        return loader.from_pretrained(target, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Cannot load model '{name}' from the Hugging Face Hub: {exc}") from exc


@functools.lru_cache(maxsize=32)
def _hub_config(name: str) -> Any:
    return _call_hub(AutoConfig, name)


def load_model_config(name: str) -> Any:
    """The checkpoint's ``PretrainedConfig`` (no weights are read). Hub configs are cached per
    name for the process; local folders are read each time (a run's model/ changes as it trains).

    Raises:
        ModelLoadError: offline and not cached, unknown id, or missing folder.
    """
    if is_local_model(resolve_model_path(name)):
        return _call_hub(AutoConfig, name)
    return _hub_config(name)


def checkpoint_labels(config: Any) -> list[str] | None:
    """Class names of a checkpoint's head, or None when it has no classification head."""
    architectures = getattr(config, "architectures", None) or []
    if not any("ForImageClassification" in a for a in architectures):
        return None
    id2label = getattr(config, "id2label", None) or {}
    return [id2label[i] for i in sorted(id2label)]


def head_matches(config: Any, classes: list[str]) -> bool:
    """True when the checkpoint's head already predicts exactly these classes, in this order."""
    return checkpoint_labels(config) == list(classes)


def load_processor(name: str, image_size: int | None = None) -> Any:
    """The image processor of a model without loading its weights (the scratch model's own for
    ``vit-tiny-scratch`` at ``image_size``, default 224).

    Raises:
        ModelLoadError: as :func:`build_model`.
    """
    if is_scratch_model(name):
        return scratch_model(name).processor(image_size or SCRATCH_DEFAULT_IMAGE_SIZE)
    return _call_hub(AutoImageProcessor, name)


def build_model(name: str, classes: list[str], image_size: int | None = None) -> LoadedModel:
    """Loads a model for the dataset's classes.

    A scratch name (``pvt-v2-b0-scratch``, ``vit-tiny-scratch``: see
    :data:`vitft_app.scratch.SCRATCH_MODELS`) builds a model with random weights (offline).
    Anything else goes through
    ``AutoModelForImageClassification.from_pretrained`` and ``AutoImageProcessor``: a local folder
    (a run folder stands for its ``model/``), a cached Hub model, or a Hub download. The head is
    re-initialized (truncated normal, std ``initializer_range``, as ViT's ``_init_weights``) unless
    the checkpoint already predicts exactly ``classes``.

    Args:
        name: model name or path.
        classes: class names in index order.
        image_size: input size for a scratch model (default 224). For a ViT/DeiT checkpoint, None
            keeps its size; another size interpolates its position embeddings (see
            :mod:`vitft_app.resolution`) and returns a processor for that size.

    Returns:
        A :class:`LoadedModel` on the CPU in fp32.

    Raises:
        ModelLoadError: offline and not cached, unknown id, unreadable folder.
        ValueError: invalid image size for vit-tiny-scratch, or a size the checkpoint's family
            cannot be fine-tuned at (not ViT/DeiT, not a multiple of the patch size).
    """
    if len(classes) < 2:
        raise ValueError(f"A classifier needs at least 2 classes, got {len(classes)}")
    id2label = dict(enumerate(classes))
    if name == SCRATCH_MODEL:
        size = image_size or SCRATCH_DEFAULT_IMAGE_SIZE
        model = ViTForImageClassification(scratch_config(size, id2label))
        return LoadedModel(
            model,
            scratch_processor(size),
            head_reinitialized=True,
            notes=[f"vit-tiny-scratch: random ViT-Tiny at {size}x{size} px, patch {scratch_patch_size(size)}"],
        )
    if is_scratch_model(name):
        spec, size = scratch_model(name), image_size or SCRATCH_DEFAULT_IMAGE_SIZE
        model = AutoModelForImageClassification.from_config(spec.config(size, id2label))
        return LoadedModel(model, spec.processor(size), head_reinitialized=True,
                           notes=[f"{name}: random {spec.description.split(' (')[0]} at {size}x{size} px"])

    config = load_model_config(name)
    processor = _call_hub(AutoImageProcessor, name)

    native = processor_spec(processor).output_size
    resize = image_size is not None and (image_size, image_size) != native
    if resize:
        from .resolution import check_image_size

        check_image_size(config, image_size)  # before reading the weights
    # A distilled DeiT loads with one head (see vitft_app.families.model_class_for): its old heads
    # are not kept even when their classes match.
    keep_head = head_matches(config, classes) and not is_distilled_deit(config)
    model = _call_hub(
        model_class_for(config),
        name,
        num_labels=len(classes),
        id2label=id2label,
        label2id={c: i for i, c in id2label.items()},
        problem_type="single_label_classification",
        ignore_mismatched_sizes=True,
    )
    sync_label_names(model)
    notes = [f"Loaded pretrained weights from '{name}'"]
    if is_distilled_deit(config):
        notes.append("Distilled DeiT: the backbone and its distillation token are kept; one new head reads the CLS"
                     " token and the distillation head is dropped (no teacher in fine-tuning)")
    if not keep_head:
        reset_classifier(model)
        old = checkpoint_labels(config)
        if old is None:
            notes.append(f"New classification head for {len(classes)} classes (the checkpoint has none)")
        else:
            notes.append(
                f"Classification head re-initialized: checkpoint predicts {len(old)} classes,"
                f" this dataset has {len(classes)} with other names"
            )
    else:
        notes.append("Classification head kept: the checkpoint already predicts these classes")
    if resize:  # another resolution: position embeddings interpolated once (vitft_app.resolution)
        from .resolution import adapt_resolution

        processor, note = adapt_resolution(model, processor, image_size)
        notes.append(note)
    return LoadedModel(model, processor, head_reinitialized=not keep_head, notes=notes)


def reset_classifier(model: nn.Module) -> None:
    """Re-initializes the final linear head(s): truncated normal weights (std
    ``config.initializer_range``, as ViT's ``_init_weights``) and zero bias."""
    std = float(getattr(model.config, "initializer_range", 0.02))
    for attr in ("classifier", "cls_classifier", "distillation_classifier"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            with torch.no_grad():
                nn.init.trunc_normal_(head.weight, std=std)
                nn.init.zeros_(head.bias)


# --------------------------------------------------------------------------------------------
# Freezing
# --------------------------------------------------------------------------------------------


def has_cls_token(model: nn.Module) -> bool:
    """True when the model's embeddings prepend a CLS token (``embeddings.cls_token``), the token a
    ViT-style head classifies from and PatchDropout may keep while dropping patch tokens. False
    for families where dropping tokens is not possible (:attr:`vitft_app.families.ModelFamily.token_dropping`:
    BEiT's relative position bias is tied to the full grid; timm runs its own forward)."""
    family = family_of(model)
    if family is not GENERIC and not family.token_dropping:
        return False
    return getattr(encoder_parts(model)[0], "cls_token", None) is not None


def num_blocks(model: nn.Module) -> int:
    """Number of freeze units: encoder blocks, or stages of a hierarchical model (the largest
    freeze depth; see :mod:`vitft_app.families`)."""
    return num_freeze_units(model)


def freeze_layers(model: nn.Module, depth: int) -> None:
    """Freezes the first ``depth`` encoder blocks, or stages of a hierarchical model
    (``requires_grad=False``; the units of each family: :mod:`vitft_app.families`).

    ``depth = 0`` trains everything. ``depth >= 1`` also freezes the patch and position
    embeddings (they feed block 0). ``depth = number of blocks`` is a linear probe: the final
    LayerNorm is frozen as well, so only the classification head trains. For MobileViT the blocks
    are its 5 stages, the embeddings its convolutional stem and the final norm its 1x1 expansion
    convolution; for PVTv2 and Swin the blocks are its stages; for a timm checkpoint timm's
    parameter groups. BatchNorm layers in frozen parts keep their running statistics.

    Raises:
        ValueError: ``depth`` is negative or larger than the number of blocks.
    """
    frozen = set(map(id, apply_freeze_depth(model, depth)))
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                  and any(True for _ in m.parameters()) and all(id(p) in frozen for p in m.parameters())]
    _freeze_batchnorm(model, batchnorms)


def _keep_eval(module: nn.Module, _args: Any) -> None:
    module.train(False)


def _freeze_batchnorm(model: nn.Module, frozen: list[nn.Module]) -> None:
    """BatchNorm layers inside frozen modules run in eval mode (running statistics, never
    updated), as detectron2's ``FrozenBatchNorm2d``; others get their normal behaviour back.
    A forward pre-hook does it, so ``model.train()`` cannot undo it and nothing is saved."""
    frozen_ids = {id(m) for module in frozen for m in module.modules()}
    for module in model.modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        handle = getattr(module, "_vitft_frozen_hook", None)
        if id(module) in frozen_ids and handle is None:
            module._vitft_frozen_hook = module.register_forward_pre_hook(_keep_eval)
        elif id(module) not in frozen_ids and handle is not None:
            handle.remove()
            module._vitft_frozen_hook = None
            module.train(model.training)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Returns ``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


@dataclass(frozen=True)
class ModelSummary:
    """What the Train tab shows before a run: depth, parameter counts and the head decision."""

    num_blocks: int
    trainable_params: int
    total_params: int
    head_note: str
    has_cls_token: bool = True
    """Whether the embeddings prepend a CLS token (PatchDropout needs one)."""
    freeze_unit: str = "encoder blocks"
    """What one step of freeze depth freezes, plural: ``"encoder blocks"``, ``"stages"``, ``"timm groups"``."""

    def describe(self) -> str:
        """Markdown line for the UI."""
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        return (
            f"**{self.trainable_params:,} / {self.total_params:,}** parameters trainable ({share:.1f}%)"
            f" · {self.num_blocks} {self.freeze_unit} · {self.head_note}"
        )


def summarize_model(name: str, classes: list[str], freeze_depth: int, image_size: int | None = None) -> ModelSummary:
    """Counts trainable / total parameters for a freeze depth without loading weights.

    The model is instantiated on PyTorch's ``meta`` device from its config, so this is fast even
    for ViT-Base. ``freeze_depth`` is clipped to the number of blocks.

    Raises:
        ModelLoadError: the config cannot be loaded (offline and not cached, unknown id).
        ValueError: invalid image size for vit-tiny-scratch.
    """
    n = max(len(classes), 2)
    id2label = dict(enumerate(classes)) if classes else {0: "LABEL_0", 1: "LABEL_1"}
    if is_scratch_model(name):
        config = scratch_model(name).config(image_size or SCRATCH_DEFAULT_IMAGE_SIZE, id2label)
        head_note = "random weights, new head"
    else:
        config = copy.deepcopy(load_model_config(name))
        keep = head_matches(config, classes)
        config.num_labels = n
        head_note = "head kept" if keep else f"head re-initialized for {n} classes"
    model_class = model_class_for(config)
    with torch.device("meta"):
        if model_class is AutoModelForImageClassification:
            model = model_class.from_config(config)
        else:
            model = model_class(config)
    blocks = num_blocks(model)
    freeze_layers(model, min(freeze_depth, blocks))
    trainable, total = count_parameters(model)
    return ModelSummary(blocks, trainable, total, head_note, has_cls_token(model), freeze_unit_name(model))
