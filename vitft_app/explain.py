"""Explanations next to a prediction: attention rollout for ViT models, input-gradient saliency
where attention maps are not available."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .families import explain_method
from .images import ImageSource, load_image


@dataclass(frozen=True)
class Explanation:
    """A relevance map for one image.

    Attributes:
        method: ``"attention rollout"`` or ``"input gradient"``.
        grid: float32 ``(rows, cols)`` relevance, non-negative, summing to 1. For attention
            rollout ``(H / patch, W / patch)``: one value per patch, in row-major patch order.
        overlay: the image with the map blended over it (RGB, the image's size).
        label: the class the map explains (the top-1 prediction).
    """

    method: str
    grid: np.ndarray
    overlay: Image.Image
    label: str


def attention_rollout(attentions: tuple[torch.Tensor, ...], grid_shape: tuple[int, int]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

    Each layer's attention is averaged over heads, the identity is added for the residual path
    (``0.5 * A + 0.5 * I``), rows are renormalized, and the layers are multiplied from the first to
    the last. The CLS token's row, without the CLS column (and without any other extra tokens before
    the patches), is the relevance of each patch, renormalized to sum to 1.

    Args:
        attentions: per layer, ``(batch, heads, tokens, tokens)`` with the CLS token first and the
            patches last (``tokens = extra + rows * cols``).
        grid_shape: ``(rows, cols)`` of the patch grid.

    Returns:
        float32 ``(batch, rows, cols)``, each map summing to 1.
    """
    rows, cols = grid_shape
    rollout = None
    for layer in attentions:
        fused = layer.float().mean(dim=1)  # (batch, tokens, tokens)
        eye = torch.eye(fused.shape[-1], device=fused.device).expand_as(fused)
        fused = 0.5 * fused + 0.5 * eye
        fused = fused / fused.sum(dim=-1, keepdim=True)
        rollout = fused if rollout is None else fused @ rollout
    patches = rollout[:, 0, -rows * cols :]
    patches = patches / patches.sum(dim=-1, keepdim=True)
    return patches.reshape(-1, rows, cols)


def _overlay(image: Image.Image, grid: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blends a relevance grid (stretched to 0..1, blue = low, red = high) over the image."""
    heat = grid - grid.min()
    heat = heat / heat.max() if heat.max() > 0 else heat
    small = Image.fromarray((heat * 255).astype(np.uint8), mode="L").resize(image.size, Image.Resampling.BILINEAR)
    h = np.asarray(small, dtype=np.float32) / 255.0
    colour = np.stack([h, 1.0 - np.abs(h - 0.5) * 2, 1.0 - h], axis=-1) * 255
    blended = (1 - alpha) * np.asarray(image, dtype=np.float32) + alpha * colour
    return Image.fromarray(blended.clip(0, 255).astype(np.uint8), mode="RGB")


def _patch_size(model: torch.nn.Module) -> int | None:
    """The square patch size of a ViT-style model, or None (then the gradient map is used)."""
    patch = getattr(model.config, "patch_size", None)
    if isinstance(patch, (list, tuple)):
        patch = patch[0] if len(set(patch)) == 1 else None
    return patch if isinstance(patch, int) and patch > 0 else None


def _has_patch_tokens(model: torch.nn.Module) -> bool:
    """True for ViT-style models (``embeddings.patch_embeddings``: one token per patch), whose
    attentions attention rollout can read; False for hierarchical models such as PVTv2 or MobileViT."""
    base = getattr(model, "base_model", model)
    return getattr(getattr(base, "embeddings", None), "patch_embeddings", None) is not None


def explain_image(predictor, image: ImageSource) -> Explanation:
    """Explains the top-1 prediction of a PyTorch :class:`~vitft_app.predict.Predictor`.

    Families with a CLS token and one token per patch (ViT, DeiT, BEiT, DINOv2; see
    :func:`vitft_app.families.explain_method`): attention rollout on the patch grid, with the
    model switched to eager attention for this forward pass (SDPA returns no attention weights).
    Other models (Swin, PVTv2, MobileViT, timm checkpoints, ...): the absolute input gradient of the top logit, max over colour channels,
    normalized to sum 1 (Simonyan et al. 2014).

    Args:
        predictor: a loaded ``Predictor`` (``.model``, ``.transform``, ``.id2label``).
        image: a path, bytes, file object or PIL image (read with ``load_image``).

    Returns:
        An :class:`Explanation` of the image's top-1 class.

    Raises:
        ImageLoadError: the image cannot be read.
    """
    rgb = load_image(image)
    pixels = predictor.transform(rgb).unsqueeze(0).to(predictor.plan.device)
    model = predictor.model
    patch = _patch_size(model) if explain_method(model) == "attention rollout" and _has_patch_tokens(model) else None
    if patch and hasattr(model, "set_attn_implementation"):
        previous = model.config._attn_implementation
        try:
            model.set_attn_implementation("eager")
            with torch.inference_mode():
                out = model(pixel_values=pixels, output_attentions=True)
        finally:
            model.set_attn_implementation(previous)
        if getattr(out, "attentions", None):
            height, width = pixels.shape[-2:]
            grid = attention_rollout(out.attentions, (height // patch, width // patch))[0].cpu().numpy()
            label = predictor.id2label[int(out.logits.argmax(-1))]
            view = rgb.resize((width, height)) if rgb.size != (width, height) else rgb
            return Explanation("attention rollout", grid, _overlay(view, grid), label)
    pixels = pixels.clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(pixel_values=pixels).logits
        top = int(logits.argmax(-1))
        logits[0, top].backward()
    saliency = pixels.grad.abs().amax(dim=1)[0].float()
    total = saliency.sum()
    # An all-zero gradient (a saturated or dead network) gives a uniform map, not NaN.
    grid = (saliency / total if total > 0 else torch.full_like(saliency, 1.0 / saliency.numel())).cpu().numpy()
    height, width = pixels.shape[-2:]
    return Explanation("input gradient", grid, _overlay(rgb.resize((width, height)), grid), predictor.id2label[top])
