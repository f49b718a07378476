"""Evaluate tab: metrics, per-class table, confusion matrix with clickable cells, curves, mistakes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import pandas as pd
from PIL import Image

from ..evaluate import Evaluation, EvaluationError, evaluate_run, evaluation_headline, test_split_dir
from ..baseline import format_accuracy
from ..plots import figure_confusion_matrix, figure_precision_recall, figure_reliability, figure_roc
from . import label_issues_panel
from .common import download_path, thumbnail
from .errors import unexpected_error
from .predict_tab import refresh_runs
from ..report import write_html_report
from ..runs_table import read_config

#: Keys of :func:`run_evaluation`'s result, in the order of the tab's outputs.
OUTPUT_KEYS = ("summary", "per_class", "per_class_csv", "matrix_table", "matrix", "matrix_normalized", "roc",
               "pr", "reliability", "top_losses", "evaluation", "results", "matrix_group", "cell_images",
               "cell_caption")



def summary_markdown(metrics: dict[str, Any]) -> str:
    """The headline numbers as a Markdown table."""
    if metrics.get("multi_label"):
        mean_ap = "n/a" if metrics.get("map") is None else f"{metrics['map']:.4f}"
        rows = [
            ("images", f"{metrics['num_images']}"),
            ("subset accuracy (every label right)", f"{metrics['subset_accuracy']:.4f}"),
            (f"micro precision / recall / F1 at {metrics['threshold']}",
             f"{metrics['micro_precision']:.4f} / {metrics['micro_recall']:.4f} / {metrics['micro_f1']:.4f}"),
            ("macro-F1", f"{metrics['macro_f1']:.4f}"),
            ("mAP (mean average precision over labels)", mean_ap),
        ]
        return "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    auc = "n/a (a class is missing from this split)" if metrics.get("roc_auc") is None else f"{metrics['roc_auc']:.4f}"
    rows = [
        ("images", f"{metrics['num_images']}"),
        ("accuracy", format_accuracy(metrics["accuracy"])),
        *([(f"top-{metrics['top_k']} accuracy", format_accuracy(metrics["top_k_accuracy"]))] if metrics["top_k"] > 1 else []),
        ("macro precision / recall / F1",
         f"{metrics['macro_precision']:.4f} / {metrics['macro_recall']:.4f} / {metrics['macro_f1']:.4f}"),
        ("weighted precision / recall / F1",
         f"{metrics['weighted_precision']:.4f} / {metrics['weighted_recall']:.4f} / {metrics['weighted_f1']:.4f}"),
        ("ROC-AUC (one-vs-rest)", auc),
        ("expected calibration error", f"{metrics['ece']:.4f}"),
    ]
    return "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def headline_markdown(metrics: dict[str, Any]) -> str:
    """The plain line the tab opens with ("131 of 153 validation images right (85.6%); always
    guessing 'bees' gets 54.2%"), and the weak-model warning under it when the model is near that
    baseline."""
    lines = evaluation_headline(metrics).split("\n")
    text = f"### {lines[0]}"
    if len(lines) > 1:
        text += f"\n\n⚠ **{lines[1]}**"
    return text


def gallery_items(frame: pd.DataFrame) -> list[tuple[Image.Image, str]]:
    """``(thumbnail, "true → predicted (confidence)")`` for each row of a predictions frame."""
    items = []
    for _, row in frame.iterrows():
        thumb = thumbnail(row["path"])
        if thumb is not None:
            caption = f"{row['true']} → {row['predicted']} ({row['confidence']:.2f})  {os.path.basename(row['path'])}"
            items.append((thumb, caption))
    return items


def run_evaluation(ctx: Any, run_dir: str | None, split: str, top_k: int,
                   progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Evaluates a run for the tab; ``progress(stage, done, total)`` as
    :func:`~vitft_app.evaluate.evaluate_run` goes (the tab's progress bar).

    Returns:
        A dict with :data:`OUTPUT_KEYS`; on failure only ``summary`` (the message) is meaningful.
        Never raises.
    """
    # Nothing stale survives a new evaluation or an error: every result and the clicked cell reset,
    # and the result components stay hidden until there is something to show.
    empty: dict[str, Any] = {key: None for key in OUTPUT_KEYS} | {
        "results": gr.update(visible=False), "matrix_group": gr.update(visible=False), "cell_images": [],
        "cell_caption": "", "per_class_csv": gr.update(value=None)}
    if not run_dir:
        return empty | {"summary": "Choose a run with a saved model first."}
    try:
        result = evaluate_run(run_dir, split=split, top_k=int(top_k), device=ctx.settings.device, progress=progress)
    except (EvaluationError, FileNotFoundError, ValueError, OSError) as exc:
        return empty | {"summary": f"✗ {exc}"}
    except Exception as exc:  # noqa: BLE001 - shown to the user instead of a server error
        return empty | {"summary": unexpected_error(exc, "Evaluation failed", run_dir=run_dir)}
    metrics = result.metrics
    per_class = pd.DataFrame(metrics["per_class"]).round(4)
    csv_path = result.out_dir / "per_class.csv" if result.out_dir else None
    if csv_path is not None:
        per_class.to_csv(csv_path, index=False)
    if result.multi_label:  # no confusion matrix or top-1 calibration for label sets
        return empty | {
            "summary": f"**{Path(run_dir).name}**, {split} split, multi-label (saved in `{result.out_dir}`)\n\n"
                       + summary_markdown(metrics),
            "results": gr.update(visible=True),
            "per_class": per_class,
            "per_class_csv": str(csv_path) if csv_path else None,
            "roc": figure_roc(result.y_true, result.probs, result.classes),
            "pr": figure_precision_recall(result.y_true, result.probs, result.classes),
            "top_losses": gallery_items(result.top_losses(12)),
            "evaluation": result,
        }
    matrix = pd.DataFrame(metrics["confusion_matrix"], columns=result.classes)
    matrix.insert(0, "true \\ predicted", result.classes)
    return empty | {
        "summary": headline_markdown(metrics) + f"\n\n**{Path(run_dir).name}**, {split} split (saved in"
                   f" `{result.out_dir}`)\n\n" + summary_markdown(metrics),
        "results": gr.update(visible=True),
        "matrix_group": gr.update(visible=True),
        "cell_caption": "Click a number in the matrix to see the images behind it.",
        "per_class": per_class,
        "per_class_csv": str(csv_path) if csv_path else None,
        "matrix_table": matrix,
        "matrix": figure_confusion_matrix(metrics["confusion_matrix"], result.classes),
        "matrix_normalized": figure_confusion_matrix(metrics["confusion_matrix"], result.classes, normalize=True),
        "roc": figure_roc(result.y_true, result.probs, result.classes),
        "pr": figure_precision_recall(result.y_true, result.probs, result.classes),
        "reliability": figure_reliability(metrics["reliability"], metrics["ece"]),
        "top_losses": gallery_items(result.top_losses(12)),
        "evaluation": result,
    }


def cell_gallery(result: Evaluation | None, row: int, column: int) -> tuple[list, str]:
    """Images behind the clicked confusion-matrix cell (column 0 holds the true-class names).

    Returns:
        ``(gallery items, caption markdown)``.
    """
    if result is None or result.multi_label or column < 1:
        return [], "Click a number in the matrix to see the images behind it."
    true_class, predicted_class = row, column - 1
    frame = result.cell_images(true_class, predicted_class)
    caption = (f"**{len(frame)}** image(s): true **{result.classes[true_class]}**, predicted"
               f" **{result.classes[predicted_class]}** (most confident first)")
    return gallery_items(frame.head(48)), caption


def make_report(run_dir: str | None) -> tuple[str | None, str]:
    """Writes the run's one-page HTML report; returns ``(a copy in a temp folder to download,
    message)``. Never raises."""
    if not run_dir:
        return None, "Choose a run first."
    try:
        path = write_html_report(run_dir)
        copy = download_path(f"{Path(run_dir).name}-report.html")
        shutil.copyfile(path, copy)
    except (EvaluationError, FileNotFoundError, ValueError, OSError) as exc:
        return None, f"✗ {exc}"
    except Exception as exc:  # noqa: BLE001 - a damaged run folder is a message, not Gradio's "Error"
        return None, unexpected_error(exc, f"Could not write the report of {Path(run_dir).name}", run_dir=run_dir)
    return str(copy), f"✓ Written to `{path}`; it opens in any browser, without the app."


#: The split radio's note when the run's dataset has a ``test/`` folder.
TEST_SPLIT_INFO = "test = DATA/test/, never used in training"


def split_choices(run_dir: str | None) -> Any:
    """The split radio for a run: ``val`` and ``test`` when the run's dataset folder has a
    ``test/`` folder, else ``val`` alone, with a note saying how to add a test split (offering
    ``test`` there could only end in a refusal).

    Args:
        run_dir: the chosen run folder, or None.

    Returns:
        A ``gr.update`` of the radio's choices, value and info.
    """
    if not run_dir:  # no run chosen yet: nothing to say about its dataset
        return gr.update(choices=["val", "test"], value="val", info=TEST_SPLIT_INFO)
    data_dir = read_config(run_dir).get("data_dir")
    data = Path(str(data_dir)).expanduser() if isinstance(data_dir, str) and data_dir else None
    if data is not None and test_split_dir(data) is not None:
        return gr.update(choices=["val", "test"], info=TEST_SPLIT_INFO)
    if data is not None and data.is_file():
        info = "val only: a CSV dataset has no test/ folder"
    elif data is None or not data.exists():
        info = "val only, and this run's dataset folder is not there any more: evaluation needs it back"
    else:
        info = "val only: this run's dataset has no test/ folder (held-out images go in DATA/test/<class>/)"
    return gr.update(choices=["val"], value="val", info=info)


def build(ctx: Any, demo: gr.Blocks, tab: gr.Tab) -> gr.Dropdown:
    """Builds the Evaluate tab's components and events.

    Returns:
        The run dropdown (the Runs tab's "open in Evaluate" sets it).
    """
    with gr.Row():
        run = gr.Dropdown(label="Model (run)", choices=[], elem_id="eval-run", scale=4)
        refresh = gr.Button("↻ Refresh", scale=1)
        split = gr.Radio(["val", "test"], value="val", label="Split", info=TEST_SPLIT_INFO, scale=2,
                         elem_id="eval-split")
        top_k = gr.Number(value=5, precision=0, minimum=1, label="Top-k", scale=1)
    with gr.Row():
        evaluate = gr.Button("Evaluate", variant="primary", elem_id="evaluate-button", scale=3)
        report_button = gr.Button("Make a one-page HTML report", elem_id="report-button", scale=2)
    with gr.Row():
        report_message = gr.Markdown(elem_id="report-message")
        report_file = gr.File(label="Report", interactive=False, elem_id="report-file", visible=False)
    summary = gr.Markdown("Press **Evaluate**: how many images of the chosen split this model gets right, beside"
                          " what always answering the most common class gets, then the details.", elem_id="eval-summary")
    with gr.Column(visible=False, elem_id="eval-results") as results:
        with gr.Row():
            per_class = gr.Dataframe(label="Per class (click a header to sort)", interactive=False,
                                     elem_id="eval-per-class")
            per_class_csv = gr.DownloadButton("Download per-class CSV")
        with gr.Column(visible=False) as matrix_group:
            gr.Markdown("**Confusion matrix**: rows are the true class, columns the prediction; click a count to"
                        " see its images.")
            matrix_table = gr.Dataframe(interactive=False, elem_id="eval-matrix")
            cell_caption = gr.Markdown(elem_id="eval-cell-caption")
            cell_images = gr.Gallery(label="Images in the selected cell", columns=8, height=240,
                                     elem_id="eval-cell-gallery")
            with gr.Row():
                matrix = gr.Plot(label="Counts")
                matrix_normalized = gr.Plot(label="Row-normalized")
        with gr.Row():
            roc = gr.Plot(label="ROC")
            pr = gr.Plot(label="Precision-recall")
            reliability = gr.Plot(label="Calibration")
        top_losses = gr.Gallery(label="Top losses: the most confident mistakes", columns=6, height=260)
    evaluation = gr.State(None)
    # Fix the data: label issues, move / exclude / undo, retrain (its own module).
    label_issues_panel.build(ctx, run, evaluation, matrix_table, cell_images, top_losses)
    by_key = {"summary": summary, "per_class": per_class, "per_class_csv": per_class_csv,
              "matrix_table": matrix_table, "matrix": matrix, "matrix_normalized": matrix_normalized, "roc": roc,
              "pr": pr, "reliability": reliability, "top_losses": top_losses, "evaluation": evaluation,
              "results": results, "matrix_group": matrix_group, "cell_images": cell_images,
              "cell_caption": cell_caption}

    def on_evaluate(run_dir: str | None, split_name: str, k: float, progress: gr.Progress = gr.Progress()) -> tuple:
        units = {"Checking images": "files", "Predicting": "images", "Writing figures": "figures"}

        def report(stage: str, done: int, total: int) -> None:
            progress((done, total), desc=stage, unit=units.get(stage, "steps"))

        result = run_evaluation(ctx, run_dir, split_name, int(k or 5), report)
        return tuple(result[key] for key in OUTPUT_KEYS)

    def on_cell(result: Evaluation | None, event: gr.SelectData) -> tuple:
        row, column = event.index
        return cell_gallery(result, int(row), int(column))

    def on_report(run_dir: str | None) -> tuple:
        path, text = make_report(run_dir)
        return gr.update(value=path, visible=path is not None), text

    report_button.click(on_report, inputs=run, outputs=[report_file, report_message])
    # The long hint under the buttons gives way at once to a short line, so the progress text (centred
    # over this line) is not drawn over the hint.
    evaluate.click(lambda: "Evaluating…", outputs=summary, queue=False, show_progress="hidden")
    evaluate.click(on_evaluate, inputs=[run, split, top_k], outputs=[by_key[k] for k in OUTPUT_KEYS])
    run.change(split_choices, inputs=run, outputs=split)
    matrix_table.select(on_cell, inputs=evaluation, outputs=[cell_images, cell_caption])
    refresh.click(lambda current: refresh_runs(ctx, current), inputs=run, outputs=run)
    demo.load(lambda: refresh_runs(ctx, None), outputs=run)
    tab.select(lambda current: refresh_runs(ctx, current), inputs=run, outputs=run)
    return run
