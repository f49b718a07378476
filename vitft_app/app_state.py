"""The app's server-side choices that outlive a page: the chosen dataset.

Stored as ``app-settings.json`` in the runs folder (written atomically), so a page reload, a
second browser tab or an app restart shows the same dataset on every tab, and Start trains
exactly the dataset the Train tab shows. Engine code: no Gradio.
"""

from __future__ import annotations

import logging
import json
import os
from pathlib import Path
from typing import Any

from .runs import atomic_write_text

logger = logging.getLogger(__name__)

#: File name of the app's settings inside the runs folder (a file, so never listed as a run).
APP_SETTINGS_FILE = "app-settings.json"


def settings_path(runs_dir: str | os.PathLike) -> Path:
    """``<runs_dir>/app-settings.json``."""
    return Path(runs_dir) / APP_SETTINGS_FILE


def read_app_settings(runs_dir: str | os.PathLike) -> dict[str, Any]:
    """The saved settings; an empty dict when the file is missing or unreadable."""
    try:
        data = json.loads(settings_path(runs_dir).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("app settings %s unreadable (%s): using the defaults", settings_path(runs_dir), exc)
        return {}
    return data if isinstance(data, dict) else {}


def update_app_settings(runs_dir: str | os.PathLike, **changes: Any) -> dict[str, Any]:
    """Merges ``changes`` into the saved settings (atomic write) and returns the result.

    Raises:
        OSError: the runs folder cannot be written.
    """
    data = read_app_settings(runs_dir) | changes
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(settings_path(runs_dir), json.dumps(data, indent=2))
    return data


def dataset_choice(report: Any) -> dict[str, Any]:
    """What the app remembers and shows about the chosen dataset, from its scan.

    Args:
        report: a :class:`~vitft_app.data.DatasetReport`.

    Returns:
        ``{"path", "name", "classes", "num_train", "num_val", "warnings", "errors", "augment",
        "augment_reason", "suggested_image_size"}`` (JSON-ready; ``classes`` is the list of class
        names, ``warnings`` and ``errors`` are counts, ``augment`` the form default from
        :func:`default_augment`, ``suggested_image_size`` the vit-tiny-scratch input size for it).
    """
    return {
        "path": str(report.root),
        "name": Path(report.root).name,
        "classes": list(report.classes),
        "num_train": len(report.train),
        "num_val": len(report.val),
        "warnings": len(report.warnings),
        "errors": len(report.errors),
        "augment": default_augment(report)[0],
        "augment_reason": default_augment(report)[1],
        "suggested_image_size": report.suggested_image_size(),
    }


def dataset_markdown(choice: dict[str, Any] | None) -> str:
    """One line for the top of the Train tab: name, path, classes, train/val images, warnings."""
    if not choice or not choice.get("path"):
        return "**Dataset:** none chosen yet. Pick a folder in the **Data** tab and press Scan."
    classes = choice.get("classes") or []
    shown = ", ".join(classes[:6]) + (f", … ({len(classes)} in all)" if len(classes) > 6 else "")
    warnings = int(choice.get("warnings") or 0)
    errors = int(choice.get("errors") or 0)
    notes = []
    if errors:
        notes.append(f"**{errors} error(s)**: training will refuse it (see the Data tab)")
    notes.append(f"{warnings} warning(s)" + (" (see the Data tab)" if warnings else ""))
    return (f"**Dataset:** {choice.get('name')} · `{choice['path']}` · {len(classes)} classes ({shown}) ·"
            f" {choice.get('num_train', 0)} train / {choice.get('num_val', 0)} val images · " + " · ".join(notes)
            + " · change it in the **Data** tab")


#: Largest side (pixels) of images considered "small" by :func:`default_augment`.
SMALL_IMAGE_SIDE = 64


def default_augment(report: Any) -> tuple[str, str]:
    """The Train form's augmentation default for a scanned dataset, and why.

    Mostly small grayscale images (MNIST-like digits, glyphs) get ``"none"``: ``basic`` flips
    horizontally, which turns a 2 into a mirrored glyph that is no digit, and crops away much of
    a 28-pixel image. Photos get ``"basic"`` (random resized crop + horizontal flip), the usual
    fine-tuning default (torchvision reference recipes).

    Args:
        report: a :class:`~vitft_app.data.DatasetReport`.

    Returns:
        ``(augment, reason)``: a TrainConfig ``augment`` value and one line for the form.
    """
    checks = [r.check for r in getattr(report, "files", []) if r.check.reason is None and r.check.width]
    if not checks:
        return "basic", "the usual default for photos (random crop and horizontal flip)"
    gray = sum(c.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F") for c in checks) / len(checks)
    small = sum(max(c.width or 0, c.height or 0) <= SMALL_IMAGE_SIDE for c in checks) / len(checks)
    if gray >= 0.5 and small >= 0.5:
        return "none", ("small grayscale images (digits or glyphs): flips and crops would change what they show;"
                        " choose an augmentation if mirrored images keep their class")
    return "basic", "photos: random crop and horizontal flip"
