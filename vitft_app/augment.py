"""Batch-level training regularizers: MixUp/CutMix (torchvision) and patch masking, plus the
augmentation preview the Train tab shows. Per-image augmentation lives in
:func:`vitft_app.data.build_transforms`."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torchvision.transforms import v2

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
    from PIL import Image

    from .data import build_transforms, processor_spec
    from .images import ImageLoadError, load_image

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
