"""Data tab: pick a dataset folder and see it checked."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
import json
import time

import gradio as gr
import pandas as pd

from ..app_state import dataset_choice, read_app_settings, update_app_settings
from ..data import DatasetReport, scan_dataset
from ..images import ImageLoadError, load_image
from ..uploads import UnsafeArchiveError, copy_folder_upload, delete_upload, extract_zip, list_uploads
from ..plots import figure_class_counts, figure_image_stats
from .common import download_path
from .errors import unexpected_error
from ..confine import resolve_allowed
from . import zero_shot_panel

logger = logging.getLogger(__name__)

SAMPLES_PER_CLASS = 4
MAX_CLASSES_SHOWN = 12


def resolve_data_path(text: str | None, settings: Any) -> Path:
    """Turns the path box text into a dataset folder the app may read.

    Relative paths are taken under the data root. When ``settings.confined`` the folder must be
    under ``settings.data_root`` or be the built-in example (:mod:`vitft_app.confine`); messages
    quote the path as typed, never the resolved one.

    Raises:
        ValueError: empty, missing, not a folder, or outside the data root (``PathNotAllowed``).
    """
    text = (text or "").strip()
    if not text:
        raise ValueError("Enter a dataset folder, or pick one in the folder browser.")
    allowed = [Path(settings.data_root), Path(settings.example_dir)]
    path = resolve_allowed(text, Path(settings.data_root), allowed, getattr(settings, "confined", True), "dataset folder")
    if not path.exists():
        raise ValueError(f"Folder not found: {text}")
    if not path.is_dir() and path.suffix.lower() != ".csv":
        raise ValueError(f"'{text}' is a file; choose the folder that holds one subfolder per class, or a labels CSV.")
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
    """``(summary, problems)`` Markdown for a scanned dataset: errors, warnings, skipped files
    with reasons, duplicate groups and ignored entries (first 50 of each)."""

    def rel(path: str) -> str:
        return report.relative(path)

    summary = f"**{Path(report.root).name}** · {report.summary()}"
    lines = [f"- ✗ {e}" for e in report.errors] + [f"- ⚠ {w}" for w in report.warnings]
    sections = [
        ("Skipped files", [f"`{rel(p)}`: {reason}" for p, reason in report.skipped]),
        ("Duplicates", [f"{', '.join(g.kinds)}: " + ", ".join(f"`{rel(p)}`" for p in g.paths)
                        for g in report.duplicates]),
        ("Ignored (hidden, system or non-image files, links)", [f"`{rel(p)}`" for p in report.ignored]),
    ]
    for title, entries in sections:
        if entries:
            lines.append(f"\n**{title}** ({len(entries)})")
            lines += [f"- {e}" for e in entries[:50]]
            if len(entries) > 50:
                lines.append(f"- … and {len(entries) - 50} more (download the CSV report)")
    if not report.errors and not report.warnings:
        lines.insert(0, "✓ Ready to train: no problems found.")
    return summary, "\n".join(lines)


#: Keys of :func:`scan_folder`'s result, in the order of :attr:`DataTab.outputs`.
OUTPUT_KEYS = ("summary", "problems", "counts", "figure", "sizes_figure", "samples", "csv", "classes",
               "suggested_image_size", "balance_button", "dataset")


@dataclass
class DataTab:
    """Components other tabs use."""

    path: gr.Textbox
    classes: gr.State
    suggested_size: gr.State
    outputs: list
    balance_button: gr.Button
    """Shown when the scan warns about class imbalance; the Train tab sets balanced class weights."""
    scan_handler: Callable
    """The Scan handler: path box value -> values for :attr:`outputs`."""
    chosen: gr.State
    """The chosen dataset (:func:`~vitft_app.app_state.dataset_choice` of the last good scan, saved
    server-side): what the Train tab shows and Start trains."""


def _write_csv(report: DatasetReport) -> str:
    """Writes the per-file report to a fresh temp file and returns its path (for download)."""
    path = download_path(f"{Path(report.root).name}-scan.csv")
    path.write_text(report.to_csv(), encoding="utf-8")
    return str(path)


def scan_folder(text: str | None, settings: Any, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Scans the folder named in the path box.

    Returns:
        A dict with :data:`OUTPUT_KEYS`: markdown ``summary`` and ``problems``, ``counts``
        (DataFrame), class-count and image-size ``figure``s, ``samples`` for the gallery, ``csv``
        (path of the downloadable report), ``classes`` and ``suggested_image_size``. On bad input
        ``summary`` holds the message and the rest is empty (never raises).
    """
    empty_counts = pd.DataFrame(columns=["class", "train", "val", "total"])
    failed = {"problems": "", "counts": empty_counts, "figure": figure_class_counts(empty_counts),
              "sizes_figure": figure_image_stats(pd.DataFrame()), "samples": [], "csv": None, "classes": [],
              "suggested_image_size": None, "balance_button": gr.update(visible=False), "dataset": None}
    try:
        folder = resolve_data_path(text, settings)
        report = scan_dataset(folder, progress=progress)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        return {"summary": f"✗ {exc}", **failed}
    except Exception as exc:  # noqa: BLE001 - shown to the user instead of a server error
        return {"summary": unexpected_error(exc, "Scan failed"), **failed}
    counts = report.counts()
    summary, problems = report_markdown(report)
    return {
        "summary": summary + " · **the chosen dataset**: the Train tab trains it",
        "problems": problems,
        "counts": counts,
        "figure": figure_class_counts(counts),
        "sizes_figure": figure_image_stats(report.file_table()),
        "samples": sample_thumbnails(report),
        "csv": _write_csv(report),
        "classes": report.classes,
        "suggested_image_size": report.suggested_image_size(),
        "balance_button": gr.update(visible=any(w.startswith("Class imbalance") for w in report.warnings)),
        "dataset": dataset_choice(report),
    }


def scan_folder_outputs_fn(ctx: Any) -> Callable:
    """The handler wired to Scan and page load: returns values in :attr:`DataTab.outputs` order."""

    def handler(text: str | None, progress: gr.Progress = gr.Progress()):
        def report_progress(done: int, total: int) -> None:
            progress((done, total), desc="Decoding images", unit="files")

        result = scan_folder(text, ctx.settings, report_progress)
        if result["dataset"] is None:
            result["dataset"] = gr.skip()  # a failed scan keeps the chosen dataset
        else:
            remember_dataset(ctx, result["dataset"])
        return tuple(result[key] for key in OUTPUT_KEYS)

    return handler


def remember_dataset(ctx: Any, choice: dict[str, Any]) -> None:
    """Saves the chosen dataset server-side (a reload and every tab show it); a write failure is
    logged, never shown as an error (the choice still holds for this page)."""
    try:
        update_app_settings(ctx.settings.runs_dir, dataset=choice)
    except OSError as exc:
        logger.warning("could not save the chosen dataset: %s", exc)


def saved_dataset_path(ctx: Any) -> str:
    """The path box value for a newly opened page: the saved dataset when it is still allowed and
    present, else the built-in example."""
    saved = (read_app_settings(ctx.settings.runs_dir).get("dataset") or {}).get("path")
    if saved:
        try:
            return str(resolve_data_path(saved, ctx.settings))
        except ValueError:
            pass
    return str(ctx.settings.example_dir)


def load_outputs_fn(ctx: Any) -> Callable:
    """The page-load handler: the saved dataset in the path box, then its scan (values in
    ``[path, *DataTab.outputs]`` order)."""
    scan = scan_folder_outputs_fn(ctx)

    def handler(progress: gr.Progress = gr.Progress()):
        path = saved_dataset_path(ctx)
        return (path, *scan(path, progress))

    return handler


#: Sent in the page head by the launcher: records each chosen file's path inside the chosen folder
#: (``webkitRelativePath``), which Gradio's directory upload does not pass to the server, so the
#: class folders can be rebuilt. Runs in the capture phase, before Gradio starts the upload.
FOLDER_UPLOAD_JS = """
<script>
document.addEventListener("change", (event) => {
  const input = event.target;
  if (!(input instanceof HTMLInputElement) || input.type !== "file" || !input.closest("#folder-upload")) return;
  const paths = Array.from(input.files || []).map((file) => file.webkitRelativePath || file.name);
  const box = document.querySelector("#folder-relpaths textarea");
  if (!box) return;
  box.value = JSON.stringify(paths);
  box.dispatchEvent(new Event("input", { bubbles: true }));
}, true);
</script>
"""


def receive_folder(files: list | None, relative_paths_json: str | None, settings: Any) -> tuple[Any, str]:
    """Rebuilds a browser-chosen folder under ``<data root>/uploads`` and points the path box at it.

    Returns:
        ``(path box value or gr.skip(), message markdown)``; never raises.
    """
    paths = [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in (files or [])]
    if not paths:
        return gr.skip(), ""
    try:
        try:
            relative = json.loads(relative_paths_json or "[]")
        except ValueError:
            relative = None  # refused below with the same message as any other unreadable form
        folder = copy_folder_upload(paths, relative, Path(settings.data_root) / "uploads",
                                    quota_bytes=getattr(settings, "uploads_quota_bytes", None))
    except (UnsafeArchiveError, ValueError) as exc:
        return gr.skip(), f"✗ {exc}"
    except OSError as exc:
        return gr.skip(), f"✗ Could not copy the folder into {settings.data_root}/uploads: {exc}"
    return str(folder), f"✓ Copied {len(paths)} files to `{folder}`."


def receive_upload(file: Any, settings: Any) -> tuple[Any, str]:
    """Extracts an uploaded zip under ``<data root>/uploads`` and points the path box at it.

    Returns:
        ``(path box value or gr.skip(), message markdown)``; never raises.
    """
    if not file:
        return gr.skip(), ""
    path = file if isinstance(file, str) else getattr(file, "name", str(file))
    if not str(path).lower().endswith(".zip"):
        return gr.skip(), "✗ Upload a .zip file holding one folder per class (or train/ and val/)."
    try:
        folder = extract_zip(path, Path(settings.data_root) / "uploads",
                             quota_bytes=getattr(settings, "uploads_quota_bytes", None))
    except UnsafeArchiveError as exc:
        return gr.skip(), f"✗ {exc}"
    except OSError as exc:
        return gr.skip(), f"✗ Could not extract the zip into {settings.data_root}/uploads: {exc}"
    return str(folder), f"✓ Extracted to `{folder}`."


def upload_choices(settings: Any) -> list[tuple[str, str]]:
    """``(label, folder)`` for each upload, newest first: name, size and age."""

    choices = []
    for upload in list_uploads(Path(settings.data_root) / "uploads"):
        days = (time.time() - upload.modified) / 86400
        age = f"{days:.0f} days ago" if days >= 1.5 else "today" if days < 1 else "yesterday"
        choices.append((f"{upload.path.name} ({upload.size_bytes / 1024**2:,.1f} MiB, {age})", str(upload.path)))
    return choices


def delete_upload_folder(ctx: Any, folder: str | None) -> tuple[Any, str]:
    """Deletes one uploaded dataset unless the running job trains on it.

    Returns:
        ``(uploads dropdown update, message)``; never raises.
    """
    settings = ctx.settings
    if not folder:
        return gr.update(choices=upload_choices(settings), value=None), "Choose an upload first."
    job = ctx.runner.current
    if job is not None and job.running and job.config is not None:
        data = Path(job.config.data_dir).resolve()
        if data == Path(folder).resolve() or data.is_relative_to(Path(folder).resolve()):
            return gr.update(), "✗ A training run is using this upload: stop it first."
    try:
        deleted = delete_upload(folder, Path(settings.data_root) / "uploads")
    except (ValueError, OSError) as exc:
        return gr.update(choices=upload_choices(settings), value=None), f"✗ {exc}"
    return gr.update(choices=upload_choices(settings), value=None), f"✓ Deleted the upload `{deleted.name}`."


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
    if path.is_file() and path.suffix.lower() != ".csv":
        gr.Warning("Pick a folder (the one that holds a subfolder per class) or a labels CSV, not an image.")
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
                info="One subfolder per class, or train/ and val/ holding them, or a labels CSV (image path, label)."
                     + (f" Must be under {settings.data_root} (the built-in MNIST example is always allowed)."
                        if settings.confined else " Relative paths start in the data root."),
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
    with gr.Accordion("Upload a dataset (.zip or a folder)", open=False):
        with gr.Row():
            upload = gr.File(label="A .zip holding one folder per class (or train/ and val/)",
                             file_types=[".zip"], type="filepath", elem_id="zip-upload")
            folder_upload = gr.File(label="Or click to choose a folder (one subfolder per class)",
                                    file_count="directory", type="filepath", elem_id="folder-upload")
        relpaths = gr.Textbox(elem_id="folder-relpaths", elem_classes="vitft-hidden", container=False)
        upload_message = gr.Markdown(elem_id="upload-message")
        with gr.Row(equal_height=True):
            uploads = gr.Dropdown(label="Uploaded datasets", choices=upload_choices(settings), value=None, scale=4,
                                  elem_id="uploads-list",
                                  info=f"Uploads may use {settings.uploads_quota_bytes / 1024**3:,.1f} GiB in all"
                                       " (--uploads-quota-mb)")
            delete_upload_button = gr.Button("Delete upload", scale=1, size="sm", elem_id="delete-upload")
    summary = gr.Markdown(elem_id="data-summary")
    problems = gr.Markdown(elem_id="data-problems")
    balance_button = gr.Button("Train with balanced class weights", visible=False, size="sm",
                               elem_id="balance-button")
    with gr.Row():
        counts = gr.Dataframe(label="Images per class", interactive=False, elem_id="class-table")
        figure = gr.Plot(label="Class counts")
    sizes_figure = gr.Plot(label="Image sizes, aspect ratios and modes")
    csv = gr.DownloadButton("Download the scan report (CSV)", elem_id="scan-csv")
    samples = gr.Gallery(label="Samples (first images of each class)", columns=8, height=260, object_fit="contain")
    classes = gr.State([])
    suggested_size = gr.State(None)
    chosen = gr.State(None)
    zero_shot_panel.build(ctx, chosen)  # a CLIP/SigLIP baseline of the chosen dataset (ui/zero_shot_panel.py)
    by_key = {"summary": summary, "problems": problems, "counts": counts, "figure": figure,
              "sizes_figure": sizes_figure, "samples": samples, "csv": csv, "classes": classes,
              "suggested_image_size": suggested_size, "balance_button": balance_button, "dataset": chosen}
    outputs = [by_key[key] for key in OUTPUT_KEYS]

    handler = scan_folder_outputs_fn(ctx)
    refresh_uploads = lambda: gr.update(choices=upload_choices(settings))  # noqa: E731
    upload.upload(lambda f: receive_upload(f, settings), inputs=upload, outputs=[path, upload_message]).then(
        handler, inputs=path, outputs=outputs).then(refresh_uploads, outputs=uploads)
    uploads.focus(refresh_uploads, outputs=uploads)
    delete_upload_button.click(lambda folder: delete_upload_folder(ctx, folder), inputs=uploads,
                               outputs=[uploads, upload_message])
    # The recorded paths are cleared after each folder, so a later upload never reuses them.
    folder_upload.upload(lambda f, rel: (*receive_folder(f, rel, settings), ""), inputs=[folder_upload, relpaths],
                         outputs=[path, upload_message, relpaths]).then(handler, inputs=path, outputs=outputs).then(
        refresh_uploads, outputs=uploads)
    scan.click(handler, inputs=path, outputs=outputs)
    path.submit(handler, inputs=path, outputs=outputs)
    example.click(lambda: str(settings.example_dir), outputs=path).then(handler, inputs=path, outputs=outputs)
    browser.change(lambda sel: picked_folder(sel, settings), inputs=browser, outputs=path)
    return DataTab(path=path, classes=classes, suggested_size=suggested_size, outputs=outputs,
                   balance_button=balance_button, scan_handler=handler, chosen=chosen)
