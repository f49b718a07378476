"""Batch-level training regularizers: MixUp/CutMix (torchvision), patch masking and PatchDropout
(token dropping), plus the augmentation preview the Train tab shows. Per-image augmentation lives in
:func:`vitft_app.data.build_transforms`."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torchvision.transforms import v2
from PIL import Image
from .data import build_transforms, processor_spec
from .images import ImageLoadError, load_image
from .modeling import encoder_parts, has_cls_token

BatchMixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def create_batch_mixer(mixup: float, cutmix: float, num_classes: int) -> BatchMixer | None:
    """MixUp and/or CutMix over a batch, from ``torchvision.transforms.v2``.

    When both alphas are positive, ``v2.RandomChoice`` picks one of the two per batch with equal
    probability (the DeiT/timm recipe with ``switch_prob=0.5``).

    Args:
        mixup: MixUp alpha (mixing weight drawn from Beta(alpha, alpha)); 0 = off.
        cutmix: CutMix alpha; 0 = off.
        num_classes: number of classes C of the one-hot targets.

    Returns:
        ``mixer(pixels (B, 3, H, W) float, labels (B,) int64) -> (pixels, targets (B, C) float32)``
        whose target rows sum to 1, or None when both are off.
    """
    mixers: list[Any] = []
    if mixup > 0:
        mixers.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        mixers.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    if not mixers:
        return None
    choice = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

    def mix(pixels: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixed, targets = choice(pixels, labels)
        return mixed, targets.float()

    return mix


def patch_mask(
    batch_size: int,
    grid: tuple[int, int],
    ratio: float,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random patch mask: for each image, exactly ``round(ratio * patches)`` grid cells chosen
    uniformly without replacement (the ``argsort(rand)`` trick of MAE's random masking).

    Args:
        batch_size: B.
        grid: ``(rows, cols)`` of the model's patch grid (image size // patch size).
        ratio: fraction of patches to mask, in [0, 1).
        device: where the mask lives.
        generator: optional RNG (default: the global one, saved in checkpoints).

    Returns:
        bool tensor ``(B, rows, cols)``, True where a patch is hidden.
    """
    rows, cols = grid
    count = int(round(ratio * rows * cols))
    noise = torch.rand(batch_size, rows * cols, device=device, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # rank of each patch's noise within its image
    return (ranks < count).view(batch_size, rows, cols)


def mask_patches(
    pixels: torch.Tensor, patch_size: int, ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hides a random fraction of each image's patches, aligned to the ViT patch grid.

    The image-side twin of BERT's masked tokens, used here as a regularizer: a hidden patch is
    set to 0 in normalized space, i.e. the dataset mean colour, so its patch embedding carries
    no image content. Pixels beyond the last full patch (image size not a multiple of the patch
    size) are never masked, exactly as the patch embedding ignores them.

    Args:
        pixels: float ``(B, 3, H, W)``, normalized.
        patch_size: the model's patch size P in pixels.
        ratio: fraction of patches to hide, in [0, 1); 0 returns the input unchanged.
        generator: optional RNG.

    Returns:
        ``(masked pixels (B, 3, H, W), mask bool (B, H // P, W // P))``.
    """
    batch, _, height, width = pixels.shape
    grid = (height // patch_size, width // patch_size)
    mask = patch_mask(batch, grid, ratio, pixels.device, generator)
    if ratio <= 0:
        return pixels, mask
    full = mask.repeat_interleave(patch_size, dim=1).repeat_interleave(patch_size, dim=2)
    pixel_mask = torch.zeros(batch, height, width, dtype=torch.bool, device=pixels.device)
    pixel_mask[:, : full.shape[1], : full.shape[2]] = full
    return pixels.masked_fill(pixel_mask.unsqueeze(1), 0.0), mask


def drop_patch_tokens(tokens: torch.Tensor, keep: int, num_prefix: int) -> torch.Tensor:
    """Keeps the prefix tokens (CLS, ...) and a random subset of ``keep`` patch tokens per image.

    PatchDropout (Liu et al. 2022, "PatchDropout: Economizing Vision Transformers Using Patch
    Dropout"), as timm's ``PatchDropout``: the subset is drawn uniformly without replacement,
    independently per image, from the global RNG (so checkpoints restore it); position embeddings
    were already added, so every kept token still knows where it came from.

    Args:
        tokens: ``(B, num_prefix + N, D)`` embeddings output.
        keep: patch tokens kept per image, 1 <= keep <= N.
        num_prefix: leading tokens always kept (1 for ViT's CLS token).

    Returns:
        ``(B, num_prefix + keep, D)``, same dtype and device.
    """
    batch, total, dim = tokens.shape
    order = torch.rand(batch, total - num_prefix, device=tokens.device).argsort(dim=1)[:, :keep]
    kept = tokens[:, num_prefix:].gather(1, order.unsqueeze(-1).expand(-1, -1, dim))
    return torch.cat([tokens[:, :num_prefix], kept], dim=1)


class PatchDropout:
    """Drops a fraction of the patch tokens after a ViT's embeddings, only inside :meth:`applied`.

    Installed as a forward hook on the model's embeddings module, so the model code is unchanged
    and evaluation, prediction, feature caching and the distillation teacher (which never enter
    :meth:`applied`) see every token. The classifier reads the CLS token, which is always kept.
    Per-step FLOPs fall roughly in proportion to the tokens dropped (attention quadratically).

    Args:
        model: a ViT-style classifier whose embeddings output ``(B, prefix + N, D)`` with a
            ``cls_token`` (and optional ``distillation_token``/``register_tokens``) first.
        rate: fraction of patch tokens dropped per image, in (0, 1); ``round((1 - rate) * N)``
            (at least 1) are kept.

    Raises:
        ValueError: the model has no CLS token to classify from (dropping tokens would change
            what the head reads).
    """

    def __init__(self, model: nn.Module, rate: float) -> None:
        embeddings = encoder_parts(model)[0]
        if not 0 < rate < 1:
            raise ValueError(f"patch_dropout must be in (0, 1) to install it, got {rate}")
        if not has_cls_token(model):
            raise ValueError(
                f"patch_dropout needs a model that classifies from a CLS token; {type(model).__name__} has none."
                " Set patch_dropout to 0."
            )
        registers = getattr(embeddings, "register_tokens", None)
        self.num_prefix = 1 + int(getattr(embeddings, "distillation_token", None) is not None) + (
            int(registers.shape[1]) if isinstance(registers, torch.Tensor) else 0
        )
        self.rate = rate
        self.active = False
        self._handle = embeddings.register_forward_hook(self._hook)

    def keep_count(self, num_patches: int) -> int:
        """Patch tokens kept out of ``num_patches``: ``max(1, round((1 - rate) * num_patches))``."""
        return max(1, int(round((1 - self.rate) * num_patches)))

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if not self.active:
            return output
        tokens = output[0] if isinstance(output, tuple) else output
        dropped = drop_patch_tokens(tokens, self.keep_count(tokens.shape[1] - self.num_prefix), self.num_prefix)
        return (dropped, *output[1:]) if isinstance(output, tuple) else dropped

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Context in which forward passes drop tokens (the training forward)."""
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def remove(self) -> None:
        """Removes the hook; the model sees every token again."""
        self._handle.remove()


def denormalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undoes ``Normalize(mean, std)`` and returns uint8 ``(B, H, W, 3)`` for display."""
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    images = (pixels.float() * std_t + mean_t).clamp(0, 1)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def preview_augmentations(
    image_paths: Sequence[str],
    processor: Any,
    *,
    patch_size: int,
    augment: str = "basic",
    crop_scale_min: float = 0.08,
    color_jitter: float = 0.0,
    random_erasing: float = 0.0,
    mixup: float = 0.0,
    cutmix: float = 0.0,
    patch_mask_ratio: float = 0.0,
    copies: int = 4,
    seed: int = 0,
) -> list[tuple[Any, str]]:
    """Augmented versions of a few images with the given training settings, for a gallery.

    Runs exactly the training pipeline: :func:`~vitft_app.data.build_transforms` per image, then
    MixUp/CutMix across the preview batch (labels are the image indices) and patch masking.

    Args:
        image_paths: a few dataset images.
        processor: the model's image processor (size, mean, std).
        patch_size: the model's patch size, for the mask grid.
        augment, crop_scale_min, color_jitter, random_erasing, mixup, cutmix, patch_mask_ratio:
            the :class:`~vitft_app.config.TrainConfig` fields of the same names.
        copies: augmented versions per image.
        seed: RNG seed, so the same settings give the same preview.

    Returns:
        ``[(PIL image, caption), ...]``: ``copies`` per image, images that fail to load skipped.
    """

    spec = processor_spec(processor)
    transform = build_transforms(processor, True, augment, crop_scale_min, color_jitter, random_erasing)
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        tensors, captions = [], []
        for index, path in enumerate(image_paths):
            try:
                image = load_image(path)
            except ImageLoadError:
                continue
            for copy in range(copies):
                tensors.append(transform(image))
                captions.append(f"image {index + 1}, version {copy + 1}")
        if not tensors:
            return []
        pixels = torch.stack(tensors)
        mixer = create_batch_mixer(mixup, cutmix, num_classes=len(tensors))
        if mixer is not None:
            pixels, targets = mixer(pixels, torch.arange(len(tensors)))
            captions = [
                f"{c} (mixed {int(t.gt(0).sum())} images)" if t.gt(0).sum() > 1 else c for c, t in zip(captions, targets)
            ]
        pixels, _ = mask_patches(pixels, patch_size, patch_mask_ratio)
    finally:
        torch.set_rng_state(state)
    arrays = denormalize(pixels, spec.mean, spec.std).numpy()
    return [(Image.fromarray(a), c) for a, c in zip(arrays, captions)]
