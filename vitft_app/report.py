"""Sharing a trained model: the one-page HTML report and pushing to the Hub (the model card itself
is written by :mod:`vitft_app.model_card`, re-exported here)."""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi

from . import plots
from .baseline import format_accuracy, run_baseline
from .config import TrainConfig
from .evaluate import evaluate_run, evaluation_headline
from .images import ImageLoadError, load_image
from .model_card import confusion_matrix_png, metric_text, write_model_card
from .modeling import hub_reachable, resolve_model_path
from .runs import atomic_write_text, is_run_dir, model_dir, read_metrics, read_status

__all__ = ["confusion_matrix_png", "push_to_hub", "write_html_report", "write_model_card"]


def _figure_html(figure: Any, first: bool) -> str:
    return figure.to_html(full_html=False, include_plotlyjs=first, config={"displayModeBar": False})


def _thumbnail_data_uri(path: str) -> str:
    try:
        image = load_image(path, draft_size=(256, 256))
    except ImageLoadError:
        return ""
    image.thumbnail((160, 160))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _epochs_trained(status: Any, config: TrainConfig) -> str:
    """``"3 epochs"`` for a run that trained them all; ``"1.05 of 3 epochs (stopped early)"``
    for one that ended before its last epoch (Stop, failure, early stopping)."""
    planned = status.epochs or config.epochs
    done = status.epoch
    if done is None or done >= planned - 1e-6:
        return f"{planned} epochs"
    return f"{done:.2f} of {planned} epochs (stopped early)"


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
    run_dir = Path(run_dir)
    if model_dir(run_dir) is None:
        raise FileNotFoundError(f"No saved model in {run_dir}")
    evaluation = evaluate_run(run_dir, split="val")
    metrics = evaluation.metrics
    config = TrainConfig.from_json_file(run_dir / "config.json")
    status = read_status(run_dir)
    history = read_metrics(run_dir)
    figures = [plots.figure_loss(history), plots.figure_accuracy(history, run_baseline(status))]
    if evaluation.multi_label:
        figures.append(plots.figure_precision_recall(evaluation.y_true, evaluation.probs, evaluation.classes))
    else:
        figures += [plots.figure_confusion_matrix(metrics["confusion_matrix"], evaluation.classes),
                    plots.figure_reliability(metrics["reliability"], metrics["ece"])]
    figure_html = [_figure_html(f, i == 0) for i, f in enumerate(figures)]
    counts = {c["class"]: c["support"] for c in metrics["per_class"]}
    mistakes = evaluation.top_losses(12)
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(k.replace('_', ' '))}</td><td>{metric_text(k, metrics[k])}</td></tr>"
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
<p>Model: <code>{esc(config.model)}</code>, {esc(_epochs_trained(status, config))} on {esc(str(status.device or '?'))}
({esc(str(status.precision or '?'))}), status {esc(str(status.status or '?'))}.</p>
<h2>Data</h2><p>Folder <code>{esc(config.data_dir)}</code>: {status.num_train or '?'} training and
{status.num_val or '?'} validation images in {len(counts)} classes.</p>
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
    if not repo_id or "/" not in repo_id.strip():
        raise ValueError("Give the repository as user/name (or org/name).")
    if not token or not token.strip():
        raise ValueError("Give a Hugging Face token with write access (huggingface.co/settings/tokens).")
    folder = Path(resolve_model_path(str(run_dir)))
    if not (folder / "config.json").exists():
        raise ValueError(f"No saved model in {run_dir}")
    if is_run_dir(run_dir) and not (folder / "README.md").exists():
        write_model_card(run_dir)
    if not hub_reachable():
        raise ConnectionError(
            "The Hugging Face Hub cannot be reached from this machine (offline or blocked), so the model"
            " cannot be pushed. Download the model zip instead and upload it from a connected machine."
        )
    api = HfApi(token=token.strip())
    api.create_repo(repo_id.strip(), private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id.strip(), ignore_patterns=["onnx/*"])
    return f"https://huggingface.co/{repo_id.strip()}"
