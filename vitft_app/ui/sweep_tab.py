"""Sweep tab: fixed settings, the search space (checkboxes and ranges), Start/Stop, and the
results of a sweep: trials table, optimization history, parameter importance, train best config."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import gradio as gr

from ..config import SCRATCH_MODEL, TrainConfig
from ..scratch import is_scratch_model
from ..jobs import BusyError
from ..modeling import MODEL_CHOICES, ModelLoadError
from .form import field_widget
from .errors import unexpected_error
from ..sweep import (
    DEFAULT_RANGES,
    SweepError,
    augment_choices,
    available_parameters,
    default_pruner,
    figure_history,
    figure_importance,
    list_sweeps,
    load_sweep,
    start_sweep,
    study_summary,
    train_best,
    trials_frame,
)
from .data_tab import resolve_data_path
from .train_tab import config_from_form

#: Batch sizes offered as checkboxes.
BATCH_SIZES = [8, 16, 32, 64, 128]
#: Fixed settings of the sweep form (TrainConfig field names); the searched ones override them.
FIXED_FIELDS = ("model", "image_size", "epochs", "batch_size", "lr", "weight_decay", "freeze_depth", "augment",
                "precision", "seed")
#: Keys of :func:`show_sweep`'s result, in the order of the tab's outputs.
RESULT_KEYS = ("summary", "trials", "history", "importance", "charts_message")


def space_spec(name: str) -> Any:
    """The default spec of a parameter: a range dict, or the list of values offered."""
    if name == "augment":
        return augment_choices()
    if name == "batch_size":
        return list(DEFAULT_RANGES["batch_size"])
    return DEFAULT_RANGES.get(name, {"low": 0.0, "high": 1.0, "log": False})


def space_from_form(values: dict[str, Any]) -> dict[str, Any]:
    """Builds the search space from the form.

    Args:
        values: ``{"<param>.on": bool, "<param>.low": number, "<param>.high": number}`` for ranges,
            ``{"<param>.on": bool, "<param>.values": [...]}`` for value lists.

    Returns:
        ``{param: spec}`` for the checked parameters (ranges keep their default ``log`` flag;
        validated later by :func:`~vitft_app.sweep.validate_space`).
    """
    space: dict[str, Any] = {}
    for name in available_parameters():
        if not values.get(f"{name}.on"):
            continue
        default = space_spec(name)
        if isinstance(default, list):
            space[name] = list(values.get(f"{name}.values") or [])
        else:
            space[name] = {"low": values.get(f"{name}.low"), "high": values.get(f"{name}.high"),
                           "log": bool(default.get("log", False))}
    return space


def fixed_config(values: dict[str, Any], data_dir: Path, runs_dir: Path) -> TrainConfig:
    """The sweep's base TrainConfig by keyword from ``{field name: form value}``.

    Raises:
        ValueError: an invalid value (the message names the field).
    """
    return dataclasses.replace(config_from_form(values, data_dir), output_dir=str(runs_dir))


def start_from_form(ctx: Any, data_text: str | None, fixed: dict[str, Any], space_values: dict[str, Any],
                    trials: float | None, name: str | None, sampler: str, pruning: bool) -> tuple[str, Any]:
    """Starts a sweep from the tab.

    Returns:
        ``(message, sweep-dropdown update)``. Never raises: bad input, a busy runner, a missing
        model or an exhausted sweep become messages.
    """
    try:
        data_dir = resolve_data_path(data_text, ctx.settings)
        fixed = {**fixed, "model": ctx.settings.check_model(fixed.get("model"))}
        config = fixed_config(fixed, data_dir, ctx.settings.runs_dir)
        if trials is None or float(trials) != int(float(trials)):
            raise ValueError(f"trials must be a whole number, got {trials}")
        import optuna

        pruner = default_pruner() if pruning else optuna.pruners.NopPruner()
        job = start_sweep(ctx.runner, config, space_from_form(space_values), int(float(trials)),
                          name=(name or "").strip() or None, sampler=sampler, pruner=pruner)
    except BusyError as exc:
        return f"⚠ Busy: {exc}", gr.skip()
    except (SweepError, ModelLoadError, ValueError, FileNotFoundError, OSError) as exc:
        return f"✗ {exc}", gr.skip()
    except Exception as exc:  # noqa: BLE001 - shown to the user instead of a server error
        return unexpected_error(exc, "Could not start the sweep"), gr.skip()
    sweep_name = job.name.removeprefix("sweep ")
    return (f"▶ Sweep **{sweep_name}** started: trials run one after another (follow the current one in the"
            " Train tab); Stop ends the sweep after stopping the current trial.",
            gr.update(choices=list_sweeps(ctx.settings.runs_dir), value=sweep_name))


def stop_sweep(ctx: Any) -> str:
    """Stops the current job (for a sweep: the current trial, and no further trial starts)."""
    if ctx.runner.stop():
        return "■ Stopping the current trial; the sweep ends after it."
    return "Nothing is running."


def sweep_choices(ctx: Any, current: str | None) -> Any:
    """Dropdown update with the runs folder's sweeps; keeps the current one, else the newest."""
    try:
        names = list_sweeps(ctx.settings.runs_dir)
    except Exception:  # noqa: BLE001 - an unreadable sweeps.db lists nothing rather than failing the page
        return gr.skip()
    return gr.update(choices=names, value=current if current in names else (names[0] if names else None))


def shown_if_content(value: Any) -> Any:
    """A component update that shows ``value`` and hides the component when it is empty (None or
    a frame without rows), so no placeholder header appears."""
    empty = value is None or (hasattr(value, "empty") and value.empty)
    return gr.update(value=None if empty else value, visible=not empty)


def show_sweep(ctx: Any, name: str | None) -> dict[str, Any]:
    """A sweep's results for the tab.

    Returns:
        A dict with :data:`RESULT_KEYS`: summary markdown, trials table, history and importance
        figures (None with a reason in ``charts_message`` when they cannot be drawn yet). Never raises.
    """
    empty = {key: None for key in RESULT_KEYS}
    if not name:
        return empty | {"summary": "No sweep yet: set the search space and press **Start sweep**."}
    try:
        study = load_sweep(ctx.settings.runs_dir, name)
        trials = trials_frame(study)
        summary = study_summary(study)
    except SweepError as exc:
        return empty | {"summary": f"✗ {exc}"}
    except Exception as exc:  # noqa: BLE001 - e.g. the database is busy: a message, retried on the next tick
        return empty | {"summary": f"✗ Cannot read sweep {name!r} now: {type(exc).__name__}: {exc}"}
    notes = []
    job = ctx.runner.current
    running = job is not None and job.running and job.name == f"sweep {name}"
    if job is not None and not job.running and job.name == f"sweep {name}" and job.error:
        notes.append(f"✗ The sweep job ended with an error: {job.error}")
    result = {"summary": summary + (" · ● running" if running else ""), "trials": trials}
    for key, draw in (("history", figure_history), ("importance", figure_importance)):
        try:
            result[key] = draw(study)
        except SweepError as exc:
            result[key] = None
            notes.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - a chart problem is a note, not a server error
            result[key] = None
            notes.append(f"{key} chart unavailable: {type(exc).__name__}: {exc}")
    return result | {"charts_message": "\n\n".join(notes)}


def train_best_from_ui(ctx: Any, name: str | None, epochs: float | None) -> str:
    """Starts a full run from the best trial's settings; returns a message. Never raises."""
    if not name:
        return "Choose a sweep first."
    try:
        job = train_best(ctx.runner, load_sweep(ctx.settings.runs_dir, name), int(epochs) if epochs else None)
    except BusyError as exc:
        return f"⚠ Busy: {exc}"
    except (SweepError, ModelLoadError, ValueError, FileNotFoundError, OSError) as exc:
        return f"✗ {exc}"
    except Exception as exc:  # noqa: BLE001 - shown to the user instead of a server error
        return unexpected_error(exc, "Could not start")
    return f"▶ Training the best configuration as `{job.run_dir.name}`; follow it in the Train tab."


def _signature(ctx: Any) -> tuple:
    try:
        mtime = os.stat(Path(ctx.settings.runs_dir) / "sweeps.db").st_mtime_ns
    except OSError:
        mtime = None
    job = ctx.runner.current
    return mtime, job is not None and job.running


def build(ctx: Any, demo: gr.Blocks, tab: gr.Tab, data: Any) -> None:
    """Builds the Sweep tab.

    Args:
        data: the Data tab's handles (``data.path``: the dataset folder box).
    """
    gr.Markdown("Search hyperparameters with Optuna on the dataset chosen in the **Data** tab. Each trial is a"
                " normal run (see the **Runs** tab); hopeless trials are stopped early by the median pruner."
                " The sweep is saved in the runs folder: start it again with the same name to continue it."
                " Tracking (TensorBoard, MLflow) follows the switch in the **Runs** tab.")
    with gr.Row():
        name = gr.Textbox(label="Sweep name", placeholder="blank: sweep-<date>-<time>; an existing name continues it",
                          scale=2, elem_id="sweep-name")
        trials = gr.Number(value=10, precision=0, minimum=1, label="Trials (total)", scale=1, elem_id="sweep-trials",
                           info="trials already in the sweep count")
        sampler = gr.Radio(["tpe", "grid"], value="tpe", label="Sampler", scale=1,
                           info="grid: every combination; a range becomes 3 points")
        pruning = gr.Checkbox(True, label="Prune hopeless trials (median pruner)", scale=1)
    # The same TrainConfig fields as the Train tab, from the same factory, in compact widgets; a
    # sweep starts from a scratch model and its learning rate.
    fixed: dict[str, Any] = {}
    with gr.Accordion("Fixed settings (every trial)", open=True):
        with gr.Row():
            fixed["model"] = field_widget("model", compact=True, elem_prefix="sweep-", choices=list(MODEL_CHOICES),
                                          value=SCRATCH_MODEL, allow_custom_value=True, scale=2)
            fixed["image_size"] = field_widget("image_size", compact=True, elem_prefix="sweep-", scale=1)
            fixed["epochs"] = field_widget("epochs", compact=True, elem_prefix="sweep-", scale=1)
            fixed["seed"] = field_widget("seed", compact=True, elem_prefix="sweep-", label="Seed (split and sampler)",
                                         scale=1)
        with gr.Row():
            for field_name in ("batch_size", "lr", "weight_decay", "freeze_depth", "augment", "precision"):
                fixed[field_name] = field_widget(field_name, compact=True, elem_prefix="sweep-",
                                                 **({"value": 1e-3} if field_name == "lr" else {}))
    model, image_size = fixed["model"], fixed["image_size"]
    space: dict[str, Any] = {}
    with gr.Accordion("Search space (checked parameters replace the fixed value)", open=True):
        for param in available_parameters():
            spec = space_spec(param)
            with gr.Row():
                space[f"{param}.on"] = gr.Checkbox(param in ("lr", "weight_decay"), label=f"search {param}", scale=1,
                                                   elem_id=f"sweep-on-{param}")
                if isinstance(spec, list):
                    offered = BATCH_SIZES if param == "batch_size" else spec
                    space[f"{param}.values"] = gr.CheckboxGroup(offered, value=spec, label=f"{param} values", scale=4)
                else:
                    log = " (log scale)" if spec.get("log") else ""
                    space[f"{param}.low"] = gr.Number(value=spec["low"], label=f"{param} from{log}", scale=2)
                    space[f"{param}.high"] = gr.Number(value=spec["high"], label=f"{param} to", scale=2)
    with gr.Row():
        start = gr.Button("Start sweep", variant="primary", elem_id="sweep-start")
        stop = gr.Button("Stop", variant="stop", elem_id="sweep-stop")
    message = gr.Markdown(elem_id="sweep-message")

    gr.Markdown("### Results")
    with gr.Row():
        sweep = gr.Dropdown(label="Sweep", choices=[], scale=3, elem_id="sweep-choice")
        refresh = gr.Button("↻ Refresh", scale=1)
    summary = gr.Markdown(elem_id="sweep-summary")
    trials_table = gr.Dataframe(label="Trials", interactive=False, elem_id="sweep-trials-table", visible=False)
    with gr.Row():
        history = gr.Plot(label="Optimization history", visible=False)
        importance = gr.Plot(label="Parameter importance", visible=False)
    charts_message = gr.Markdown(elem_id="sweep-charts-message")
    with gr.Row():
        best_epochs = gr.Number(value=0, precision=0, minimum=0, label="Epochs for the full run",
                                info="0: as many as the trial", scale=1)
        best_button = gr.Button("Train best config", scale=1, elem_id="sweep-train-best")
    best_message = gr.Markdown()
    signature = gr.State(None)
    timer = gr.Timer(2.0)
    results = [summary, trials_table, history, importance, charts_message]

    def on_start(values: dict) -> tuple:
        chosen = values[data.chosen] or {}  # the chosen dataset, as the Train tab shows and trains it
        return start_from_form(ctx, chosen.get("path") or values[data.path], {k: values[c] for k, c in fixed.items()},
                               {k: values[c] for k, c in space.items()}, values[trials], values[name],
                               values[sampler], values[pruning])

    def on_show(chosen: str | None) -> tuple:
        result = show_sweep(ctx, chosen)
        # Empty tables and charts stay hidden (no placeholder headers) until they have content.
        return tuple(shown_if_content(result[key]) if key in ("trials", "history", "importance") else result[key]
                     for key in RESULT_KEYS)

    def on_tick(chosen: str | None, last: Any) -> tuple:
        current = _signature(ctx)
        if current == last:
            return (gr.skip(),) * (len(results) + 1)
        return (*on_show(chosen), current)

    start.click(on_start, inputs={*fixed.values(), *space.values(), data.path, data.chosen, trials, name, sampler,
                                  pruning},
                outputs=[message, sweep])
    stop.click(lambda: stop_sweep(ctx), outputs=message)
    sweep.change(on_show, inputs=sweep, outputs=results)
    refresh.click(lambda current: sweep_choices(ctx, current), inputs=sweep, outputs=sweep).then(
        on_show, inputs=sweep, outputs=results)
    tab.select(lambda current: sweep_choices(ctx, current), inputs=sweep, outputs=sweep)
    demo.load(lambda: sweep_choices(ctx, None), outputs=sweep)
    timer.tick(on_tick, inputs=[sweep, signature], outputs=[*results, signature])
    best_button.click(lambda chosen, n: train_best_from_ui(ctx, chosen, n), inputs=[sweep, best_epochs],
                      outputs=best_message)
    model.change(lambda m: gr.update(visible=is_scratch_model(m)), inputs=model, outputs=image_size)
