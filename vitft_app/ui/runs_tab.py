"""Runs tab: every run in one table; filter, sort, rename, delete, open in Evaluate/Predict,
resume, compare curves and configs; the tracking switch for new runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from ..baseline import format_accuracy, is_weak_rate, run_baseline
from ..plots import figure_compare
from ..run_status import STATUSES
from ..runs import is_run_dir, model_dir, read_status
from ..runs_table import (
    RESULT_ROWS,
    compare_configs,
    delete_run,
    filter_runs,
    metrics_by_run,
    rename_run,
    runs_table,
    style_differences,
)
from ..tracking import REPORT_TO_CHOICES, check_report_to
from ..demo import DemoError
from .predict_tab import run_choices as model_choices
from .train_tab import button_states, resume_run
from ..zero_shot import ZERO_SHOT_KIND, zero_shot_refusal

#: Columns shown in the table (``path`` stays server-side).
#: The result columns come first, so they are on screen at 1400 pixels without scrolling sideways.
SHOWN_COLUMNS = ["name", "status", "best_val_accuracy", "val_baseline", "macro_f1", "dataset", "model", "freeze_depth",
                 "lr", "batch_size", "epochs", "augment", "duration", "date", "sweep", "retrained_from", "run_id"]
#: The table's headers in words (the field's terms; ``refresh`` renames :data:`SHOWN_COLUMNS` to these).
HEADERS = {"best_val_accuracy": "best val accuracy", "val_baseline": "val baseline", "macro_f1": "macro-F1",
           "freeze_depth": "freeze depth", "batch_size": "batch size", "retrained_from": "retrained from",
           "run_id": "run id"}
SORT_CHOICES = ["date", "name", "status", "best_val_accuracy", "macro_f1", "lr", "batch_size", "epochs", "sweep"]
STATUS_FILTERS = ["all"] + [s for s in STATUSES if s != "starting"]


def active_run(ctx: Any) -> str | None:
    """The run folder the app's job is training now, or None."""
    job = ctx.runner.current
    return str(job.run_dir) if job is not None and job.running else None


def table_view(ctx: Any, text: str | None = None, status: str | None = "all", sort_by: str | None = "date",
               descending: bool = True) -> pd.DataFrame:
    """The filtered, sorted runs table as shown: accuracies as percentages with one decimal (the
    rounding used everywhere), each beside its baseline (always answering the validation split's
    most common class), macro-F1 rounded to 4 places."""
    column = "run_id" if sort_by in (None, "", "date") else sort_by  # run ids start with the start time
    frame = filter_runs(runs_table(ctx.settings.runs_dir), text, status, column, descending)
    shown = frame[SHOWN_COLUMNS].copy()
    shown["best_val_accuracy"] = [
        "" if pd.isna(value) else format_accuracy(value) + (" (weak)" if is_weak_rate(value, rate) else "")
        for value, rate in zip(pd.to_numeric(frame["best_val_accuracy"], errors="coerce"),
                               pd.to_numeric(frame["val_baseline"], errors="coerce"))]
    shown["val_baseline"] = ["" if pd.isna(rate) else f"{format_accuracy(rate)} ('{name}')"
                             for rate, name in zip(pd.to_numeric(frame["val_baseline"], errors="coerce"),
                                                   frame["baseline_class"])]
    shown["macro_f1"] = pd.to_numeric(shown["macro_f1"], errors="coerce").round(4)
    shown["lr"] = pd.to_numeric(shown["lr"], errors="coerce").map(lambda v: float(f"{v:.3g}"), na_action="ignore")
    zero_shot = frame["kind"] == ZERO_SHOT_KIND  # a baseline row: "zero-shot" where a run has its epochs
    shown["epochs"] = [ZERO_SHOT_KIND if z else ("" if pd.isna(e) else int(e)) for z, e in zip(zero_shot, shown["epochs"])]
    shown["model"] = [f"{m} ({ZERO_SHOT_KIND})" if z else m for z, m in zip(zero_shot, shown["model"])]  # on screen at 1400 px
    return shown


def run_choices(ctx: Any) -> list[tuple[str, str]]:
    """``(label, run folder)`` for every run, newest first (label: display name and run id)."""
    frame = runs_table(ctx.settings.runs_dir)
    return [(name if name == run_id else f"{name} ({run_id})", path)
            for name, run_id, path in zip(frame["name"], frame["run_id"], frame["path"])]


def refresh(ctx: Any, text: str | None, status: str | None, sort_by: str | None, descending: bool,
            selected: str | None, compared: list[str] | None) -> tuple[pd.DataFrame, Any, Any]:
    """``(table with :data:`HEADERS`, selected-run dropdown update, compare dropdown update)``; keeps
    choices that still exist. An empty comparison is filled with two runs, the selected one first,
    then the newest, so opening *Compare runs* needs one click."""
    choices = run_choices(ctx)
    paths = [path for _, path in choices]
    selected = selected if selected in paths else None
    kept = [p for p in (compared or []) if p in paths]
    if not kept and len(paths) >= 2:
        kept = list(dict.fromkeys([*([selected] if selected else []), *paths]))[:2]
    return (table_view(ctx, text, status, sort_by, descending).rename(columns=HEADERS),
            gr.update(choices=choices, value=selected), gr.update(choices=choices, value=kept))


def run_from_row(ctx: Any, table: pd.DataFrame | None, row: int) -> str | None:
    """The run folder of a clicked row of the table as shown (:func:`refresh`), via its run id cell."""
    column = HEADERS["run_id"]
    if table is None or not len(table) or row < 0 or row >= len(table) or column not in table.columns:
        return None
    path = Path(ctx.settings.runs_dir) / str(table.iloc[row][column])
    return str(path) if is_run_dir(path) else None


def rename_selected(ctx: Any, run_dir: str | None, name: str | None) -> str:
    """Renames (display name only) and returns a message. Never raises."""
    if not run_dir:
        return "Choose a run first (click its row)."
    try:
        shown = rename_run(run_dir, name or "")
    except (FileNotFoundError, ValueError, OSError) as exc:
        return f"✗ {exc}"
    return f"✏ `{Path(run_dir).name}` is now shown as **{shown}** (the folder keeps its name)."


def ask_delete(ctx: Any, run_dir: str | None) -> tuple[str, Any]:
    """First step of Delete: ``(message, confirmation row update)``; refuses the running job."""
    if not run_dir:
        return "Choose a run first (click its row).", gr.update(visible=False)
    if active_run(ctx) == run_dir or read_status(run_dir).is_active:
        return f"✗ `{Path(run_dir).name}` is training right now: press Stop and wait for it to end first.", \
            gr.update(visible=False)
    return (f"⚠ Delete `{Path(run_dir).name}` and everything in its folder (model, metrics, evaluations)?"
            " This cannot be undone.", gr.update(visible=True))


def confirm_delete(ctx: Any, run_dir: str | None) -> tuple[str, Any]:
    """Deletes after confirmation: ``(message, confirmation row update)``. Never raises."""
    hide = gr.update(visible=False)
    if not run_dir:
        return "Choose a run first (click its row).", hide
    try:
        delete_run(run_dir, ctx.settings.runs_dir, active_run(ctx))
    except (FileNotFoundError, ValueError, OSError) as exc:
        return f"✗ {exc}", hide
    return f"✓ Deleted `{Path(run_dir).name}`.", hide


def open_in(ctx: Any, run_dir: str | None, target: str) -> tuple[Any, str, bool]:
    """Prepares "open in Evaluate / Predict".

    Args:
        target: ``"evaluate"`` or ``"predict"``.

    Returns:
        ``(run dropdown update for that tab, message, whether to switch tabs)``; a run without a
        saved model is a message and no switch.
    """
    if not run_dir:
        return gr.skip(), "Choose a run first (click its row).", False
    if refusal := zero_shot_refusal(run_dir, target):
        return gr.skip(), f"✗ {refusal}", False
    if model_dir(run_dir) is None:
        return gr.skip(), f"✗ `{Path(run_dir).name}` has no saved model yet (no epoch finished).", False
    return gr.update(choices=model_choices(ctx), value=run_dir), f"Opened `{Path(run_dir).name}` in {target.title()}.", True


def open_demo(ctx: Any, run_dir: str | None, page_host: str = "127.0.0.1") -> tuple[str, int | None]:
    """Starts (or reuses) the run's demo page on its own port in this process
    (:class:`~vitft_app.ui.demo_page.DemoServers`). Never raises.

    Args:
        page_host: the host name the browser used for the app (the link points there).

    Returns:
        ``(message markdown with a link that opens a new tab, port or None)``.
    """
    if not run_dir:
        return "Choose a run first (click its row).", None
    if refusal := zero_shot_refusal(run_dir, "show in a demo page"):
        return f"✗ {refusal}", None
    try:
        port = ctx.demo_servers.open(run_dir)
    except (DemoError, FileNotFoundError, OSError, ValueError) as exc:
        return f"✗ {exc}", None
    url = f"http://{page_host}:{port}/"
    return (f'Demo page of `{Path(run_dir).name}`: <a href="{url}" target="_blank" id="runs-demo-link">{url}</a>'
            " (opens in a new tab; it stays up while the app runs).", port)


def _browser_host(request: Any) -> str:
    """The host name in the browser's address bar for this app (from the request's Host header)."""
    host = (getattr(request, "headers", None) or {}).get("host", "") if request is not None else ""
    if host.startswith("["):  # [IPv6]:port
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if host else "127.0.0.1"


def selection_buttons(ctx: Any, run_dir: str | None) -> tuple:
    """The row of actions as the selected run allows: off until a run is selected; Resume only for
    a run that ended with a checkpoint to resume from (the Train tab's rule,
    :func:`vitft_app.ui.train_tab.button_states`).

    Returns:
        ``gr.update(interactive=...)`` for Rename, Open in Evaluate, Open in Predict, Resume, Open
        demo page and Delete, in that order.
    """
    chosen = bool(run_dir) and is_run_dir(run_dir)
    resume = button_states(ctx, run_dir, read_status(run_dir))[2] if chosen else gr.update(interactive=False)
    return (*(gr.update(interactive=chosen) for _ in range(3)), resume, gr.update(interactive=chosen),
            gr.update(interactive=chosen))


def resume_selected(ctx: Any, run_dir: str | None) -> str:
    """Resumes the selected stopped, interrupted or failed run from its checkpoint (the Train
    tab's Resume, :func:`vitft_app.ui.train_tab.resume_run`). Never raises."""
    if not run_dir:
        return "Choose a run first (click its row)."
    if refusal := zero_shot_refusal(run_dir, "resume"):
        return f"✗ {refusal}"
    text, resumed = resume_run(ctx, run_dir)
    return text + (" Follow it in the Train tab." if resumed else "")


def compare(ctx: Any, run_dirs: list[str] | None) -> tuple[Any, Any, Any, str]:
    """``(loss figure, val accuracy figure, config table (Styler), message)`` for the chosen runs."""
    run_dirs = [r for r in (run_dirs or []) if is_run_dir(r)]
    if len(run_dirs) < 2:
        return None, None, None, "Choose at least two runs to compare."
    metrics = metrics_by_run(run_dirs)
    table = compare_configs(run_dirs)
    differing = int((table["differs"] & ~table["setting"].isin(RESULT_ROWS)).sum())  # results are not settings
    baselines = [run_baseline(read_status(run_dir)) for run_dir in run_dirs]
    return (figure_compare(metrics, "loss"), figure_compare(metrics, "val_accuracy", baselines), style_differences(table),
            f"{len(run_dirs)} runs; {differing} setting(s) differ (highlighted and listed first, with the results"
            " that differ).")


def set_tracking(ctx: Any, value: str) -> tuple[str, str]:
    """Sets the tracking backend of new runs (Train tab and sweeps) for this app.

    Returns:
        ``(value now in effect, message)``; a missing package keeps ``"none"`` and says what to install.
    """
    try:
        ctx.runner.report_to = check_report_to(value)
    except ValueError as exc:
        ctx.runner.report_to = "none"
        return "none", f"✗ {exc}"
    if ctx.runner.report_to == "none":
        return "none", "New runs write only their run folder."
    where = "RUN_DIR/tensorboard (tensorboard --logdir <runs folder>)" if value == "tensorboard" else \
        "RUN_DIR/mlruns, or MLFLOW_TRACKING_URI when set"
    return ctx.runner.report_to, f"New runs also report to **{value}**: {where}."


def build(ctx: Any, demo: gr.Blocks, tab: gr.Tab, tabs: gr.Tabs, evaluate_run: gr.Dropdown,
          predict_run: gr.Dropdown) -> None:
    """Builds the Runs tab.

    Args:
        tabs: the app's ``gr.Tabs`` (open in Evaluate / Predict switches it).
        evaluate_run, predict_run: those tabs' run dropdowns.
    """
    with gr.Row():
        text = gr.Textbox(label="Filter", placeholder="name, dataset, model or sweep", scale=3, elem_id="runs-filter")
        status = gr.Dropdown(STATUS_FILTERS, value="all", label="Status", scale=1, elem_id="runs-status")
        sort_by = gr.Dropdown([(HEADERS.get(c, c), c) for c in SORT_CHOICES], value="date", label="Sort by", scale=1)
        descending = gr.Checkbox(True, label="Descending", scale=1)
        refresh_button = gr.Button("↻ Refresh", scale=1)
    table = gr.Dataframe(label="Runs (click a row to select it)", interactive=False, elem_id="runs-table")
    with gr.Row():
        selected = gr.Dropdown(label="Selected run", choices=[], scale=3, elem_id="runs-selected")
        new_name = gr.Textbox(label="New display name", scale=2, elem_id="runs-new-name")
        rename_button = gr.Button("Rename", scale=1, elem_id="runs-rename", interactive=False)
    with gr.Row():
        # Off until a run is selected (selection_buttons).
        evaluate_button = gr.Button("Open in Evaluate", elem_id="runs-open-evaluate", interactive=False)
        predict_button = gr.Button("Open in Predict", elem_id="runs-open-predict", interactive=False)
        resume_button = gr.Button("Resume", elem_id="runs-resume", interactive=False)
        demo_button = gr.Button("Open demo page", elem_id="runs-open-demo", interactive=False)
        delete_button = gr.Button("Delete…", variant="stop", elem_id="runs-delete", interactive=False)
    with gr.Row(visible=False) as confirm_row:
        confirm_button = gr.Button("Yes, delete it", variant="stop", elem_id="runs-delete-confirm")
        cancel_button = gr.Button("Cancel")
    message = gr.Markdown(elem_id="runs-message")
    with gr.Accordion("Compare runs", open=False):
        compared = gr.Dropdown(label="Runs to compare", choices=[], multiselect=True, elem_id="runs-compare")
        compare_button = gr.Button("Compare", elem_id="runs-compare-button")
        compare_message = gr.Markdown()
        with gr.Row():
            loss_plot = gr.Plot(label="Training loss", visible=False)
            accuracy_plot = gr.Plot(label="Validation accuracy", visible=False, elem_id="runs-compare-accuracy")
        config_table = gr.Dataframe(label="Settings side by side (differing rows highlighted)", interactive=False,
                                    visible=False,
                                    elem_id="runs-compare-table")
    with gr.Accordion("Tracking", open=False):
        tracking = gr.Radio(list(REPORT_TO_CHOICES), value=ctx.runner.report_to,
                            label="Also report new runs (Train tab and sweeps) to",
                            info="tensorboard and mlflow need pip install -e '.[tracking]'", elem_id="runs-tracking")
        tracking_message = gr.Markdown()
    switch = gr.State(False)

    filters = [text, status, sort_by, descending, selected, compared]
    outputs = [table, selected, compared]

    def on_refresh(*values: Any) -> tuple:
        return refresh(ctx, *values)

    def on_row(frame: pd.DataFrame, event: gr.SelectData) -> Any:
        run_dir = run_from_row(ctx, frame, int(event.index[0]))
        return run_dir if run_dir else gr.skip()

    for trigger in (refresh_button.click, text.submit, status.change, sort_by.change, descending.change, tab.select):
        trigger(on_refresh, inputs=filters, outputs=outputs)
    demo.load(on_refresh, inputs=filters, outputs=outputs)
    table.select(on_row, inputs=table, outputs=selected)
    rename_button.click(lambda run_dir, name: rename_selected(ctx, run_dir, name), inputs=[selected, new_name],
                        outputs=message).then(on_refresh, inputs=filters, outputs=outputs)
    delete_button.click(lambda run_dir: ask_delete(ctx, run_dir), inputs=selected, outputs=[message, confirm_row])
    confirm_button.click(lambda run_dir: confirm_delete(ctx, run_dir), inputs=selected,
                         outputs=[message, confirm_row]).then(on_refresh, inputs=filters, outputs=outputs)
    cancel_button.click(lambda: ("Not deleted.", gr.update(visible=False)), outputs=[message, confirm_row])
    resume_button.click(lambda run_dir: resume_selected(ctx, run_dir), inputs=selected, outputs=message)
    def on_demo(run_dir: str | None, request: gr.Request) -> str:
        return open_demo(ctx, run_dir, _browser_host(request))[0]

    demo_button.click(on_demo, inputs=selected, outputs=message)
    actions = [rename_button, evaluate_button, predict_button, resume_button, demo_button, delete_button]
    selected.change(lambda run_dir: selection_buttons(ctx, run_dir), inputs=selected, outputs=actions)
    for button, target, dropdown in ((evaluate_button, "evaluate", evaluate_run), (predict_button, "predict", predict_run)):
        # Set the target tab's dropdown first, then switch, so its select handler sees the new value.
        button.click(lambda run_dir, target=target: open_in(ctx, run_dir, target), inputs=selected,
                     outputs=[dropdown, message, switch]).then(
            lambda go, target=target: gr.Tabs(selected=target) if go else gr.skip(), inputs=switch, outputs=tabs)
    def on_compare(run_dirs: list[str] | None) -> tuple:
        loss, accuracy, settings, text = compare(ctx, run_dirs)
        return (*(gr.update(value=v, visible=v is not None) for v in (loss, accuracy, settings)), text)

    compare_button.click(on_compare, inputs=compared,
                         outputs=[loss_plot, accuracy_plot, config_table, compare_message])
    tracking.change(lambda value: set_tracking(ctx, value), inputs=tracking, outputs=[tracking, tracking_message])
