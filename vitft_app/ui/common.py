"""Small helpers shared by the tabs (kept here so the tabs and the app do not import each other)."""

from __future__ import annotations

import atexit
import re
import shutil
import tempfile
import threading
from pathlib import Path

from PIL import Image, ImageOps

from ..images import ImageLoadError, load_image

_DOWNLOADS: Path | None = None
_DOWNLOADS_LOCK = threading.Lock()


def download_path(name: str) -> Path:
    """A path for a file the browser downloads (scan report, predictions CSV, model zip, HTML report).

    All such files live in one temp folder per app process, removed at exit, and a file of the
    same name is replaced, so scans (one per page load) do not leave a folder each behind. Gradio
    copies a returned file into its own cache at once, so replacing it later is safe.
    """
    global _DOWNLOADS
    with _DOWNLOADS_LOCK:
        if _DOWNLOADS is None or not _DOWNLOADS.is_dir():
            _DOWNLOADS = Path(tempfile.mkdtemp(prefix="vitft-downloads-"))
            atexit.register(shutil.rmtree, _DOWNLOADS, True)
    return _DOWNLOADS / (re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "download")


def thumbnail(path: str) -> Image.Image | None:
    """A thumbnail of at most 160x160 px for a gallery, or None when the image cannot be opened."""
    try:
        return ImageOps.contain(load_image(path, draft_size=(256, 256)), (160, 160), Image.Resampling.NEAREST)
    except ImageLoadError:
        return None
