"""The model card: ``model/README.md`` written beside a run's saved model (Hugging Face's card
format: YAML metadata, data, training settings, metrics with their baseline, limits, usage).

Its own module so that evaluation (which refreshes the card after a validation pass) and the
HTML report (which evaluates) depend on it one way, without importing each other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .baseline import accuracy_with_baseline, format_accuracy, run_baseline, weak_model_warning
from .config import TrainConfig
from .runs import atomic_write_text, model_dir, read_status
from .scratch import is_scratch_model, scratch_model


def metric_text(key: str, value: float) -> str:
    """Accuracies as percentages with one decimal (the one rounding used everywhere), other
    metrics (F1, ROC-AUC, ECE, mAP) with 4 decimals."""
    return format_accuracy(value) if key in ("accuracy", "top_k_accuracy") else f"{value:.4f}"


def confusion_matrix_png(matrix: list[list[int]], classes: list[str], cell: int = 44) -> Image.Image:
    """Draws a confusion matrix (rows true, columns predicted) as a PNG-ready image with Pillow:
    darker blue for larger row shares, the count in each cell, class names on both axes."""
    counts = np.asarray(matrix, dtype=float)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    margin = 12 + 7 * max((len(c) for c in classes), default=1)
    size = margin + cell * len(classes) + 10
    image = Image.new("RGB", (size, size + 16), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, 2), "predicted →", fill="black")
    for i, name in enumerate(classes):
        draw.text((4, margin + i * cell + cell // 3), name[:20], fill="black")
        draw.text((margin + i * cell + 4, margin - 14), name[:6], fill="black")
        for j in range(len(classes)):
            level = int(255 - 200 * shares[i, j])
            box = (margin + j * cell, margin + i * cell, margin + (j + 1) * cell - 1, margin + (i + 1) * cell - 1)
            draw.rectangle(box, fill=(level, level, 255))
            draw.text((box[0] + 6, box[1] + cell // 3), str(int(counts[i, j])), fill="black" if level > 120 else "white")
    return image


def _load_evaluation_metrics(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "eval" / "val" / "metrics.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _known(value: Any) -> Any:
    """``value``, or ``?`` for a status field an older or unfinished run did not record."""
    return "?" if value is None else value


def write_model_card(run_dir: str | os.PathLike, metrics: dict[str, Any] | None = None) -> Path:
    """Writes ``model/README.md``: a Hugging Face model card (YAML metadata, then data summary,
    training config, metrics table, confusion matrix image, intended use and limits, usage).

    Args:
        run_dir: a run folder with a saved model.
        metrics: evaluation metrics (``vitft evaluate``'s ``metrics.json``); default the run's
            ``eval/val/metrics.json`` when it exists, else only the training status.

    Returns:
        The card's path.

    Raises:
        FileNotFoundError: the run has no saved model.
    """
    run_dir = Path(run_dir)
    folder = model_dir(run_dir)
    if folder is None:
        raise FileNotFoundError(f"No saved model in {run_dir}")
    config = TrainConfig.from_json_file(run_dir / "config.json")
    status = read_status(run_dir)
    metrics = metrics if metrics is not None else _load_evaluation_metrics(run_dir)
    classes = status.classes or []
    base = None if is_scratch_model(config.model) or Path(config.model).exists() else config.model
    meta = ["---", "library_name: transformers", "pipeline_tag: image-classification",
            "tags:", "- image-classification", "- vision-transformer", "- vitft"]
    if base:
        meta.append(f"base_model: {base}")
    meta += ["metrics:", "- accuracy", "- f1", "---"]
    lines = [*meta, "", f"# {run_dir.name}", ""]
    origin = (f"trained from scratch (random {scratch_model(config.model).description.split(' (')[0]})"
              if is_scratch_model(config.model) else f"fine-tuned from `{config.model}`")
    lines += [f"An image classifier {origin} with [vitft](https://pypi.org/project/vitft/) on the folder"
              f" `{Path(config.data_dir).name}`.", "", "## Data", ""]
    lines += [f"- {len(classes)} classes: {', '.join(map(str, classes))}",
              f"- {_known(status.num_train)} training and {_known(status.num_val)} validation images", ""]
    lines += ["## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in config.to_dict().items() if k not in ("output_dir",)]
    lines += [f"| device | {_known(status.device)} ({_known(status.precision)}) |",
              f"| duration | {status.duration_s or 0:.0f} s |", ""]
    lines += ["## Results", ""]
    baseline = run_baseline(status)
    best = status.best_val_accuracy
    if best is not None and baseline is not None:
        # The honest line first: the accuracy beside always answering the most common class.
        lines += [f"Validation accuracy {accuracy_with_baseline(best, baseline)};"
                  f" chance (1/{baseline.num_classes}) is {format_accuracy(baseline.chance)}.", ""]
        warning = weak_model_warning(best, baseline)
        if warning:
            lines += [f"**{warning}**", ""]
    lines += ["| metric | value |", "|---|---|"]
    if best is not None:
        lines.append(f"| best validation accuracy | {format_accuracy(best)} |")
    if baseline is not None:
        lines.append(f"| always '{baseline.majority_class}' (majority class, validation) | {format_accuracy(baseline.rate)} |")
    if metrics:
        for key in ("accuracy", "top_k_accuracy", "micro_f1", "macro_f1", "map", "weighted_f1", "roc_auc", "ece"):
            if metrics.get(key) is not None:
                lines.append(f"| {key.replace('_', ' ')} ({metrics.get('split', 'val')}) | {metric_text(key, metrics[key])} |")
        lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        lines += [f"| {c['class']} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |"
                  for c in metrics["per_class"]]
        if metrics.get("confusion_matrix"):  # single-label only
            confusion_matrix_png(metrics["confusion_matrix"], [c["class"] for c in metrics["per_class"]]).save(
                folder / "confusion_matrix.png")
            lines += ["", "## Confusion matrix", "",
                      "![confusion matrix (rows: true, columns: predicted)](confusion_matrix.png)"]
    lines += ["", "## Intended use and limits", "",
              f"Classifies images into the {len(classes)} classes above, for images like the training folder's."
              " It has not been tested on other kinds of images, knows no class outside the list (it always answers"
              " one of them), and its accuracy on new data can be lower than on the validation split, which was drawn"
              " from the same folder. Check the per-class numbers before relying on it for a class.",
              "", "## How to use", "", "```python", "from transformers import pipeline",
              'classify = pipeline("image-classification", model="PATH_OR_REPO_ID")', 'classify("image.jpg")', "```", ""]
    path = folder / "README.md"
    atomic_write_text(path, "\n".join(lines))
    return path
