"""Train tab: model, freeze depth, hyperparameters, Start/Stop and live curves."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from ..checkpoint import ResumeError
from ..config import SCRATCH_MODEL, TrainConfig, field_docs
from ..jobs import BusyError
from ..modeling import MODEL_CHOICES, ModelLoadError, summarize_model
from ..presets import PRESETS, preset_values_for_model
from ..scratch import is_scratch_model, scratch_model
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
        summary = summarize_model(model, classes, int(freeze_depth or 0), image_size if is_scratch_model(model) else None)
    except (ModelLoadError, ValueError, OSError) as exc:
        return gr.update(), f"❌ {exc}"
    except Exception as exc:  # noqa: BLE001 - shown to the user instead of a server error
        return gr.update(), f"❌ Cannot describe model '{model}': {type(exc).__name__}: {exc}"
    depth = min(int(freeze_depth or 0), summary.num_blocks)
    probe = " (linear probe: only the head trains)" if depth == summary.num_blocks else ""
    offline = ""
    if is_scratch_model(model):
        spec = scratch_model(model)
        offline = f"\n\n**Offline, no pretraining** ({spec.params} parameters): {spec.use_for}. Expect: {spec.expected}."
    return (
        gr.update(maximum=summary.num_blocks, value=depth),
        summary.describe() + probe + offline,
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
    if not is_scratch_model(kwargs.get("model")):
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


def resume_run(ctx: Any, run_dir: str | None) -> tuple[str, str | None]:
    """Resumes the shown run (stopped, failed or interrupted) from its checkpoint.

    Returns:
        ``(message markdown, run folder or None)``; never raises.
    """
    run_dir = run_dir or initial_run(ctx)
    if not run_dir:
        return "No run to resume yet.", None
    try:
        job = ctx.runner.resume(run_dir)
    except BusyError as exc:
        return f"⏳ Busy: {exc}", None
    except (ResumeError, ModelLoadError, ValueError, FileNotFoundError) as exc:
        return f"❌ {exc}", None
    except Exception as exc:  # noqa: BLE001 - shown to the user instead of a server error
        return f"❌ Could not resume: {type(exc).__name__}: {exc}", None
    return f"▶️ Resumed run `{job.run_dir.name}` from its last checkpoint.", str(job.run_dir)


def preset_updates(name: str, model: str, image_size: int | None, fields: list[str]) -> tuple[list[Any], str]:
    """Form values for a preset, in the order of ``fields`` (``gr.skip()`` for fields it leaves).

    Returns:
        ``(values, message markdown)``; on a model that cannot be inspected every value is
        ``gr.skip()`` and the message says why.
    """
    try:
        values = preset_values_for_model(name, (model or "").strip() or SCRATCH_MODEL,
                                         int(image_size) if image_size else None)
    except (ModelLoadError, ValueError, OSError) as exc:
        return [gr.skip() for _ in fields], f"❌ {exc}"
    note = {
        "quick": "linear probe, 3 epochs, no augmentation",
        "balanced": "partial freeze, basic augmentation, 10 epochs",
        "best": "RandAugment, MixUp/CutMix, label smoothing, layer decay, EMA, 20 epochs",
    }[name]
    scratch = is_scratch_model(model or SCRATCH_MODEL)
    if scratch and name == "quick":
        note += " (on a random-weight model a linear probe only trains the head: a smoke test)"
    elif scratch and name == "best":
        note += (" (from scratch: nothing frozen, lr 1e-3; this much regularization needs far more epochs on a"
                 " random-weight model, where balanced usually does better: see the README)")
    elif scratch:
        note += " (from scratch: nothing frozen, lr 1e-3)"
    return [values.get(f, gr.skip()) for f in fields], f"Preset **{name}**: {note}. Edit anything before Start."


def auto_preset_updates(data_text: str, settings: Any, fields: list[str]) -> tuple[list[Any], str]:
    """Form values of the *Auto (from the data)* preset: the scratch recipe suggested for the
    dataset in the path box (:func:`vitft_app.auto_recipe.suggest_scratch_recipe`).

    Returns:
        ``(values in the order of fields, message markdown)``; ``gr.skip()`` everywhere and the
        reason when the folder cannot be read.
    """
    from ..presets import auto_preset_values

    try:
        values, description = auto_preset_values(str(resolve_data_path(data_text, settings)))
    except (ValueError, OSError) as exc:
        return [gr.skip() for _ in fields], f"❌ {exc}"
    return ([values.get(f, gr.skip()) for f in fields],
            f"Preset **auto** (from the data): {description} Trained from scratch, no pretrained weights: expect"
            " the accuracy of the README's *Offline models* table, not a fine-tuned checkpoint's. Edit anything"
            " before Start.")


def augmentation_preview(values: dict[str, Any], data_text: str, settings: Any, per_class: int = 1,
                         max_images: int = 4) -> tuple[list, str]:
    """A gallery of augmented versions of a few training images with the form's settings.

    Returns:
        ``(gallery items, message markdown)``; never raises.
    """
    from ..augment import preview_augmentations
    from ..data import scan_dataset
    from ..modeling import load_processor

    try:
        data_dir = resolve_data_path(data_text, settings)
        config = config_from_form(values, data_dir)
        report = scan_dataset(data_dir, val_fraction=config.val_fraction, seed=config.seed)
        processor = load_processor(config.model, config.image_size)
        patch = _patch_size(config)
    except (ValueError, FileNotFoundError, ModelLoadError, OSError) as exc:
        return [], f"❌ {exc}"
    picked, seen = [], {}
    for item in report.train:
        if seen.get(item.label, 0) < per_class:
            picked.append(item.path)
            seen[item.label] = seen.get(item.label, 0) + 1
        if len(picked) >= max_images:
            break
    if not picked:
        return [], "❌ No training images to preview."
    gallery = preview_augmentations(
        picked, processor, patch_size=patch, augment=config.augment, crop_scale_min=config.crop_scale_min,
        color_jitter=config.color_jitter, random_erasing=config.random_erasing, mixup=config.mixup,
        cutmix=config.cutmix, patch_mask_ratio=config.patch_mask_ratio, copies=4, seed=config.seed,
    )
    return gallery, f"{len(gallery)} augmented versions of {len(picked)} training images (evaluation never augments)."


def build_scratch_config(config: TrainConfig) -> Any:
    """The transformers config of a scratch model at the form's image size (two dummy labels)."""
    return scratch_model(config.model).config(config.image_size or 224, {0: "a", 1: "b"})


def _patch_size(config: TrainConfig) -> int:
    from ..modeling import load_model_config, scratch_patch_size

    if is_scratch_model(config.model):
        if config.model != SCRATCH_MODEL:
            return int(getattr(build_scratch_config(config), "patch_size", 2))
        return scratch_patch_size(config.image_size or 224)
    return int(getattr(load_model_config(config.model), "patch_size", 16))


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
    if status.get("monitor") == "val_map" and status.get("best_metric") is not None:
        parts.append(f"best val mAP {status['best_metric']:.4f}")
    elif status.get("best_val_accuracy") is not None:
        parts.append(f"best val accuracy {status['best_val_accuracy']:.4f}")
    patience = status.get("early_stopping_patience") or 0
    if patience and state == "running":
        left = patience - int(status.get("epochs_without_improvement") or 0)
        parts.append(f"early stopping after {left} more epoch(s) without improvement")
    if status.get("reason"):
        parts.append(status["reason"])
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
    """Builds the Train tab's components and events.

    The common settings are always visible; the rest of the recipe sits in folded groups
    (augmentation and regularization, optimization, data and logging). Preset buttons fill the
    form; every control is named after its :class:`~vitft_app.config.TrainConfig` field.
    """
    docs = field_docs()
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

    def number(name: str, label: str, integer: bool = False, **kwargs: Any) -> gr.Number:
        return gr.Number(value=defaults[name], label=label, info=docs[name], precision=0 if integer else None,
                         elem_id=name.replace("_", "-"), **kwargs)

    def radio(name: str, label: str, choices: list[str]) -> gr.Radio:
        return gr.Radio(choices, value=defaults[name], label=label, info=docs[name], elem_id=name.replace("_", "-"))

    with gr.Row():
        gr.Markdown("**Presets** fill the form (edit anything after): **Quick** = linear probe, no augmentation;"
                    " **Balanced** = partial freeze + basic augmentation; **Best** = RandAugment, MixUp/CutMix,"
                    " label smoothing, layer decay, EMA; **Auto** = a from-scratch recipe from the data.")
        preset_buttons = {name: gr.Button(name.capitalize(), size="sm", elem_id=f"preset-{name}") for name in PRESETS}
        auto_button = gr.Button("Auto (from the data)", size="sm", elem_id="preset-auto")
    with gr.Row():
        with gr.Column(scale=2):
            model = gr.Dropdown(
                choices=list(MODEL_CHOICES), value=SCRATCH_MODEL, allow_custom_value=True,
                label="Model", info="A Hub id, a local save_pretrained folder, or a *-scratch model (offline, random weights).",
                elem_id="model-choice",
            )
            image_size = gr.Slider(32, 224, value=224, step=16, label="Image size (scratch models)",
                                   info=docs["image_size"], elem_id="image-size")
            freeze_depth = gr.Slider(0, 12, value=0, step=1, label="Freeze depth", info=docs["freeze_depth"],
                                     elem_id="freeze-depth")
            params = gr.Markdown(elem_id="param-count")
        with gr.Column(scale=3):
            with gr.Row():
                epochs = gr.Number(value=defaults["epochs"], label="Epochs", precision=0, minimum=1, elem_id="epochs")
                batch_size = gr.Number(value=defaults["batch_size"], label="Batch size", precision=0, minimum=1)
                lr = gr.Number(value=SCRATCH_LR, label="Learning rate", info="5e-5 for fine-tuning, 1e-3 to 2e-3 from scratch",
                               elem_id="lr")
            with gr.Row():
                precision = gr.Radio(["auto", "bf16", "fp16", "fp32"], value="auto", label="Precision",
                                     info=docs["precision"])
                augment = gr.Dropdown(["none", "basic", "crop", "randaugment", "trivialaugment", "autoaugment"],
                                      value=defaults["augment"], label="Augmentation", info=docs["augment"],
                                      elem_id="augment")
    with gr.Accordion("Augmentation and regularization", open=False):
        with gr.Row():
            crop_scale_min = number("crop_scale_min", "Random crop: smallest area", minimum=0.01, maximum=1)
            color_jitter = number("color_jitter", "Colour jitter", minimum=0, maximum=1)
            random_erasing = number("random_erasing", "Random erasing probability", minimum=0, maximum=1)
            patch_mask_ratio = number("patch_mask_ratio", "Patch mask ratio", minimum=0, maximum=0.99)
            patch_dropout = number("patch_dropout", "PatchDropout (token drop rate)", minimum=0, maximum=0.99)
        with gr.Row():
            mixup = number("mixup", "MixUp alpha", minimum=0)
            cutmix = number("cutmix", "CutMix alpha", minimum=0)
            label_smoothing = number("label_smoothing", "Label smoothing", minimum=0, maximum=0.99)
            class_weights = radio("class_weights", "Class weights", ["none", "balanced"])
        with gr.Row():
            preview_button = gr.Button("Preview augmentation", size="sm", elem_id="preview-button")
            preview_message = gr.Markdown(elem_id="preview-message")
        preview = gr.Gallery(label="Augmented training images (current settings)", columns=8, height=240,
                             object_fit="contain", elem_id="augment-preview")
    with gr.Accordion("Optimization", open=False):
        with gr.Row():
            optimizer = radio("optimizer", "Optimizer", ["adamw", "sgd"])
            scheduler = radio("scheduler", "Schedule", ["cosine", "linear", "constant"])
            warmup_ratio = number("warmup_ratio", "Warmup ratio", minimum=0, maximum=0.99)
            weight_decay = number("weight_decay", "Weight decay", minimum=0)
        with gr.Row():
            layer_decay = number("layer_decay", "Layer decay", minimum=0.01, maximum=1)
            grad_accum = number("grad_accum_steps", "Gradient accumulation steps", integer=True, minimum=1)
            max_grad_norm = number("max_grad_norm", "Max gradient norm", minimum=0)
            ema_decay = number("ema_decay", "EMA decay", minimum=0, maximum=0.99999)
        with gr.Row():
            gradual_unfreeze = number("gradual_unfreeze", "Gradual unfreeze (epochs per block)", integer=True,
                                      minimum=0)
            distill_weight = number("distill_weight", "Distillation weight", minimum=0)
            patience = number("early_stopping_patience", "Early stopping patience", integer=True, minimum=0)
            min_delta = number("early_stopping_min_delta", "Early stopping min improvement", minimum=0)
    with gr.Accordion("Data, speed and logging", open=False):
        with gr.Row():
            val_fraction = gr.Number(value=defaults["val_fraction"], label="Validation fraction",
                                     info="used when the folder has no val/ split")
            seed = gr.Number(value=defaults["seed"], label="Seed", precision=0)
            log_every = gr.Number(value=defaults["log_every_steps"], label="Log every N steps", precision=0,
                                  minimum=1)
            num_workers = number("num_workers", "Loader workers", integer=True, minimum=0)
            max_nonfinite = number("max_nonfinite_steps", "Non-finite steps before stopping", integer=True, minimum=1)
        with gr.Row():
            attention = radio("attention", "Attention kernel", ["auto", "sdpa", "eager"])
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id="start-button")
        stop = gr.Button("Stop", variant="stop", elem_id="stop-button")
        resume = gr.Button("Resume", elem_id="resume-button")
    message = gr.Markdown(elem_id="train-message")
    status = gr.Markdown(elem_id="train-status")
    with gr.Row():
        loss_plot = gr.Plot(label="Loss", elem_id="loss-plot")
        acc_plot = gr.Plot(label="Accuracy", elem_id="accuracy-plot")

    # The form, by TrainConfig field name: the one place that ties components to fields.
    form = {
        "model": model, "image_size": image_size, "freeze_depth": freeze_depth, "epochs": epochs,
        "batch_size": batch_size, "lr": lr, "precision": precision, "augment": augment,
        "crop_scale_min": crop_scale_min, "color_jitter": color_jitter, "random_erasing": random_erasing,
        "patch_mask_ratio": patch_mask_ratio, "mixup": mixup, "cutmix": cutmix, "label_smoothing": label_smoothing,
        "class_weights": class_weights, "optimizer": optimizer, "scheduler": scheduler,
        "warmup_ratio": warmup_ratio, "weight_decay": weight_decay, "layer_decay": layer_decay,
        "grad_accum_steps": grad_accum, "max_grad_norm": max_grad_norm, "ema_decay": ema_decay,
        "gradual_unfreeze": gradual_unfreeze, "distill_weight": distill_weight,
        "early_stopping_patience": patience, "early_stopping_min_delta": min_delta,
        "val_fraction": val_fraction, "seed": seed, "log_every_steps": log_every, "num_workers": num_workers,
        "max_nonfinite_steps": max_nonfinite, "attention": attention, "patch_dropout": patch_dropout,
    }
    fields = list(form)
    run_state = gr.State(None)
    signature = gr.State(None)
    timer = gr.Timer(1.0)

    def on_start(values: dict, progress: gr.Progress = gr.Progress()) -> tuple:
        def report(done: int, total: int) -> None:
            progress((done, total), desc="Checking images", unit="files")

        text, run_dir = start_run(ctx, {name: values[comp] for name, comp in form.items()}, values[data.path], report)
        return text, (run_dir if run_dir else gr.skip()), None

    def on_resume(run_dir: str | None) -> tuple:
        text, resumed = resume_run(ctx, run_dir)
        return text, (resumed if resumed else gr.skip()), None

    start.click(on_start, inputs=set(form.values()) | {data.path}, outputs=[message, run_state, signature])
    stop.click(lambda: stop_run(ctx), outputs=message)
    resume.click(on_resume, inputs=run_state, outputs=[message, run_state, signature])
    timer.tick(lambda run, sig: poll(ctx, run, sig), inputs=[run_state, signature],
               outputs=[status, loss_plot, acc_plot, signature])

    for name, button in preset_buttons.items():
        def apply(model_name: str, size: float, name: str = name) -> list:
            values, text = preset_updates(name, model_name, size, fields)
            return [*values, text]

        button.click(apply, inputs=[model, image_size], outputs=[*form.values(), message])

    auto_button.click(lambda text: (lambda v, t: [*v, t])(*auto_preset_updates(text, ctx.settings, fields)),
                      inputs=data.path, outputs=[*form.values(), message])

    preview_button.click(
        lambda values: augmentation_preview({n: values[c] for n, c in form.items()}, values[data.path], ctx.settings),
        inputs=set(form.values()) | {data.path}, outputs=[preview, preview_message],
    )
    data.balance_button.click(
        lambda: ("balanced", "⚖️ Class weights set to **balanced** (Train tab → Augmentation and regularization)."),
        outputs=[class_weights, message],
    )

    info_inputs = [model, image_size, freeze_depth, data.classes]
    model.change(
        lambda name: (gr.update(visible=is_scratch_model(name)), scratch_model(name).lr if is_scratch_model(name) else FINETUNE_LR),
        inputs=model, outputs=[image_size, lr],
    )
    data.suggested_size.change(lambda size: size if size else gr.skip(), inputs=data.suggested_size,
                               outputs=image_size)
    for component in (model, image_size, data.classes):
        component.change(model_info, inputs=info_inputs, outputs=[freeze_depth, params])
    freeze_depth.input(model_info, inputs=info_inputs, outputs=[freeze_depth, params], trigger_mode="always_last")
