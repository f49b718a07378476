"""The one image loader. Scan, training, evaluation, prediction and browser uploads all call
:func:`load_image`, so a quirk of a file format is handled once for all of them."""

from __future__ import annotations

import io
import os
from typing import BinaryIO, Union

from PIL import Image, ImageOps, UnidentifiedImageError

#: File extensions treated as images (compared lower-case, so ``.JPG`` counts).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

#: Colour that transparent pixels are composited over before the model sees them (white).
ALPHA_BACKGROUND = (255, 255, 255)

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


def load_image(source: ImageSource, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Opens an image as 8-bit RGB, the way every part of vitft sees it.

    EXIF orientation is applied (``PIL.ImageOps.exif_transpose``); images with transparency are
    composited over :data:`ALPHA_BACKGROUND`; animated files give their first frame. Pillow's
    decompression-bomb guard stays on.

    Args:
        source: a file path, raw bytes, a binary file object, or an already open PIL image.
        draft_size: optional ``(width, height)`` the caller will resize to. For JPEG files the
            decoder then scales by a power of two while decoding (``Image.draft``), never below
            this size, which makes large photos several times cheaper to read.

    Returns:
        A fully decoded ``PIL.Image.Image`` in mode ``"RGB"``.

    Raises:
        ImageLoadError: the file is empty, is not an image, is truncated or corrupt, or is larger
            than Pillow's ``Image.MAX_IMAGE_PIXELS`` limit.
    """
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<upload>"
    if isinstance(source, Image.Image):
        image = source
    else:
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
            image = Image.open(source)
        except UnidentifiedImageError as exc:
            raise ImageLoadError(name, "not an image") from exc
        except Image.DecompressionBombError as exc:
            raise ImageLoadError(name, f"too large ({exc})") from exc
        except OSError as exc:
            raise ImageLoadError(name, f"unreadable ({exc})") from exc
    try:
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", draft_size)
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(name, f"too large ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        message = str(exc)
        if "truncated" in message.lower() or "premature end" in message.lower():
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
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High bit depth: rescale the actual range to 0..255 instead of clipping.
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = np.zeros_like(array) if high <= low else (array - low) * (255.0 / (high - low))
        return Image.fromarray(scaled.round().astype("uint8"), mode="L").convert("RGB")
    return image.convert("RGB")

