"""Fine-tuning a pretrained ViT at another resolution than it was trained at.

A ViT's learned position embeddings form a grid of ``(image_size / patch_size)^2`` vectors (plus
the CLS token's, and DeiT's distillation token's). At another input size the grid is resized by
bicubic interpolation, as in DeiT and "How to train your ViT?" (Steiner et al. 2021) for
fine-tuning at 384 px; transformers offers the same on the fly with the forward argument
``interpolate_pos_encoding=True``.

Here the table is interpolated **once, at load**, with the model's own
``embeddings.interpolate_pos_encoding`` (so the numbers equal the on-the-fly ones), and the
result replaces the parameter: the model then runs natively at the new size, and fine-tuning
adapts the interpolated table itself. The choice matters for what comes after training: the saved
``config.json`` says the new ``image_size``, its position table has the new shape, and the saved
image processor resizes to the new size, so ``pipeline()``, :mod:`vitft_app.predict` and the ONNX
export (which traces one plain ``model(pixel_values)`` call) work at the new size without extra
arguments. On-the-fly interpolation would need ``interpolate_pos_encoding=True`` in every one of
those callers (``pipeline()`` does not pass it) and would interpolate again at every forward.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: ``config.model_type`` values whose absolute position embeddings are resized here.
RESIZABLE_MODEL_TYPES = ("vit", "deit")


def check_image_size(model_config: Any, image_size: int) -> None:
    """Refuses an image size a pretrained checkpoint cannot be fine-tuned at (reads only its config).

    Args:
        model_config: the checkpoint's ``PretrainedConfig``.
        image_size: the requested square input size, pixels.

    Raises:
        ValueError: the model family has no resizable position table, or the size is not a
            multiple of the patch size.
    """
    model_type = getattr(model_config, "model_type", "")
    if model_type not in RESIZABLE_MODEL_TYPES:
        raise ValueError(
            f"image_size for a pretrained model is supported for ViT and DeiT checkpoints (interpolated position"
            f" embeddings); this one is '{model_type}'. Leave image size empty to use its own size."
        )
    patch = int(getattr(model_config, "patch_size", 16))
    if image_size % patch:
        lower, upper = image_size // patch * patch, (image_size // patch + 1) * patch
        raise ValueError(
            f"image_size must be a multiple of the model's patch size {patch}, got {image_size}"
            f" (try {lower if lower >= 32 else upper} or {upper})"
        )


def resize_processor(processor: Any, image_size: int) -> Any:
    """A copy of the image processor that outputs ``image_size x image_size`` pixels.

    A processor that resizes then center-crops (DeiT: resize 256, crop 224) keeps its resize/crop
    ratio: resize ``round(old_resize * image_size / old_crop)``, crop ``image_size``.

    Args:
        processor: a transformers image processor.
        image_size: target size, pixels.

    Returns:
        A new processor of the same class (the original is untouched).
    """
    values = processor.to_dict()
    size = dict(values.get("size") or {})
    crop = dict(values.get("crop_size") or {}) if values.get("do_center_crop") else {}
    current = int(crop.get("height") or size.get("height") or size.get("shortest_edge") or image_size)
    scale = image_size / current
    if "height" in size and "width" in size:
        size = {"height": round(size["height"] * scale), "width": round(size["width"] * scale)}
    elif "shortest_edge" in size:
        size = {"shortest_edge": round(size["shortest_edge"] * scale)}
    values["size"] = size
    if crop:
        values["crop_size"] = {"height": image_size, "width": image_size}
    values.pop("processor_class", None)
    return type(processor).from_dict(values)


def resize_position_embeddings(model: nn.Module, image_size: int) -> int:
    """Interpolates a ViT/DeiT model's position embeddings to ``image_size`` in place and sets
    ``config.image_size``, so the model (and its ``save_pretrained`` copy) runs at that size.

    Args:
        model: a ``ViTForImageClassification`` / ``DeiTForImageClassification*`` (any model whose
            embeddings have ``position_embeddings``, ``interpolate_pos_encoding`` and
            ``patch_embeddings``).
        image_size: new square input size, pixels (a multiple of the patch size).

    Returns:
        The previous image size, pixels.

    Raises:
        ValueError: the model has no absolute position table to resize.
    """
    base = getattr(model, "base_model", model)
    embeddings = getattr(base, "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    patches = getattr(embeddings, "patch_embeddings", None)
    if not isinstance(table, nn.Parameter) or patches is None or not hasattr(embeddings, "interpolate_pos_encoding"):
        raise ValueError(f"{type(model).__name__} has no absolute position embeddings to interpolate")
    old_size = int(model.config.image_size)
    patch = int(model.config.patch_size)
    old_patches = (old_size // patch) ** 2
    extra_tokens = table.shape[1] - old_patches  # CLS (+ DeiT's distillation token)
    new_patches = (image_size // patch) ** 2
    with torch.no_grad():
        probe = table.new_zeros(1, new_patches + extra_tokens, table.shape[-1])
        new_table = embeddings.interpolate_pos_encoding(probe, image_size, image_size).detach().clone()
    embeddings.position_embeddings = nn.Parameter(new_table, requires_grad=table.requires_grad)
    for module in (embeddings, patches):  # the size checks in their forward passes
        if isinstance(getattr(module, "image_size", None), (tuple, list)):
            module.image_size = (image_size, image_size)
        elif isinstance(getattr(module, "image_size", None), int):
            module.image_size = image_size
    if hasattr(patches, "num_patches"):
        patches.num_patches = new_patches
    model.config.image_size = image_size
    return old_size


def adapt_resolution(model: nn.Module, processor: Any, image_size: int) -> tuple[Any, str]:
    """Makes a loaded pretrained model and its processor work at ``image_size``.

    Returns:
        ``(the new processor, a note for the run log)``.

    Raises:
        ValueError: as :func:`check_image_size` and :func:`resize_position_embeddings`.
    """
    check_image_size(model.config, image_size)
    old = resize_position_embeddings(model, image_size)
    grid = image_size // int(model.config.patch_size)
    note = (f"Image size {image_size} px (the checkpoint's is {old}): position embeddings interpolated (bicubic) to a"
            f" {grid}x{grid} patch grid; the saved model and processor keep {image_size} px")
    logger.info(note)
    return resize_processor(processor, image_size), note
