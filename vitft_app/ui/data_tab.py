"""Data tab: pick a dataset folder and see it checked."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import pandas as pd

from ..data import DatasetReport, scan_dataset
from ..images import ImageLoadError, load_image
from .plots import figure_class_counts

SAMPLES_PER_CLASS = 4
MAX_CLASSES_SHOWN = 12


def resolve_data_path(text: str | None, settings: Any) -> Path:
    """Turns the path box text into a dataset folder the app may read.

    Relative paths are taken under the data root. The folder must be under ``settings.data_root``
    or be the built-in example.

    Raises:
        ValueError: empty, missing, not a folder, or outside the data root.
    """
    text = (text or "").strip()
    if not text:
        raise ValueError("Enter a dataset folder, or pick one in the folder browser.")
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = settings.data_root / path
    path = path.resolve()
    allowed = [Path(settings.data_root).resolve(), Path(settings.example_dir).resolve()]
    if not any(path == root or path.is_relative_to(root) for root in allowed):
        raise ValueError(
            f"{path} is outside the data root {allowed[0]}. Start the app with --data-root to allow other folders."
        )
    if not path.exists():
        raise ValueError(f"Folder not found: {path}")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; choose the folder that holds one subfolder per class.")
    return path


def sample_thumbnails(report: DatasetReport, per_class: int = SAMPLES_PER_CLASS) -> list[tuple[Any, str]]:
    """A few ``(thumbnail, class name)`` pairs per class for ``gr.Gallery`` (same loader as training)."""
    shown: list[tuple[Any, str]] = []
    for index, name in enumerate(report.classes[:MAX_CLASSES_SHOWN]):
        paths = [i.path for i in report.train if i.label == index][:per_class]
        for path in paths:
            try:
                image = load_image(path, draft_size=(256, 256))
            except ImageLoadError:
                continue
            image.thumbnail((160, 160))
            shown.append((image, name))
    return shown


def report_markdown(report: DatasetReport) -> tuple[str, str]:
    """``(summary, problems)`` Markdown for a scanned dataset."""
    summary = f"**{Path(report.root).name}** · {report.summary()}"
    lines = [f"- ❌ {e}" for e in report.errors] + [f"- ⚠️ {w}" for w in report.warnings]
    if report.skipped:
        lines.append("\n**Skipped files**")
        lines += [f"- `{os.path.relpath(p, report.root)}`: {reason}" for p, reason in report.skipped[:50]]
        if len(report.skipped) > 50:
            lines.append(f"- … and {len(report.skipped) - 50} more")
    if not lines:
        lines = ["✅ No problems found."]
    return summary, "\n".join(lines)


@dataclass
class DataTab:
    """Components other tabs use."""

    path: gr.Textbox
    classes: gr.State
    suggested_size: gr.State
    outputs: list


def scan_folder(text: str | None, settings: Any) -> dict[str, Any]:
    """Scans the folder named in the path box.

    Returns:
        ``{"summary", "problems", "counts" (DataFrame), "figure", "samples", "classes",
        "suggested_image_size"}``;
        on bad input ``summary`` holds the message and the rest is empty (never raises).
    """
    empty = {"counts": pd.DataFrame(columns=["class", "train", "val", "total"]), "samples": [], "classes": [],
             "suggested_image_size": None}
    try:
        folder = resolve_data_path(text, settings)
        report = scan_dataset(folder)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        return {"summary": f"❌ {exc}", "problems": "", "figure": figure_class_counts(empty["counts"]), **empty}
    counts = report.counts()
    summary, problems = report_markdown(report)
    return {
        "summary": summary,
        "problems": problems,
        "counts": counts,
        "figure": figure_class_counts(counts),
        "samples": sample_thumbnails(report),
        "classes": report.classes,
        "suggested_image_size": report.suggested_image_size(),
    }


def scan_folder_outputs_fn(ctx: Any) -> Callable:
    """The handler wired to Scan and page load: returns values in :attr:`DataTab.outputs` order."""

    def handler(text: str | None):
        result = scan_folder(text, ctx.settings)
        return (result["summary"], result["problems"], result["counts"], result["figure"],
                result["samples"], result["classes"], result["suggested_image_size"])

    return handler


def picked_folder(selection: str | list | None, settings: Any) -> str:
    """Path box text for a folder-browser selection; a file is refused with a hint (its parent
    would be a class folder, not the dataset)."""
    if isinstance(selection, list):
        selection = selection[0] if selection else None
    if not selection:
        return gr.skip()
    path = Path(selection)
    if not path.is_absolute():
        path = Path(settings.data_root) / path
    if path.is_file():
        gr.Warning("Pick a folder (the one that holds a subfolder per class), not a file.")
        return gr.skip()
    return str(path)


def build(ctx: Any) -> DataTab:
    """Builds the Data tab's components and events."""
    settings = ctx.settings
    with gr.Row():
        with gr.Column(scale=3):
            path = gr.Textbox(
                label="Dataset folder",
                value=str(settings.example_dir),
                info=f"One subfolder per class, or train/ and val/ holding them. Must be under {settings.data_root}"
                     " (the built-in MNIST example is always allowed).",
                elem_id="data-path",
            )
            with gr.Row():
                scan = gr.Button("Scan", variant="primary", elem_id="scan-button")
                example = gr.Button("Use the built-in example", elem_id="example-button")
        with gr.Column(scale=2):
            with gr.Accordion("Browse the data root", open=False):
                browser = gr.FileExplorer(
                    root_dir=str(settings.data_root),
                    file_count="single",
                    ignore_glob="*/.*",
                    label=f"Folders under {settings.data_root}",
                    height=260,
                )
    summary = gr.Markdown(elem_id="data-summary")
    problems = gr.Markdown(elem_id="data-problems")
    with gr.Row():
        counts = gr.Dataframe(label="Images per class", interactive=False, elem_id="class-table")
        figure = gr.Plot(label="Class counts")
    samples = gr.Gallery(label="Samples (first images of each class)", columns=8, height=260, object_fit="contain")
    classes = gr.State([])
    suggested_size = gr.State(None)
    outputs = [summary, problems, counts, figure, samples, classes, suggested_size]

    handler = scan_folder_outputs_fn(ctx)
    scan.click(handler, inputs=path, outputs=outputs)
    path.submit(handler, inputs=path, outputs=outputs)
    example.click(lambda: str(settings.example_dir), outputs=path).then(handler, inputs=path, outputs=outputs)
    browser.change(lambda sel: picked_folder(sel, settings), inputs=browser, outputs=path)
    return DataTab(path=path, classes=classes, suggested_size=suggested_size, outputs=outputs)
