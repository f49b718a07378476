"""Decode cache: decoded, resized images kept as ``uint8`` CHW tensors, so every epoch after the
first skips JPEG/PNG decoding and the expensive resize.

Entries live in memory up to a byte budget; entries beyond it are written to disk (one ``.npy``
file each, atomically) in a cache folder and read back per access (one small copy, served from
the OS page cache when it is warm; nothing of it is kept), so a 50,000-image folder
works on a 24 GiB machine (at 224 px an entry is ``3 * 224 * 224 = 150,528`` bytes: 50,000 images
are 7.0 GiB in all, of which only the budget stays resident; the rest is in the OS page cache or
on disk).

Cache key: ``(real path, file size in bytes, mtime in ns, target)`` where ``target`` names the
resize/crop/draft recipe, so an edited file or another image size never returns a stale tensor.

What the cache stores is the first half of :class:`vitft_app.data.EvalTransform` (the resize and
center crop, as ``uint8``) and :func:`tensor_transform` is its second half, so
``CachedImageDataset`` with :func:`tensor_transform` gives **the same float tensors bit for bit**
as ``ImageDataset`` with the eval transform. For ``augment="basic"`` the
cache keeps a larger image (shorter side ``augment_side``) and the random crop and flip run on the
cached tensor every epoch (see :func:`tensor_transform`).

Thread safety: one lock guards the index; decoding runs outside it, so two threads may decode the
same file once each (harmless). DataLoader worker *processes* each hold their own memory tier; the
disk tier is shared between them (files are written to a temp name then ``os.replace``-d), so with
``num_workers > 0`` prefer a small memory budget and let the page cache share the disk tier.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from .data import EvalTransform, ImageDataset, resize_transform
from .images import ImageLoadError, load_image

#: Default in-memory budget: 2 GiB (about 14,000 images at 224 px).
DEFAULT_MEMORY_BUDGET_BYTES = 2 * 1024**3
#: The memory tier packs entries into slabs of this size. Kept as separate ~150 KB allocations,
#: cached images sit between the short-lived buffers of decoding, and glibc's heap could not
#: return the holes: RSS grew ~4x the tier (measured with ``benchmarks/bench_scale.py``). A
#: 64 MiB slab is above glibc's largest mmap threshold (32 MiB), so it is its own mapping.
SLAB_BYTES = 64 * 1024**2


class _SlabStore:
    """Copies ``uint8`` tensors into large preallocated slabs and returns views of them."""

    def __init__(self, slab_bytes: int = SLAB_BYTES) -> None:
        self.slab_bytes = slab_bytes
        self._slabs: list[torch.Tensor] = []
        self._used = slab_bytes  # no slab yet: the first store allocates one

    @property
    def reserved_bytes(self) -> int:
        """Bytes of slabs allocated (at most one slab more than the bytes stored)."""
        return len(self._slabs) * self.slab_bytes

    def store(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of ``tensor`` (uint8) living in a slab; a tensor larger than a slab (or not uint8)
        is returned as it is (it is already its own allocation)."""
        size = tensor.numel()
        if tensor.dtype != torch.uint8 or size > self.slab_bytes:
            return tensor
        # Validation fills the cache inside torch.inference_mode(): a slab made there would be an
        # inference tensor, and training (outside it) could then not copy into it. Slabs and their
        # views are always normal tensors.
        with torch.inference_mode(False):
            if self._used + size > self.slab_bytes:
                self._slabs.append(torch.empty(self.slab_bytes, dtype=torch.uint8))
                self._used = 0
            view = self._slabs[-1][self._used : self._used + size].view(tensor.shape)
            view.copy_(tensor)
        self._used += size
        return view

    def clear(self) -> None:
        self._slabs.clear()
        self._used = self.slab_bytes


@dataclass(frozen=True)
class DecodeRecipe:
    """How a file becomes the cached ``uint8`` tensor.

    Attributes:
        resize: ``(height, width)`` or a shortest-edge int (torchvision ``Resize`` semantics), or
            None: the decoded image as it is (:func:`decoded_recipe`).
        crop: ``(height, width)`` center crop after the resize, or None.
        interpolation: torchvision ``InterpolationMode`` name (``"BILINEAR"``, ``"BICUBIC"``...).
        draft_size: ``(width, height)`` passed to :func:`~vitft_app.images.load_image` (JPEG
            draft decoding), or None.
        spill: entries beyond the memory budget go to the disk tier (True) or are not cached
            and decoded again at every access (False: a decoded photo can be tens of MB, too
            big to write out per image). Not part of :attr:`key`.
    """

    resize: tuple[int, int] | int | None
    crop: tuple[int, int] | None
    interpolation: str = "BILINEAR"
    draft_size: tuple[int, int] | None = None
    spill: bool = True

    @property
    def key(self) -> str:
        """A short string naming the recipe (part of the cache key and of the file names)."""
        return f"r{self.resize}-c{self.crop}-{self.interpolation}-d{self.draft_size}"

    def pil_transform(self) -> Callable[[Image.Image], Image.Image]:
        """The PIL resize (+ center crop) of this recipe: :func:`vitft_app.data.resize_transform`,
        the first half of the eval transform; the identity when ``resize`` is None."""
        if self.resize is None:
            return lambda image: image
        return resize_transform(self.resize, self.crop, self.interpolation)


def recipe_from_spec(spec: Any, augment: str = "none", augment_side: int | None = None) -> DecodeRecipe:
    """The recipe for a :class:`~vitft_app.data.ProcessorSpec`.

    Args:
        spec: ``processor_spec(processor)``.
        augment: ``"none"``: cache the exact model input (resize + crop). ``"basic"``: cache the
            image with its shorter side resized to ``augment_side`` (aspect kept), for a random
            resized crop on top.
        augment_side: shorter side cached for augmentation, pixels; default
            ``ceil(max(output) / 0.875)`` (256 for 224 px, the timm/ImageNet eval ratio).

    Returns:
        A :class:`DecodeRecipe` whose JPEG draft never goes below the cached size.
    """
    out_h, out_w = spec.output_size
    if augment == "none":
        return DecodeRecipe(spec.resize, spec.crop, spec.interpolation, (out_w, out_h))
    side = augment_side or -(-max(out_h, out_w) * 8 // 7)
    return DecodeRecipe(int(side), None, spec.interpolation, (side, side))


def decoded_recipe(draft_size: tuple[int, int] | None) -> DecodeRecipe:
    """The recipe that caches a file exactly as :func:`~vitft_app.images.load_image` returns it
    (JPEG draft decoding at ``draft_size``, no resize; ``uint8 (H, W, 3)``, the PIL image's own
    layout, so turning it back into a PIL image is one copy), for randomly augmented training: the
    random transforms then run on :func:`as_pil` of the cached tensor every epoch, and see the
    same pixels as when the file is decoded each time (bit for bit, same random draws). Entries
    beyond the memory budget are not cached (``spill=False``).

    Args:
        draft_size: ``(width, height)``, what the uncached training set passes to ``load_image``.
    """
    return DecodeRecipe(None, None, "BILINEAR", draft_size, spill=False)


def as_pil(pixels: torch.Tensor) -> Image.Image:
    """``uint8 (H, W, 3)`` tensor from :func:`decode_to_uint8` with :func:`decoded_recipe` -> the RGB
    PIL image it was made from (a copy: transforms may keep or change it freely)."""
    return Image.fromarray(pixels.numpy())


class ThroughPil:
    """A PIL-image transform applied to a cached ``uint8 (H, W, 3)`` tensor via :func:`as_pil`.

    Args:
        transform: PIL image -> float tensor, e.g. :func:`vitft_app.data.build_transforms`'s
            training transform.
    """

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.transform(as_pil(pixels))


def file_key(path: str | os.PathLike, recipe: DecodeRecipe) -> tuple[str, int, int, str]:
    """``(real path, size in bytes, mtime in ns, recipe key)``.

    Raises:
        OSError: the file cannot be stat-ed.
    """
    real = os.path.realpath(os.fspath(path))
    st = os.stat(real)
    return (real, st.st_size, st.st_mtime_ns, recipe.key)


def decode_to_uint8(path: str | os.PathLike, recipe: DecodeRecipe) -> torch.Tensor:
    """Decodes through the one loader and applies the recipe's resize/crop.

    Returns:
        ``uint8`` tensor ``(3, H, W)``, contiguous; ``(H, W, 3)`` for a recipe without resize
        (:func:`decoded_recipe`: it goes back to PIL, whose layout that is; transposing there
        and back cost 0.5-0.8 s per epoch of 245 hymenoptera photos).

    Raises:
        ImageLoadError: the image cannot be read.
    """
    image = recipe.pil_transform()(load_image(path, draft_size=recipe.draft_size))
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    if recipe.resize is None:
        return torch.from_numpy(np.array(array))  # a writable copy
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class DecodeCache:
    """Memory tier (up to ``memory_budget_bytes``) plus a disk tier for the rest.

    Entries are not evicted: under a shuffled epoch every image is read once per epoch, so an
    LRU would thrash; keeping the first images that fit and spilling the others is the better use
    of a fixed budget.

    The memory tier packs entries into 64 MiB slabs (:data:`SLAB_BYTES`), so its resident size
    is the bytes stored plus at most one partly filled slab.

    Args:
        cache_dir: folder of the disk tier (created on first spill), e.g. ``run_dir / "decode-cache"``
            or ``<VITFT_HOME>/cache/decoded``; None keeps everything in memory (no budget).
        memory_budget_bytes: bytes of tensors kept in memory; 0 sends everything to disk.

    Attributes:
        hits, misses, spilled: counters (ints) for tests and logs.
    """

    def __init__(self, cache_dir: str | os.PathLike | None, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES):
        if memory_budget_bytes < 0:
            raise ValueError(f"memory_budget_bytes must be >= 0, got {memory_budget_bytes}")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.memory_budget_bytes = memory_budget_bytes if cache_dir is not None else None
        self._memory: dict[tuple, torch.Tensor] = {}
        self._slabs = _SlabStore()
        self._on_disk: set[tuple] = set()
        self._lock = threading.Lock()
        self.memory_bytes = 0
        self.hits = self.misses = self.spilled = 0

    def _disk_path(self, key: tuple) -> Path:
        assert self.cache_dir is not None
        digest = hashlib.sha1(repr(key).encode("utf-8")).hexdigest()
        return self.cache_dir / digest[:2] / f"{digest}.npy"

    def get(self, path: str | os.PathLike, recipe: DecodeRecipe) -> torch.Tensor:
        """The cached ``uint8`` tensor of ``path`` (layout as :func:`decode_to_uint8`), decoding it on a miss.

        The returned tensor is shared with the cache: do not modify it in place.

        Raises:
            ImageLoadError: the file cannot be read (nothing is cached then).
        """
        try:
            key = file_key(path, recipe)
        except OSError as exc:
            raise ImageLoadError(os.fspath(path), f"unreadable ({exc.strerror or exc})") from exc
        with self._lock:
            cached = self._memory.get(key)
            on_disk = key in self._on_disk
        if cached is not None:
            self.hits += 1
            return cached
        if self.cache_dir is not None and (on_disk or self._disk_path(key).is_file()):
            try:
                tensor = torch.from_numpy(np.load(self._disk_path(key), mmap_mode="r").copy())
                with self._lock:
                    self._on_disk.add(key)
                self.hits += 1
                return tensor
            except (OSError, ValueError):
                pass  # a half-written or foreign file: decode again below
        tensor = decode_to_uint8(path, recipe)
        self.misses += 1
        size = tensor.numel() * tensor.element_size()
        with self._lock:
            # Another thread may have decoded the same file meanwhile: keep one copy, counted once.
            existing = self._memory.get(key)
            if existing is not None:
                return existing
            fits = self.memory_budget_bytes is None or self.memory_bytes + size <= self.memory_budget_bytes
            if fits:
                tensor = self._slabs.store(tensor)
                self._memory[key] = tensor
                self.memory_bytes += size
            spilled_already = key in self._on_disk
        if not fits and not spilled_already and recipe.spill:
            self._spill(key, tensor)
        return tensor

    def _spill(self, key: tuple, tensor: torch.Tensor) -> None:
        target = self._disk_path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, tensor.numpy())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        with self._lock:
            self._on_disk.add(key)
            self.spilled += 1

    def __len__(self) -> int:
        with self._lock:
            return len(self._memory) + len(self._on_disk)

    def clear(self) -> None:
        """Drops the memory tier (the disk tier's files stay for the next run)."""
        with self._lock:
            self._memory.clear()
            self._slabs.clear()
            self.memory_bytes = 0


def tensor_transform(spec: Any, train: bool = False, augment: str = "none") -> Callable[[torch.Tensor], torch.Tensor]:
    """The rest of the pipeline, on a cached ``uint8 (3, H, W)`` tensor.

    ``augment="none"`` (or evaluation): rescale to [0, 1] and normalize:
    :meth:`vitft_app.data.EvalTransform.normalize`, the second half of the eval transform. ``"basic"`` training: ``RandomResizedCrop`` to the
    model size (scale (0.08, 1), ratio (3/4, 4/3), torchvision defaults) and a horizontal flip on
    the cached tensor, then the same tail.

    Args:
        spec: ``processor_spec(processor)``.
        train: True for the training split.
        augment: ``"none"`` or ``"basic"``.

    Returns:
        ``uint8 (3, H, W)`` -> ``float32 (3, out_h, out_w)``.
    """
    normalize = EvalTransform(spec).normalize
    if train and augment == "basic":
        mode = InterpolationMode[spec.interpolation]
        head = [v2.RandomResizedCrop(spec.output_size, interpolation=mode, antialias=True), v2.RandomHorizontalFlip()]
        return v2.Compose(head + [normalize])
    return normalize


class CachedImageDataset(ImageDataset):
    """Drop-in for :class:`vitft_app.data.ImageDataset` that reads through a :class:`DecodeCache`.

    Yields ``(float32 (3, H, W), target)`` or ``None`` for a file that fails to load, so
    :func:`vitft_app.data.collate_skipping_failures` works unchanged; targets as ``ImageDataset``.

    Args:
        items: ``ImageItem`` s, e.g. ``report.val``.
        cache: the shared :class:`DecodeCache`.
        recipe: from :func:`recipe_from_spec`.
        transform: ``uint8`` tensor -> float tensor, from :func:`tensor_transform`.
        num_classes: multi-hot float targets of this length (multi-label), else the class index.
    """

    def __init__(
        self,
        items: Sequence[Any],
        cache: DecodeCache,
        recipe: DecodeRecipe,
        transform: Callable[[torch.Tensor], torch.Tensor],
        num_classes: int | None = None,
    ):
        super().__init__(items, transform, None, num_classes)
        self.cache = cache
        self.recipe = recipe

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor] | None:
        item = self.items[index]
        try:
            pixels = self.cache.get(item.path, self.recipe)
        except ImageLoadError:
            return None
        return self.transform(pixels), self.target(index)
