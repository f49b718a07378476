"""Train tab: model, freeze depth, hyperparameters, Start/Stop and live curves."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from ..config import SCRATCH_MODEL, TrainConfig, field_docs
from ..jobs import BusyError
from ..modeling import MODEL_CHOICES, ModelLoadError, summarize_model
from ..runs import read_metrics, read_status
from .data_tab import resolve_data_path
from ..plots import figure_accuracy, figure_loss

#: Suggested peak learning rates: a random-init ViT needs a much larger step than fine-tuning.
SCRATCH_LR = 1e-3
FINETUNE_LR = TrainConfig.__dataclass_fields__["lr"].default


def model_info(model: str, image_size: int | None, freeze_depth: int, classes: list[str]) -> tuple[Any, str]:
    """Freeze-depth slider update and the parameter summary for the chosen model.

    Returns:
        ``(slider update, markdown)``; when the model cannot be loaded the markdown says why.
    """
    model = (model or "").strip()
    if not model:
        return gr.update(), "Choose a model."
    try:
        summary = summarize_model(model, classes, int(freeze_depth or 0), image_size if model == SCRATCH_MODEL else None)
    except (ModelLoadError, ValueError, OSError) as exc:
        return gr.update(), f"❌ {exc}"
    except Exception as exc:  # noqa: BLE001 - shown to the user instead of a server error
        return gr.update(), f"❌ Cannot describe model '{model}': {type(exc).__name__}: {exc}"
    depth = min(int(freeze_depth or 0), summary.num_blocks)
    probe = " (linear probe: only the head trains)" if depth == summary.num_blocks else ""
    return (
        gr.update(maximum=summary.num_blocks, value=depth),
        summary.describe() + probe,
    )


def config_from_form(values: dict[str, Any], data_dir: Path) -> TrainConfig:
    """Builds the TrainConfig by keyword from ``{field name: form value}``.

    Numbers from ``gr.Number`` arrive as floats; integer fields are converted, blank optional
    fields become None.

    Raises:
        ValueError: a value is invalid (the message names the field).
    """
    hints = {f.name: f for f in dataclasses.fields(TrainConfig)}
    kwargs: dict[str, Any] = {"data_dir": str(data_dir)}
    for name, value in values.items():
        if name not in hints:
            continue
        default = hints[name].default
        if value is None or value == "":
            continue
        if isinstance(default, bool):
            value = bool(value)
        elif isinstance(default, int) or name == "image_size":
            if float(value) != int(float(value)):
                raise ValueError(f"{name} must be a whole number, got {value}")
            value = int(float(value))
        elif isinstance(default, float):
            value = float(value)
        kwargs[name] = value
    if kwargs.get("model") != SCRATCH_MODEL:
        kwargs.pop("image_size", None)
    return TrainConfig(**kwargs)


def start_run(
    ctx: Any, values: dict[str, Any], data_text: str, progress: Callable[[int, int], None] | None = None
) -> tuple[str, str | None]:
    """Starts a job from the form (``progress`` reports the preflight's image decoding).

    Returns:
        ``(message markdown, run folder or None)``. Never raises: bad input, a busy runner or an
        unknown model become messages.
    """
    try:
        data_dir = resolve_data_path(data_text, ctx.settings)
        config = config_from_form(values, data_dir)
    except ValueError as exc:
        return f"❌ {exc}", None
    try:
        job = ctx.runner.start(dataclasses.replace(config, output_dir=str(ctx.settings.runs_dir)), progress=progress)
    except BusyError as exc:
        return f"⏳ Busy: {exc}", None
    except (ModelLoadError, ValueError, FileNotFoundError) as exc:
        return f"❌ {exc}", None
    except Exception as exc:  # noqa: BLE001 - shown to the user instead of a server error
        return f"❌ Could not start: {type(exc).__name__}: {exc}", None
    return f"▶️ Started run `{job.run_dir.name}`.", str(job.run_dir)


def stop_run(ctx: Any) -> str:
    """Signals Stop; the loop exits before its next step and keeps the best model saved."""
    if ctx.runner.stop():
        return "⏹️ Stopping after the current step… the best model so far stays saved."
    return "Nothing is running."


def _format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def status_markdown(status: dict[str, Any], run_id: str) -> str:
    """The status line: state, epoch and step, ETA, images/s, learning rate (or the error)."""
    if not status:
        return "No run yet: choose a dataset and a model, then press **Start**."
    state = status.get("status", "unknown")
    icon = {"running": "🟢", "starting": "🟡", "completed": "✅", "stopped": "⏹️", "failed": "❌",
            "interrupted": "⚠️"}.get(state, "•")
    parts = [f"{icon} **{state}** · run `{run_id}`"]
    if state == "failed":
        return parts[0] + f"\n\n**Error:** {status.get('error', 'unknown error')} (details in train.log)"
    if state == "interrupted":
        parts.append("the app stopped while this run was training")
    if "total_steps" in status:
        parts.append(f"epoch {float(status.get('epoch', 0)):.2f}/{status.get('epochs')}")
        parts.append(f"step {status.get('step', 0)}/{status['total_steps']}")
    if state == "running":
        parts.append(f"ETA {_format_seconds(status.get('eta_s'))}")
    if status.get("images_per_sec"):
        parts.append(f"{status['images_per_sec']:.1f} images/s")
    if status.get("lr") is not None:
        parts.append(f"lr {status['lr']:.2e}")
    if status.get("best_val_accuracy") is not None:
        parts.append(f"best val accuracy {status['best_val_accuracy']:.4f}")
    if status.get("device"):
        parts.append(f"{status['device']} {status.get('precision', '')}")
    notes = status.get("notes") or []
    return " · ".join(parts) + ("\n\n" + " · ".join(f"_{n}_" for n in notes) if notes else "")


def initial_run(ctx: Any) -> str | None:
    """The run a newly opened page shows: the running job, else the newest run."""
    job = ctx.runner.current
    if job is not None and job.running:
        return str(job.run_dir)
    runs = ctx.runner.store.list_runs()
    return runs[0].path if runs else None


def _signature(run_dir: str) -> tuple:
    sig = []
    for name in ("status.json", "metrics.csv"):
        try:
            sig.append(os.stat(os.path.join(run_dir, name)).st_mtime_ns)
        except OSError:
            sig.append(None)
    return (run_dir, *sig)


def poll(ctx: Any, run_dir: str | None, last_signature: Any) -> tuple:
    """Reads the run folder for the live view; skips redrawing when nothing changed.

    Returns:
        ``(status markdown, loss figure, accuracy figure, signature)`` (``gr.skip()`` values when
        unchanged).
    """
    if not run_dir:
        run_dir = initial_run(ctx)
    if not run_dir:
        return status_markdown({}, ""), gr.skip(), gr.skip(), None
    signature = _signature(run_dir)
    if signature == last_signature:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    metrics = read_metrics(run_dir)
    text = status_markdown(read_status(run_dir), Path(run_dir).name)
    return text, figure_loss(metrics), figure_accuracy(metrics), signature


def build(ctx: Any, data: Any) -> None:
    """Builds the Train tab's components and events."""
    docs = field_docs()
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    with gr.Row():
        with gr.Column(scale=2):
            model = gr.Dropdown(
                choices=list(MODEL_CHOICES), value=SCRATCH_MODEL, allow_custom_value=True,
                label="Model", info="A Hub id, a local save_pretrained folder, or vit-tiny-scratch (offline).",
                elem_id="model-choice",
            )
            image_size = gr.Slider(32, 224, value=224, step=16, label="Image size (vit-tiny-scratch)",
                                   info=docs["image_size"], elem_id="image-size")
            freeze_depth = gr.Slider(0, 12, value=0, step=1, label="Freeze depth", info=docs["freeze_depth"],
                                     elem_id="freeze-depth")
            params = gr.Markdown(elem_id="param-count")
        with gr.Column(scale=3):
            with gr.Row():
                epochs = gr.Number(value=defaults["epochs"], label="Epochs", precision=0, minimum=1, elem_id="epochs")
                batch_size = gr.Number(value=defaults["batch_size"], label="Batch size", precision=0, minimum=1)
                lr = gr.Number(value=SCRATCH_LR, label="Learning rate", info="5e-5 for fine-tuning, 1e-3 from scratch",
                               elem_id="lr")
            with gr.Row():
                precision = gr.Radio(["auto", "bf16", "fp16", "fp32"], value="auto", label="Precision",
                                     info=docs["precision"])
                augment = gr.Radio(["none", "basic"], value=defaults["augment"], label="Augmentation",
                                   info=docs["augment"])
            with gr.Accordion("Advanced", open=False):
                with gr.Row():
                    weight_decay = gr.Number(value=defaults["weight_decay"], label="Weight decay")
                    warmup_ratio = gr.Number(value=defaults["warmup_ratio"], label="Warmup ratio")
                    grad_accum = gr.Number(value=defaults["grad_accum_steps"], label="Gradient accumulation steps",
                                           precision=0, minimum=1)
                with gr.Row():
                    val_fraction = gr.Number(value=defaults["val_fraction"], label="Validation fraction",
                                             info="used when the folder has no val/ split")
                    seed = gr.Number(value=defaults["seed"], label="Seed", precision=0)
                    log_every = gr.Number(value=defaults["log_every_steps"], label="Log every N steps", precision=0,
                                          minimum=1)
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id="start-button")
        stop = gr.Button("Stop", variant="stop", elem_id="stop-button")
    message = gr.Markdown(elem_id="train-message")
    status = gr.Markdown(elem_id="train-status")
    with gr.Row():
        loss_plot = gr.Plot(label="Loss", elem_id="loss-plot")
        acc_plot = gr.Plot(label="Accuracy", elem_id="accuracy-plot")

    # The form, by TrainConfig field name: the one place that ties components to fields.
    form = {
        "model": model, "image_size": image_size, "freeze_depth": freeze_depth, "epochs": epochs,
        "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "warmup_ratio": warmup_ratio,
        "grad_accum_steps": grad_accum, "precision": precision, "augment": augment,
        "val_fraction": val_fraction, "seed": seed, "log_every_steps": log_every,
    }
    run_state = gr.State(None)
    signature = gr.State(None)
    timer = gr.Timer(1.0)

    def on_start(values: dict, progress: gr.Progress = gr.Progress()) -> tuple:
        def report(done: int, total: int) -> None:
            progress((done, total), desc="Checking images", unit="files")

        text, run_dir = start_run(ctx, {name: values[comp] for name, comp in form.items()}, values[data.path], report)
        return text, (run_dir if run_dir else gr.skip()), None

    start.click(on_start, inputs=set(form.values()) | {data.path}, outputs=[message, run_state, signature])
    stop.click(lambda: stop_run(ctx), outputs=message)
    timer.tick(lambda run, sig: poll(ctx, run, sig), inputs=[run_state, signature],
               outputs=[status, loss_plot, acc_plot, signature])

    info_inputs = [model, image_size, freeze_depth, data.classes]
    model.change(
        lambda name: (gr.update(visible=name == SCRATCH_MODEL), SCRATCH_LR if name == SCRATCH_MODEL else FINETUNE_LR),
        inputs=model, outputs=[image_size, lr],
    )
    data.suggested_size.change(lambda size: size if size else gr.skip(), inputs=data.suggested_size,
                               outputs=image_size)
    for component in (model, image_size, data.classes):
        component.change(model_info, inputs=info_inputs, outputs=[freeze_depth, params])
    freeze_depth.input(model_info, inputs=info_inputs, outputs=[freeze_depth, params], trigger_mode="always_last")
