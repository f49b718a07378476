"""The one image loader. Scan, training, evaluation, prediction and browser uploads all call
:func:`load_image`, so a quirk of a file format is handled once for all of them."""

from __future__ import annotations

import io
import os
from typing import BinaryIO, Union

from PIL import Image, ImageOps, UnidentifiedImageError
import numpy as np

#: File extensions treated as images (compared lower-case, so ``.JPG`` counts).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

#: Colour that transparent pixels are composited over before the model sees them (white).
ALPHA_BACKGROUND = (255, 255, 255)

#: Largest ``width * height`` accepted by default: Pillow's own decompression-bomb limit
#: (about 89 megapixels), so the guard and vitft agree.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

ImageSource = Union[str, os.PathLike, bytes, BinaryIO, Image.Image]


class ImageLoadError(Exception):
    """An image that cannot be used, with a short human reason.

    Attributes:
        path: the file (or ``"<upload>"`` for in-memory data).
        reason: one of ``"empty file"``, ``"not an image"``, ``"truncated"``, ``"too large"``,
            ``"unreadable"``, followed by details where useful.
    """

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the name has an image extension (case-insensitive) and is not hidden."""
    name = os.path.basename(os.fspath(path))
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def load_image(
    source: ImageSource, draft_size: tuple[int, int] | None = None, max_pixels: int | None = None
) -> Image.Image:
    """Opens an image as 8-bit RGB, the way every part of vitft sees it.

    - EXIF orientation is applied (all eight orientations, ``PIL.ImageOps.exif_transpose``).
    - Every Pillow mode becomes RGB: 1, L, P, CMYK, YCbCr convert directly; LA, PA, RGBA and P
      with a transparency key are composited over :data:`ALPHA_BACKGROUND`, so colours hidden
      under transparent pixels never reach the model; 16-bit (``I;16`` and its byte-order
      variants), 32-bit integer (``I``) and float (``F``) images are rescaled from their actual
      min..max range to 0..255 (a 16-bit gradient stays a gradient instead of saturating).
    - Animated GIF/WebP/PNG: the first frame. The format is sniffed from the content, not the
      extension.
    - Pillow's decompression-bomb guard stays on; an image over ``max_pixels`` is refused from its
      header, before any pixel is decoded, so memory stays bounded.
    - ``Image.LOAD_TRUNCATED_IMAGES`` is never switched on: truncated files are errors.

    Args:
        source: a file path, raw bytes, a binary file object, or an already open PIL image.
        draft_size: optional ``(width, height)`` the caller will resize to. For JPEG files the
            decoder then scales by a power of two while decoding (``Image.draft``), never below
            this size, which makes large photos several times cheaper to read.
        max_pixels: largest ``width * height`` accepted (default :data:`DEFAULT_MAX_PIXELS`,
            Pillow's own ``Image.MAX_IMAGE_PIXELS``).

    Returns:
        A fully decoded ``PIL.Image.Image`` in mode ``"RGB"``.

    Raises:
        ImageLoadError: with ``reason`` ``"empty file"``, ``"not an image"``, ``"truncated"``,
            ``"too large (...)"`` or ``"unreadable (...)"``.
    """
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<upload>"
    limit = max_pixels or DEFAULT_MAX_PIXELS
    if isinstance(source, Image.Image):
        return _decode(source, name, draft_size, limit)
    if isinstance(source, bytes):
        if not source:
            raise ImageLoadError(name, "empty file")
        source = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        try:
            if os.path.getsize(source) == 0:
                raise ImageLoadError(name, "empty file")
        except OSError as exc:
            raise ImageLoadError(name, f"unreadable ({exc.strerror or exc})") from exc
    try:
        opened = Image.open(source)
    except UnidentifiedImageError as exc:
        raise ImageLoadError(name, "not an image") from exc
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(name, f"too large ({exc})") from exc
    except OSError as exc:
        raise ImageLoadError(name, f"unreadable ({exc})") from exc
    with opened:
        return _decode(opened, name, draft_size, limit)


def _decode(image: Image.Image, name: str, draft_size: tuple[int, int] | None, limit: int) -> Image.Image:
    """Checks the size, decodes the first frame and converts it (see :func:`load_image`)."""
    width, height = image.size
    if width * height > limit:
        raise ImageLoadError(name, f"too large ({width}x{height} = {width * height:,} pixels, limit {limit:,})")
    try:
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", draft_size)
        image.load()
        rgb = _to_rgb(ImageOps.exif_transpose(image))
        return rgb.copy() if rgb is image else rgb  # detached from the file, which is closed next
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(name, f"too large ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        message = str(exc)
        if "truncated" in message.lower() or "premature end" in message.lower() or isinstance(exc, EOFError):
            raise ImageLoadError(name, "truncated") from exc
        raise ImageLoadError(name, f"unreadable ({message})") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """Converts any Pillow mode to RGB, compositing transparency over :data:`ALPHA_BACKGROUND`."""
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        return _high_bit_depth_to_rgb(image)
    return image.convert("RGB")


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    """Rescales 16-bit, 32-bit integer and float images to 8 bits instead of clipping them.

    ``I;16*`` (and ``I`` whose values fit in 0..65535): divided by 257, so 65535 maps to 255 and
    every image keeps its true brightness. ``I`` already within 0..255: kept. ``F`` within 0..1:
    times 255. Anything else: its own min..max range stretched to 0..255.
    """
    array = np.asarray(image, dtype=np.float64)
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if image.mode == "F" and 0.0 <= low and high <= 1.0:
        scaled = array * 255.0
    elif image.mode != "F" and 0.0 <= low and high <= 255.0 and not image.mode.startswith("I;16"):
        scaled = array
    elif image.mode != "F" and 0.0 <= low and high <= 65535.0:
        scaled = array / 257.0
    else:
        scaled = np.zeros_like(array) if high <= low else (array - low) * (255.0 / (high - low))
    return Image.fromarray(np.clip(scaled.round(), 0, 255).astype("uint8"), mode="L").convert("RGB")
