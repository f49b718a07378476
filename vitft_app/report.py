"""Sharing a trained model: the model card, the one-page HTML report, and pushing to the Hub."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .baseline import accuracy_with_baseline, format_accuracy, run_baseline, weak_model_warning
from .config import TrainConfig
from .scratch import is_scratch_model, scratch_model
from .runs import atomic_write_text, is_run_dir, model_dir, read_metrics, read_status



def _metric_text(key: str, value: float) -> str:
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
    classes = status.get("classes") or []
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
              f"- {status.get('num_train', '?')} training and {status.get('num_val', '?')} validation images", ""]
    lines += ["## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in config.to_dict().items() if k not in ("output_dir",)]
    lines += [f"| device | {status.get('device', '?')} ({status.get('precision', '?')}) |",
              f"| duration | {status.get('duration_s', 0):.0f} s |", ""]
    lines += ["## Results", ""]
    baseline = run_baseline(status)
    if status.get("best_val_accuracy") is not None and baseline is not None:
        # The honest line first: the accuracy beside always answering the most common class.
        lines += [f"Validation accuracy {accuracy_with_baseline(status['best_val_accuracy'], baseline)};"
                  f" chance (1/{baseline.num_classes}) is {format_accuracy(baseline.chance)}.", ""]
        warning = weak_model_warning(status["best_val_accuracy"], baseline)
        if warning:
            lines += [f"**{warning}**", ""]
    lines += ["| metric | value |", "|---|---|"]
    if status.get("best_val_accuracy") is not None:
        lines.append(f"| best validation accuracy | {format_accuracy(status['best_val_accuracy'])} |")
    if baseline is not None:
        lines.append(f"| always '{baseline.majority_class}' (majority class, validation) | {format_accuracy(baseline.rate)} |")
    if metrics:
        for key in ("accuracy", "top_k_accuracy", "micro_f1", "macro_f1", "map", "weighted_f1", "roc_auc", "ece"):
            if metrics.get(key) is not None:
                lines.append(f"| {key.replace('_', ' ')} ({metrics.get('split', 'val')}) | {_metric_text(key, metrics[key])} |")
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


def _figure_html(figure: Any, first: bool) -> str:
    return figure.to_html(full_html=False, include_plotlyjs=first, config={"displayModeBar": False})


def _thumbnail_data_uri(path: str) -> str:
    from .images import ImageLoadError, load_image

    try:
        image = load_image(path, draft_size=(256, 256))
    except ImageLoadError:
        return ""
    image.thumbnail((160, 160))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def write_html_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Writes one self-contained HTML page about a run for people who do not use the app: data
    summary, training curves, metrics, confusion matrix, the most confident mistakes (embedded
    thumbnails) and the settings. plotly.js is embedded once, so it opens offline in any browser.

    Evaluates the validation split first when the run has no ``eval/val/metrics.json``.

    Args:
        run_dir: a run folder with a saved model.
        out: the HTML file (default ``RUN_DIR/report.html``).

    Returns:
        The written file.

    Raises:
        FileNotFoundError: the run has no saved model.
        EvaluationError: the validation split cannot be evaluated (dataset gone).
    """
    from . import plots
    from .evaluate import evaluate_run, evaluation_headline

    run_dir = Path(run_dir)
    if model_dir(run_dir) is None:
        raise FileNotFoundError(f"No saved model in {run_dir}")
    evaluation = evaluate_run(run_dir, split="val")
    metrics = evaluation.metrics
    config = TrainConfig.from_json_file(run_dir / "config.json")
    status = read_status(run_dir)
    history = read_metrics(run_dir)
    figures = [plots.figure_loss(history), plots.figure_accuracy(history)]
    if evaluation.multi_label:
        figures.append(plots.figure_precision_recall(evaluation.y_true, evaluation.probs, evaluation.classes))
    else:
        figures += [plots.figure_confusion_matrix(metrics["confusion_matrix"], evaluation.classes),
                    plots.figure_reliability(metrics["reliability"], metrics["ece"])]
    figure_html = [_figure_html(f, i == 0) for i, f in enumerate(figures)]
    counts = {c["class"]: c["support"] for c in metrics["per_class"]}
    mistakes = evaluation.top_losses(12)
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(k.replace('_', ' '))}</td><td>{_metric_text(k, metrics[k])}</td></tr>"
                   for k in ("accuracy", "top_k_accuracy", "micro_f1", "macro_f1", "map", "weighted_f1", "roc_auc", "ece")
                   if metrics.get(k) is not None)
    per_class = "".join(f"<tr><td>{esc(c['class'])}</td><td>{c['precision']:.3f}</td><td>{c['recall']:.3f}</td>"
                        f"<td>{c['f1']:.3f}</td><td>{c['support']}</td></tr>" for c in metrics["per_class"])
    settings = "".join(f"<tr><td>{esc(k)}</td><td>{esc(str(v))}</td></tr>" for k, v in config.to_dict().items())
    gallery = "".join(
        f"<figure><img src='{_thumbnail_data_uri(r.path)}' alt=''><figcaption>{esc(r.true)} → {esc(r.predicted)}"
        f" ({r.confidence:.2f})</figcaption></figure>" for r in mistakes.itertuples()
    ) or "<p>No mistakes on the validation split.</p>"
    headline_line, _, warning = evaluation_headline(metrics).partition("\n")
    warning_html = f"<p class='warning'><b>{esc(warning)}</b></p>" if warning else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vitft report: {esc(run_dir.name)}</title>
<style>
body {{font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222}}
table {{border-collapse: collapse; margin: 0.5em 0 1.5em}} td, th {{border: 1px solid #ccc; padding: 4px 10px}}
.grid {{display: grid; grid-template-columns: 1fr 1fr; gap: 1em}}
.gallery {{display: flex; flex-wrap: wrap; gap: 10px}} figure {{margin: 0; text-align: center; font-size: 0.85em}}
.headline {{font-size: 1.4em}} .warning {{color: #92400e; background: #fef3c7; padding: 0.5em}}
</style></head><body>
<h1>{esc(run_dir.name)}</h1>
<p class="headline">{esc(headline_line)}</p>{warning_html}
<p>Validation accuracy <b>{format_accuracy(metrics['accuracy'])}</b> · macro-F1 <b>{metrics['macro_f1']:.3f}</b>
on {metrics['num_images']} images</p>
<p>Model: <code>{esc(config.model)}</code>, {status.get('epochs', config.epochs)} epochs on {esc(str(status.get('device', '?')))}
({esc(str(status.get('precision', '?')))}), status {esc(str(status.get('status', '?')))}.</p>
<h2>Data</h2><p>Folder <code>{esc(config.data_dir)}</code>: {status.get('num_train', '?')} training and
{status.get('num_val', '?')} validation images in {len(counts)} classes.</p>
<table><tr><th>class</th><th>validation images</th></tr>{''.join(f'<tr><td>{esc(c)}</td><td>{n}</td></tr>' for c, n in counts.items())}</table>
<h2>Training curves</h2><div class="grid">{figure_html[0]}{figure_html[1]}</div>
<h2>Metrics (validation)</h2><table>{rows}</table>
<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>{per_class}</table>
<h2>Confusion matrix and calibration</h2><div class="grid">{figure_html[2]}{figure_html[3]}</div>
<h2>Most confident mistakes</h2><div class="gallery">{gallery}</div>
<h2>Settings</h2><table>{settings}</table>
<p><small>Made by vitft. Validation images come from the same folder as training; expect lower accuracy on new data.</small></p>
</body></html>"""
    target = Path(out) if out else run_dir / "report.html"
    atomic_write_text(target, page)
    return target


def push_to_hub(run_dir: str | os.PathLike, repo_id: str, token: str, private: bool = True) -> str:
    """Uploads the run's model folder (model card included) to a Hub model repository.

    Args:
        run_dir: a run folder or a ``save_pretrained`` folder.
        repo_id: ``"user/name"``.
        token: a Hugging Face write token.
        private: create the repository as private (when it does not exist yet).

    Returns:
        The repository URL.

    Raises:
        ValueError: missing repo id or token, or no saved model.
        ConnectionError: the Hub cannot be reached from this machine (the message says so).
    """
    from huggingface_hub import HfApi

    from .modeling import _hub_reachable, resolve_model_path

    if not repo_id or "/" not in repo_id.strip():
        raise ValueError("Give the repository as user/name (or org/name).")
    if not token or not token.strip():
        raise ValueError("Give a Hugging Face token with write access (huggingface.co/settings/tokens).")
    folder = Path(resolve_model_path(str(run_dir)))
    if not (folder / "config.json").exists():
        raise ValueError(f"No saved model in {run_dir}")
    if is_run_dir(run_dir) and not (folder / "README.md").exists():
        write_model_card(run_dir)
    if not _hub_reachable():
        raise ConnectionError(
            "The Hugging Face Hub cannot be reached from this machine (offline or blocked), so the model"
            " cannot be pushed. Download the model zip instead and upload it from a connected machine."
        )
    api = HfApi(token=token.strip())
    api.create_repo(repo_id.strip(), private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id.strip(), ignore_patterns=["onnx/*"])
    return f"https://huggingface.co/{repo_id.strip()}"
