"""The Evaluate tab's "Fix the data" panel: find label issues, select images, move / exclude, undo,
retrain on the fixed data.

Images are selected by clicking them in any of three galleries (the label-issues gallery, the
confusion-matrix cell and the top losses); the selection is a checklist, so a click never acts
on its own. Edits go through :mod:`vitft_app.dataset_edits` and only on datasets under the app's
data root or the built-in example's copy.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from ..dataset_edits import (
    EditError, check_editable, current_data_path, exclude, journal_frame, move_to_class, retrain_config, undo_all,
    undo_last,
)
from ..evaluate import Evaluation
from ..jobs import BusyError
from ..label_issues import LabelIssues, LabelIssuesError, find_run_label_issues
from ..runs_table import read_config
from .common import thumbnail
from .errors import unexpected_error

#: Images shown in the label-issues gallery (most suspicious first).
MAX_SHOWN = 48


def run_dataset(ctx: Any, run_dir: str | None) -> str:
    """The run's dataset as it is now (a CSV switched by edits is followed), checked to be one the
    app may edit.

    Raises:
        EditError: no run, or a dataset outside the data root and the example's copy.
    """
    if not run_dir:
        raise EditError("Choose a run with a saved model first.")
    data = read_config(run_dir).get("data_dir")
    if not data:
        raise EditError(f"{Path(run_dir).name} does not record its dataset.")
    data = current_data_path(data)
    # The data-root rule of the app (vitft_app.confine): a confined app edits only datasets under
    # its data root or the example's copy; a local app (loopback, no --auth, no --data-root) may
    # edit any dataset it trained, as it may read any folder.
    roots = [ctx.settings.data_root, ctx.settings.example_dir] if getattr(ctx.settings, "confined", True) else ["/"]
    check_editable(data, roots)
    return data


def run_classes(run_dir: str | None) -> list[str]:
    """Class names of the run's saved model (``model/config.json``'s ``id2label``), or ``[]``."""
    if not run_dir:
        return []
    try:
        config = json.loads((Path(run_dir) / "model" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    labels = config.get("id2label") or dict(enumerate(config.get("label_names") or []))  # timm: label_names
    return [labels[k] for k in sorted(labels, key=int)]


def issue_gallery(result: LabelIssues) -> list[tuple[Any, str]]:
    """``(thumbnail, "given → suggested (self-confidence)  file")`` per flagged image, most suspicious first."""
    items = []
    for row in result.issues.head(MAX_SHOWN).itertuples():
        thumb = thumbnail(row.path)
        if thumb is not None:
            items.append((thumb, f"{row.given_label} → {row.suggested_label} ({row.score:.2f})  "
                                 f"{os.path.basename(row.path)}"))
    return items


def _shown_paths(result: LabelIssues) -> list[str]:
    return [p for p in result.issues.head(MAX_SHOWN)["path"] if thumbnail(p) is not None]


def find_issues(ctx: Any, run_dir: str | None, progress: Any = None) -> tuple[list, list[str], str]:
    """Runs :func:`~vitft_app.label_issues.find_run_label_issues` for the panel.

    Returns:
        ``(gallery items, their paths, summary markdown)``; never raises.
    """
    if not run_dir:
        return [], [], "Choose a run with a saved model first."
    try:
        result = find_run_label_issues(run_dir, device=ctx.settings.device, progress=progress)
    except (LabelIssuesError, FileNotFoundError, ValueError, OSError) as exc:
        return [], [], f"✗ {exc}"
    except Exception as exc:  # noqa: BLE001 - shown to the user instead of a server error
        return [], [], unexpected_error(exc, "Label-issue search failed", run_dir=run_dir)
    lines = [f"**{len(result.issues)}** suspected label error(s) of {result.num_images} images; out-of-sample"
             f" accuracy {result.out_of_sample_accuracy:.4f} (majority-class baseline"
             f" {result.majority_baseline:.4f}). Saved in `{result.csv_path}`",
             f"Method: {result.method}."]
    if result.weak:
        lines.insert(0, "⚠ **The model is weak**: most of these flags are likely its own mistakes, not label"
                        " errors. Train a better model, then search again.")
    if len(result.outliers):
        names = ", ".join(f"`{os.path.basename(p)}`" for p in result.outliers["path"].head(8))
        lines.append(f"**{len(result.outliers)}** outlier(s), far from every other image: {names}"
                     + (" …" if len(result.outliers) > 8 else ""))
    if result.duplicates:
        lines.append(f"**{len(result.duplicates)}** group(s) of exact duplicates (see the Data tab's report).")
    return issue_gallery(result), _shown_paths(result), "\n\n".join(lines)


def _label(path: str, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return os.path.basename(path)


def add_to_selection(ctx: Any, run_dir: str | None, choices: list[str] | None, selected: list[str] | None,
                     path: str | None) -> tuple[Any, list[str]]:
    """The selection checklist with ``path`` added (and ticked).

    Args:
        choices: paths listed in the checklist so far.
        selected: paths ticked.
        path: the clicked image, or None.

    Returns:
        ``(gr.update of the checklist, its paths)``; labels are paths relative to the dataset.
    """
    choices = list(choices or [])
    selected = [p for p in (selected or []) if p in choices or p == path]
    if path and path not in choices:
        choices.append(path)
    if path and path not in selected:
        selected.append(path)
    root = None
    try:
        root = Path(run_dataset(ctx, run_dir))
        root = root.parent if root.is_file() else root
    except EditError:
        pass
    labels = [(_label(p, root) if root else os.path.basename(p), p) for p in choices]
    return gr.update(choices=labels, value=selected), choices


def apply_edit(ctx: Any, run_dir: str | None, selected: list[str] | None, action: str,
               class_name: str | None = None) -> tuple[str, list[str]]:
    """Moves or excludes the ticked images of the run's dataset.

    Returns:
        ``(message markdown, paths that were changed)``; never raises.
    """
    if not selected:
        return "Tick at least one image in the selection first.", []
    if action == "move" and not class_name:
        return "Choose the class to move the images to.", []
    try:
        data = run_dataset(ctx, run_dir)
        result = move_to_class(data, selected, class_name) if action == "move" else exclude(data, selected)
    except EditError as exc:
        return f"✗ {exc}", []
    except OSError as exc:
        return f"✗ {exc}", []
    names = ", ".join(f"`{os.path.basename(p)}`" for p in selected[:4]) + (" …" if len(selected) > 4 else "")
    return (f"✓ {result.message} ({names}) *Undo last* reverts it; evaluate again or retrain to see the effect.",
            list(selected))


def undo(ctx: Any, run_dir: str | None, everything: bool) -> str:
    """Undoes the last edit (or all of them) of the run's dataset; returns a message. Never raises."""
    try:
        data = run_dataset(ctx, run_dir)
        if everything:
            results = undo_all(data)
            return f"✓ Undid {len(results)} edit(s)." if results else "Nothing to undo."
        result = undo_last(data)
    except (EditError, OSError) as exc:
        return f"✗ {exc}"
    return f"✓ {result.message}" if result else "Nothing to undo."


def journal_view(ctx: Any, run_dir: str | None) -> pd.DataFrame:
    """The dataset's edit journal (newest first), empty when there is none or no run."""
    try:
        return journal_frame(run_dataset(ctx, run_dir))
    except (EditError, OSError):
        return pd.DataFrame(columns=["id", "time", "action", "to", "images", "in effect"])


def retrain(ctx: Any, run_dir: str | None) -> str:
    """Starts a new run with the same settings on the fixed data (job runner). Never raises."""
    if not run_dir:
        return "Choose a run first."
    try:
        run_dataset(ctx, run_dir)
        config, meta = retrain_config(run_dir)
        job = ctx.runner.start(dataclasses.replace(config, output_dir=str(ctx.settings.runs_dir)), meta=meta)
    except BusyError as exc:
        return f"● Busy: {exc}"
    except (EditError, ValueError, FileNotFoundError, OSError) as exc:
        return f"✗ {exc}"
    except Exception as exc:  # noqa: BLE001 - shown to the user instead of a server error
        return unexpected_error(exc, "Could not start", run_dir=run_dir)
    return (f"▶ Started `{job.run_dir.name}` ({meta['name']}), same settings on the fixed data."
            " Follow it in the Train tab; the Runs tab shows both runs.")


def build(ctx: Any, run: gr.Dropdown, evaluation: gr.State, matrix_table: gr.Dataframe, cell_gallery: gr.Gallery,
          top_losses: gr.Gallery) -> None:
    """Builds the panel under the Evaluate tab's results and wires the three galleries to it.

    Args:
        run: the tab's run dropdown.
        evaluation: the tab's :class:`~vitft_app.evaluate.Evaluation` state.
        matrix_table: the clickable confusion matrix (its select event picks the cell).
        cell_gallery: the images of the clicked cell.
        top_losses: the most confident mistakes.
    """
    with gr.Accordion("Fix the data: label issues, move, exclude, undo", open=True, elem_id="fix-data"):
        gr.Markdown(
            "**Find label issues** looks for images whose label disagrees with what a model that never"
            " trained on them predicts (confident learning, `cleanlab`). Click images here, in the confusion"
            " cell or in the top losses to select them, then move them to another class or exclude them"
            " (moved to `_excluded/`, never deleted). Every change is journalled in the dataset folder and"
            " can be undone."
        )
        with gr.Row():
            find = gr.Button("Find label issues", elem_id="find-issues", scale=1)
            issues_summary = gr.Markdown(elem_id="issues-summary")
        issues_gallery = gr.Gallery(label="Suspected label errors: given → suggested (self-confidence), most"
                                          " suspicious first", columns=8, height=260, allow_preview=False,
                                    elem_id="issues-gallery", visible=False)
        selection = gr.CheckboxGroup(label="Selected images (click images to add them; untick to leave one out)",
                                     choices=[], elem_id="fix-selection")
        with gr.Row():
            target = gr.Dropdown(label="Class", choices=[], elem_id="fix-class", scale=2)
            move = gr.Button("Move to class", elem_id="fix-move", scale=1)
            exclude_button = gr.Button("Exclude", elem_id="fix-exclude", scale=1)
            undo_button = gr.Button("Undo last", elem_id="fix-undo", scale=1)
            undo_all_button = gr.Button("Undo all", elem_id="fix-undo-all", scale=1)
        edit_message = gr.Markdown(elem_id="fix-message")
        with gr.Accordion("Edit journal", open=False):
            journal = gr.Dataframe(interactive=False, elem_id="fix-journal")
        with gr.Row():
            retrain_button = gr.Button("Retrain on the fixed data", variant="primary", elem_id="fix-retrain", scale=1)
            retrain_message = gr.Markdown(elem_id="fix-retrain-message")
    issue_paths = gr.State([])
    cell = gr.State(None)

    def on_find(run_dir: str | None, progress: gr.Progress = gr.Progress()) -> tuple:
        items, paths, text = find_issues(ctx, run_dir, lambda done, total: progress((done, total), desc="Embedding"))
        return gr.update(value=items, visible=bool(items)), paths, text

    def on_cell(event: gr.SelectData) -> Any:
        row, column = event.index
        return (int(row), int(column) - 1) if int(column) >= 1 else None

    def on_issue_image(run_dir: str | None, paths: list[str], known_paths: list, selected: list,
                       event: gr.SelectData) -> tuple:
        path = paths[event.index] if 0 <= event.index < len(paths or []) else None
        return add_to_selection(ctx, run_dir, known_paths, selected, path)

    def on_cell_image(run_dir: str | None, result: Evaluation | None, chosen: Any, known_paths: list,
                      selected: list, event: gr.SelectData) -> tuple:
        path = None
        if result is not None and chosen is not None and not result.multi_label:
            frame = result.cell_images(*chosen).head(48)
            path = frame["path"].iloc[event.index] if event.index < len(frame) else None
        return add_to_selection(ctx, run_dir, known_paths, selected, path)

    def on_loss_image(run_dir: str | None, result: Evaluation | None, known_paths: list, selected: list,
                      event: gr.SelectData) -> tuple:
        path = None
        if result is not None:
            frame = result.top_losses(12)
            path = frame["path"].iloc[event.index] if event.index < len(frame) else None
        return add_to_selection(ctx, run_dir, known_paths, selected, path)

    # The checklist's choices, mirrored in a per-session state for the handlers.
    known = gr.State([])

    def on_edit(run_dir: str | None, selected: list, known_paths: list, action: str, class_name: str | None) -> tuple:
        message, changed = apply_edit(ctx, run_dir, selected, action, class_name)
        remaining = [p for p in (known_paths or []) if p not in changed]
        kept = [p for p in (selected or []) if p not in changed]
        update, remaining = add_to_selection(ctx, run_dir, remaining, kept, None)
        return message, update, remaining, journal_view(ctx, run_dir)

    def on_undo(run_dir: str | None, everything: bool) -> tuple:
        return undo(ctx, run_dir, everything), journal_view(ctx, run_dir)

    def on_run(run_dir: str | None) -> tuple:
        classes = run_classes(run_dir)
        return (gr.update(choices=classes, value=None), journal_view(ctx, run_dir), [], [], "",
                gr.update(choices=[], value=[]), gr.update(value=[], visible=False))

    find.click(on_find, inputs=run, outputs=[issues_gallery, issue_paths, issues_summary])
    matrix_table.select(on_cell, outputs=cell)
    issues_gallery.select(on_issue_image, inputs=[run, issue_paths, known, selection], outputs=[selection, known])
    cell_gallery.select(on_cell_image, inputs=[run, evaluation, cell, known, selection], outputs=[selection, known])
    top_losses.select(on_loss_image, inputs=[run, evaluation, known, selection], outputs=[selection, known])
    move.click(lambda r, s, k, c: on_edit(r, s, k, "move", c), inputs=[run, selection, known, target],
               outputs=[edit_message, selection, known, journal])
    exclude_button.click(lambda r, s, k: on_edit(r, s, k, "exclude", None), inputs=[run, selection, known],
                         outputs=[edit_message, selection, known, journal])
    undo_button.click(lambda r: on_undo(r, False), inputs=run, outputs=[edit_message, journal])
    undo_all_button.click(lambda r: on_undo(r, True), inputs=run, outputs=[edit_message, journal])
    retrain_button.click(lambda r: retrain(ctx, r), inputs=run, outputs=retrain_message)
    run.change(on_run, inputs=run,
               outputs=[target, journal, issue_paths, known, issues_summary, selection, issues_gallery])
