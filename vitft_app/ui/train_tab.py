"""Train tab: model, freeze depth, hyperparameters, Start/Stop and live curves."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from ..checkpoint import ResumeError, has_checkpoint
from ..config import SCRATCH_MODEL, SECTIONS, TrainConfig
from ..jobs import BusyError
from ..model_catalog import default_model_note, describe_model, resolve_default_model
from ..modeling import (
    MODEL_CHOICES,
    ModelLoadError,
    load_model_config,
    load_processor,
    scratch_patch_size,
    summarize_model,
)
from ..presets import PRESETS, auto_preset_values, preset_values_for_model
from ..app_state import dataset_markdown
from ..baseline import accuracy_with_baseline, format_accuracy, run_baseline, weak_model_warning
from ..run_status import ENDED_STATUSES, RunStatus, as_run_status
from ..runs import kept_model_note, model_dir, read_metrics, read_status
from ..scratch import is_scratch_model, scratch_model
from .data_tab import resolve_data_path
from .form import field_row, field_widget
from .lora_panel import lora_note, wire_lora_note
from .errors import unexpected_error
from ..plots import figure_accuracy, figure_loss
from ..augment import preview_augmentations
from ..data import scan_dataset
from ..runs_table import read_config

#: Suggested peak learning rates: a random-init ViT needs a much larger step than fine-tuning.
SCRATCH_LR = 1e-3
FINETUNE_LR = TrainConfig.__dataclass_fields__["lr"].default


def model_info(model: str, image_size: int | None, freeze_depth: int, classes: list[str],
               settings: Any = None) -> tuple[Any, str]:
    """Freeze-depth slider update and the parameter summary for the chosen model.

    Args:
        settings: the app's settings; when given, a typed model folder must pass
            :meth:`~vitft_app.ui.app.AppSettings.check_model` before anything is read.

    Returns:
        ``(slider update, markdown)``; when the model cannot be loaded the markdown says why.
    """
    model = (model or "").strip()
    if not model:
        return gr.update(), "Choose a model."
    try:
        if settings is not None:
            model = settings.check_model(model) if not is_scratch_model(model) else model
        summary = summarize_model(model, classes, int(freeze_depth or 0), image_size if is_scratch_model(model) else None)
    except (ModelLoadError, ValueError, OSError) as exc:
        return gr.update(), f"✗ {exc}"
    except Exception as exc:  # noqa: BLE001 - shown to the user instead of a server error
        return gr.update(), unexpected_error(exc, f"Cannot describe model '{model}'")
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


def catalog_info(model: str, image_size: int | None, data_text: str | None, settings: Any) -> str:
    """The model picker's info line: parameters, pretraining data and the estimated epoch time on
    the chosen dataset (:func:`vitft_app.model_catalog.describe_model`); the random-weights note
    for a scratch model. Never raises: a model or dataset that cannot be read gives a short line."""

    model = (model or "").strip()
    if not model:
        return ""
    try:
        model = settings.check_model(model)  # a typed folder must be allowed before it is read
    except Exception as exc:  # noqa: BLE001 - the parameter summary below says why in full
        return f"_No size or time estimate for this model ({exc})._"
    num_train = None
    try:
        num_train = len(scan_dataset(resolve_data_path(data_text, settings)).train) or None
    except Exception:  # noqa: BLE001 - no dataset yet: the line simply has no estimate
        pass
    note = default_model_note(model)
    note = f"\n\n**{note[0].upper() + note[1:]}.**" if note else ""
    try:
        info = describe_model(model, num_train, int(image_size) if image_size else None, settings.device)
    except Exception as exc:  # noqa: BLE001 - the parameter summary below says why in full
        return f"_No size or time estimate for this model ({type(exc).__name__})._" + note
    return info.markdown() + note


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
        values = {**values, "model": ctx.settings.check_model(values.get("model"))}  # confined: see README
        config = config_from_form(values, data_dir)
    except ValueError as exc:
        return f"✗ {exc}", None
    try:
        job = ctx.runner.start(dataclasses.replace(config, output_dir=str(ctx.settings.runs_dir)), progress=progress)
    except BusyError as exc:
        return f"⚠ Busy: {exc}", None
    except (ModelLoadError, ValueError, FileNotFoundError) as exc:
        return f"✗ {exc}", None
    except Exception as exc:  # noqa: BLE001 - shown to the user instead of a server error
        return unexpected_error(exc, "Could not start"), None
    return f"▶ Started run `{job.run_dir.name}`.", str(job.run_dir)


def stop_run(ctx: Any) -> str:
    """Signals Stop; the loop exits before its next step and keeps the best model saved."""
    job = ctx.runner.current
    if ctx.runner.stop():
        return f"{STOPPING} after the current step… {kept_model_note(getattr(job, 'run_dir', None))}."
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
        return f"⚠ Busy: {exc}", None
    except (ResumeError, ModelLoadError, ValueError, FileNotFoundError) as exc:
        return f"✗ {exc}", None
    except Exception as exc:  # noqa: BLE001 - shown to the user instead of a server error
        return unexpected_error(exc, "Could not resume", run_dir=run_dir), None
    return f"▶ Resumed run `{job.run_dir.name}` from its last checkpoint.", str(job.run_dir)


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
        return [gr.skip() for _ in fields], f"✗ {exc}"
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
    try:
        values, description = auto_preset_values(str(resolve_data_path(data_text, settings)))
    except (ValueError, OSError) as exc:
        return [gr.skip() for _ in fields], f"✗ {exc}"
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

    try:
        data_dir = resolve_data_path(data_text, settings)
        values = {**values, "model": settings.check_model(values.get("model"))}
        config = config_from_form(values, data_dir)
        report = scan_dataset(data_dir, val_fraction=config.val_fraction, seed=config.seed)
        processor = load_processor(config.model, config.image_size)
        patch = _patch_size(config)
    except (ValueError, FileNotFoundError, ModelLoadError, OSError) as exc:
        return [], f"✗ {exc}"
    picked, seen = [], {}
    for item in report.train:
        if seen.get(item.label, 0) < per_class:
            picked.append(item.path)
            seen[item.label] = seen.get(item.label, 0) + 1
        if len(picked) >= max_images:
            break
    if not picked:
        return [], "✗ No training images to preview."
    gallery = preview_augmentations(
        picked, processor, patch_size=patch, augment=config.augment, crop_scale_min=config.crop_scale_min,
        color_jitter=config.color_jitter, random_erasing=config.random_erasing, mixup=config.mixup,
        cutmix=config.cutmix, patch_mask_ratio=config.patch_mask_ratio, copies=4, seed=config.seed,
    )
    same = "" if config.random_pixels else " Nothing random touches the pixels with these settings: training sees each image as evaluation does."
    return gallery, f"{len(gallery)} augmented versions of {len(picked)} training images (evaluation never augments).{same}"


def build_scratch_config(config: TrainConfig) -> Any:
    """The transformers config of a scratch model at the form's image size (two dummy labels)."""
    return scratch_model(config.model).config(config.image_size or 224, {0: "a", 1: "b"})


def _patch_size(config: TrainConfig) -> int:
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


#: Status marks: plain symbols that Debian's DejaVu fonts render (no emoji font is needed).
STATUS_MARKS = {"running": "●", "starting": "○", "completed": "✓", "stopped": "■", "failed": "✗",
                "interrupted": "⚠"}


def _accuracy_part(status: RunStatus | dict[str, Any]) -> str | None:
    """``best val accuracy 55.6% (always 'bees': 54.2%)`` (or mAP for multi-label runs)."""
    status = as_run_status(status)
    if status.monitor == "val_map" and status.best_metric is not None:
        return f"best val mAP {status.best_metric:.4f}"
    if status.best_val_accuracy is not None:
        return "best val accuracy " + accuracy_with_baseline(status.best_val_accuracy, run_baseline(status))
    return None


def status_markdown(status: RunStatus | dict[str, Any], run_id: str) -> str:
    """The status line beside Start: state, step and epoch, ETA, images/s, learning rate, best
    accuracy with its baseline (or the error). Device and precision notes are in
    :func:`status_details`."""
    status = as_run_status(status)
    if not status:
        return "No run yet: check the dataset above, choose a model, then press **Start**."
    state = status.status or "unknown"
    mark = STATUS_MARKS.get(state, "•")
    step, total = int(status.step or 0), status.total_steps
    epoch, epochs = float(status.epoch or 0), status.epochs
    if state == "failed":
        return (f"{mark} **failed** · run `{run_id}`\n\n**Error:** {(status.error or 'unknown error')}"
                " (details in train.log)")
    if state == "stopped" and total:
        parts = [f"{mark} **stopped** after step {step} of {total}, epoch {epoch:.2f} of {epochs}", f"run `{run_id}`"]
    elif state == "interrupted":
        parts = [f"{mark} **interrupted** at step {step}" + (f" of {total}" if total else ""),
                 f"run `{run_id}`", "the app stopped while this run was training: **Resume** continues it"]
    elif state == "starting":
        parts = [f"{mark} **starting** · run `{run_id}`", "loading the model and data"]
    else:
        parts = [f"{mark} **{state}** · run `{run_id}`"]
        if total:
            parts.append(f"step {step}/{total}")
            parts.append(f"epoch {epoch:.2f}/{epochs}")
    if state == "running":
        parts.append(f"ETA {_format_seconds(status.eta_s)}" if step > int(status.resumed_from_step or 0)
                     else "first step running…")
    if state == "running" and status.images_per_sec:
        parts.append(f"{status.images_per_sec:.1f} images/s")
    if state == "running" and status.lr is not None:
        parts.append(f"lr {status.lr:.2e}")
    accuracy = _accuracy_part(status)
    if accuracy:
        parts.append(accuracy)
    patience = status.early_stopping_patience or 0
    if patience and state == "running":
        left = patience - int(status.epochs_without_improvement or 0)
        parts.append(f"early stopping after {left} more epoch(s) without improvement")
    if status.reason:
        parts.append(status.reason)
    text = " · ".join(parts)
    if state == "stopped":
        saved = ("the best model so far is saved" if status.best_val_accuracy is not None
                 else "no epoch finished yet, so no model is saved")
        text += f"\n\n**Resume** continues from step {step}; {saved}."
    warning = weak_model_warning(status.best_val_accuracy, run_baseline(status))
    if warning and state in ("completed", "stopped", "interrupted") and status.monitor != "val_map":
        text += f"\n\n⚠ {warning}"
    return text


def status_details(status: RunStatus | dict[str, Any]) -> str:
    """The folded run details: device and precision, parameters, model and attention notes."""
    status = as_run_status(status)
    if not status:
        return "Device, precision and model notes appear here once a run starts."
    lines = []
    if status.device:
        lines.append(f"- device **{status.device}**, precision **{(status.precision or '')}**")
    if status.trainable_params:
        lines.append(f"- {status.trainable_params:,} / {(status.total_params or 0):,} parameters trainable")
    if status.num_train is not None:
        lines.append(f"- {status.num_train} training / {(status.num_val or 0)} validation images")
    baseline = run_baseline(status)
    if baseline is not None:
        lines.append(f"- validation baseline: always '{baseline.majority_class}' is right for"
                     f" {baseline.majority_count} of {baseline.total} ({format_accuracy(baseline.rate)}); chance"
                     f" {format_accuracy(baseline.chance)}")
    lines += [f"- {note}" for note in status.notes or [] if note]
    return "\n".join(lines)


def progress_html(status: RunStatus | dict[str, Any]) -> str:
    """A progress bar of optimizer steps (empty when nothing ran yet)."""
    status = as_run_status(status)
    total = status.total_steps
    if not total:
        return ""
    step = min(int(status.step or 0), int(total))
    share = 100.0 * step / max(int(total), 1)
    state = (status.status or "")
    return (f'<div class="vitft-progress vitft-progress-{state}" role="progressbar" aria-valuenow="{step}"'
            f' aria-valuemax="{int(total)}"><div style="width:{share:.1f}%"></div>'
            f'<span>{step} / {int(total)} steps ({share:.0f}%)</span></div>')


def shown_run(ctx: Any, run_dir: str | None) -> str | None:
    """The run the Train tab shows: the one this page started or resumed, else :func:`initial_run`."""
    return run_dir or initial_run(ctx)


def initial_run(ctx: Any) -> str | None:
    """The run a newly opened page shows: the running job, else the newest run (after an app
    restart that is the interrupted run, with its Resume)."""
    job = ctx.runner.current
    if job is not None and job.running and job.kind == "train":
        return str(job.run_dir)
    for run in ctx.runner.store.list_runs():
        if read_status(run.path):
            return run.path
    return None


#: Outputs of :func:`button_outputs`, in order.
BUTTON_KEYS = ("message", "run", "signature", "status", "start", "stop", "resume")


def button_outputs(text: str, run_dir: str | None) -> tuple:
    """Start's and Resume's outputs (:data:`BUTTON_KEYS`) from their message and run.

    A started or resumed run becomes the shown run and is redrawn at the next poll; until then the
    status line says it is starting and only Stop is on (the page showed the old run's state, or
    "No run yet", for the second or so before the first poll). A refusal keeps the shown run, its
    signature, status and buttons.

    Args:
        text: the message markdown; run_dir: the started or resumed run, or None (refused).
    """
    if not run_dir:
        return text, *(gr.skip() for _ in BUTTON_KEYS[1:])
    starting = f"{STATUS_MARKS['starting']} **starting** · run `{Path(run_dir).name}`"
    return (text, run_dir, None, starting, gr.update(interactive=False), gr.update(interactive=True),
            gr.update(interactive=False))


#: The start of Stop's message, which the poll clears once the run has ended.
STOPPING = "■ Stopping"
#: The start of Start's and Resume's messages ("▶ Started run …", "▶ Resumed run …"), cleared the
#: same way once the run has ended (the status line then says how it ended).
STARTED = "▶"


def poll_live(ctx: Any, run_dir: str | None, last_signature: Any, message: str | None = None) -> tuple:
    """:func:`poll` plus the message line: "Stopping…", "Started run …" and "Resumed run …" are
    cleared by any poll that finds the shown run ended (completed, stopped, failed, interrupted) and
    no longer trained by this app (a resumed run reads "stopped" until its thread writes), whether
    or not the run folder changed
    since the last redraw (a poll sent just before Stop's message reached the page can take the
    redraw that shows "stopped"; the next polls then find nothing new, and the message stayed
    forever when clearing waited for a redraw). Every other message stays until the next button.
    The rule looks at the message the poll was sent with, never at the run alone: a poll computed
    while the page still showed an ended run could otherwise land after a newer Start or Resume
    and wipe its message (it did, under load).

    Args:
        ctx, run_dir, last_signature: as :func:`poll`.
        message: the message line as the page showed it when the poll was sent.

    Returns:
        :func:`poll`'s values, then the message (``""`` or ``gr.skip()``).
    """
    values = poll(ctx, run_dir, last_signature)
    clearable = (message or "").lstrip().startswith((STOPPING, STARTED))
    shown = shown_run(ctx, run_dir) if clearable else None
    settled = bool(shown) and not trains_here(ctx, shown) and read_status(shown).status in ENDED_STATUSES
    return (*values, "" if settled else gr.skip())


def _signature(run_dir: str) -> tuple:
    sig = []
    for name in ("status.json", "metrics.csv"):
        try:
            sig.append(os.stat(os.path.join(run_dir, name)).st_mtime_ns)
        except OSError:
            sig.append(None)
    return (run_dir, *sig)


#: Outputs of :func:`poll`, in order.
POLL_KEYS = ("status", "progress", "details", "loss", "accuracy", "after_run", "banner", "start", "stop", "resume",
             "signature")

def trains_here(ctx: Any, run_dir: str | None) -> bool:
    """True while this app's job runner is training ``run_dir`` (not another process, not a sweep):
    from Start or Resume (before the run folder says so) until the run's ``RunFinished`` or
    ``RunFailed`` (the thread may then still write the model card)."""
    job = ctx.runner.current
    return (run_dir is not None and job is not None and job.running and not job.finished.is_set()
            and str(job.run_dir) == str(run_dir))


def button_states(ctx: Any, run_dir: str | None, status: RunStatus | None) -> tuple:
    """Start, Stop and Resume as the shown run allows. While this app trains it, only Stop is on;
    otherwise Start is on, and Resume when the run has ended and kept a checkpoint to resume from
    (stopped, failed or interrupted; a completed run deletes its checkpoint). A run another process
    trains (``vitft train`` in a terminal, same runs folder) is shown live, but this app's Stop
    cannot stop it, so Stop stays off and Start stays on.

    Args:
        ctx: the app context; run_dir: the shown run or None; status: its status (None: no run).

    Returns:
        ``(start, stop, resume)`` ``gr.update(interactive=...)`` values.
    """
    state = status.status if status is not None else None
    here = trains_here(ctx, run_dir)
    resumable = (not here and state in ("stopped", "failed", "interrupted") and run_dir is not None
                 and has_checkpoint(run_dir))
    return gr.update(interactive=not here), gr.update(interactive=here), gr.update(interactive=resumable)


def poll(ctx: Any, run_dir: str | None, last_signature: Any) -> tuple:
    """Reads the run folder for the live view; skips redrawing when nothing changed.

    Returns:
        Values for :data:`POLL_KEYS`: status markdown, progress bar HTML, run details markdown,
        loss figure, accuracy figure, the after-run buttons' row update, the banner, Start's, Stop's
        and Resume's states (:func:`button_states`) and the signature (``gr.skip()`` values when
        unchanged).
    """
    run_dir = shown_run(ctx, run_dir)
    if not run_dir:
        return (status_markdown({}, ""), "", status_details({}), gr.skip(), gr.skip(), gr.update(visible=False),
                "", *button_states(ctx, None, None), None)
    # The files, and whether this app trains the run: the buttons follow the job, which can end
    # a moment after the run folder last changed (RunFinished is recorded before it reaches the job).
    signature = (*_signature(run_dir), trains_here(ctx, run_dir))
    if signature == last_signature:
        return tuple(gr.skip() for _ in POLL_KEYS)
    status = read_status(run_dir)
    try:
        metrics = read_metrics(run_dir)
        finished = status.status in ENDED_STATUSES
        has_model = finished and model_dir(run_dir) is not None
        return (status_markdown(status, Path(run_dir).name), progress_html(status), status_details(status),
                figure_loss(metrics), figure_accuracy(metrics, run_baseline(status)), gr.update(visible=has_model),
                banner_markdown(status, Path(run_dir).name), *button_states(ctx, run_dir, status), signature)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # a damaged file: one line, every tick quiet
        text = (f"✗ Run `{Path(run_dir).name}`: its status.json or metrics.csv is damaged"
                f" ({type(exc).__name__}: {str(exc)[:120]}); the live view cannot show it.")
        return (text, "", status_details({}), gr.skip(), gr.skip(), gr.update(visible=False), "",
                *button_states(ctx, run_dir, None), signature)


def banner_markdown(status: RunStatus | dict[str, Any], run_id: str) -> str:
    """A one-line status under the dataset line while a run trains, or when the shown run was
    interrupted by an app restart (the form above Start is long; a reopened page shows at once
    what is going on). Empty otherwise."""
    status = as_run_status(status)
    state = status.status
    if state == "interrupted":
        return (f"{STATUS_MARKS[state]} The app stopped while run `{run_id}` was training (step {(status.step or 0)}):"
                " **Resume**, below the settings, continues it from its last checkpoint.")
    if state not in ("running", "starting"):
        return ""
    where = f"step {(status.step or 0)}/{status.total_steps}" if status.total_steps else "starting"
    return (f"{STATUS_MARKS[state]} **Training** run `{run_id}` · {where} · ETA {_format_seconds(status.eta_s)}"
            " · Stop, Resume, status and curves are below the settings.")


def augment_summary(name: str | None, choice: dict[str, Any] | None = None) -> str:
    """One line under the augmentation choice: what it does, and why it is the default for this data."""
    what = {
        "none": "no augmentation: images are only resized",
        "basic": "random resized crop and horizontal flip",
        "randaugment": "basic + RandAugment (2 random ops, magnitude 9)",
        "trivialaugment": "basic + TrivialAugmentWide",
        "autoaugment": "basic + AutoAugment (ImageNet policy)",
    }.get(name or "", str(name))
    text = f"Augmentation: {what}."
    if choice and choice.get("augment") and choice.get("augment_reason"):
        text += f" Suggested for this dataset: **{choice['augment']}** ({choice['augment_reason']})."
    return text


def train_again(run_dir: str | None, fields: list[str]) -> tuple[list[Any], str | None, str]:
    """Form values and dataset of a finished run, to train it again.

    Returns:
        ``(values in the order of fields (gr.skip() for fields the config lacks), the run's dataset
        folder or None, message)``; never raises.
    """
    if not run_dir:
        return [gr.skip() for _ in fields], None, "Choose a run first."
    config = read_config(run_dir)
    if not config:
        return [gr.skip() for _ in fields], None, f"✗ {Path(run_dir).name} has no readable config.json."
    values = [config[name] if name in config and config[name] is not None else gr.skip() for name in fields]
    return (values, config.get("data_dir"),
            f"Settings and dataset of `{Path(run_dir).name}` loaded: edit anything, then press **Start**.")


@dataclass
class TrainTab:
    """Components other tabs use (the app wires the after-run buttons to Evaluate and Predict)."""

    run: gr.State
    """The run folder this page started or resumed (None: :func:`initial_run`)."""
    evaluate_button: gr.Button
    try_button: gr.Button
    signature: gr.State
    """What the live view last drew; None makes the next timer tick redraw everything."""
    on_load: Callable[[], list]
    """Page-load handler: the running job's settings into the form (values for ``load_outputs``)."""
    load_outputs: list
    layout: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)
    """``{TrainConfig field: (section, row)}``: where each setting sits (see :func:`build`)."""
    form: dict[str, Any] = dataclasses.field(default_factory=dict)
    """``{TrainConfig field: component}``."""


def folded_rows(layout: dict[str, tuple[str, int]]) -> dict[str, list[list[str]]]:
    """``{section: rows of field names}`` of the folded sections (not ``model``/``training``), in the
    order of ``layout``."""
    rows: dict[str, dict[int, list[str]]] = {}
    for name, (section, row) in layout.items():
        if section not in ("model", "training"):
            rows.setdefault(section, {}).setdefault(row, []).append(name)
    return {section: [by_row[row] for row in sorted(by_row)] for section, by_row in rows.items()}


def _build_form(ctx: Any, layout: dict[str, tuple[str, int]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The settings: the always visible model and training columns, then the folded sections.

    Args:
        layout: ``{TrainConfig field: (section, row)}`` for the folded sections, in display order.

    Returns:
        ``(form, parts)``: ``{TrainConfig field: component}`` and the other components by name
        (preset buttons, model notes, augmentation preview).
    """
    form: dict[str, Any] = {}
    parts: dict[str, Any] = {}
    with gr.Row(equal_height=True):
        with gr.Column(scale=3):
            gr.Markdown("**Presets** fill the form (edit anything after): **Quick** = linear probe, no augmentation;"
                        " **Balanced** = partial freeze + basic augmentation; **Best** = RandAugment, MixUp/CutMix,"
                        " label smoothing, layer decay, EMA; **Auto** = a from-scratch"
                        " recipe chosen from the data.")
        with gr.Column(scale=2, min_width=320):
            with gr.Row():
                parts["presets"] = {name: gr.Button(name.capitalize(), size="sm", elem_id=f"preset-{name}",
                                                    min_width=90) for name in PRESETS}
                parts["auto"] = gr.Button("Auto", size="sm", elem_id="preset-auto", min_width=90)
    with gr.Row():
        with gr.Column(scale=2):
            default_model, _ = resolve_default_model(ctx.settings.device)  # pretrained when the Hub or cache has one
            form["model"] = field_widget(
                "model", choices=list(MODEL_CHOICES), value=default_model, allow_custom_value=True,
                info="A Hub id, a local save_pretrained folder, or a *-scratch model (offline, random weights).",
                elem_id="model-choice")
            parts["catalog"] = gr.Markdown(elem_id="model-catalog-info")
            form["image_size"] = field_widget("image_size", visible=is_scratch_model(default_model))
            form["freeze_depth"] = field_widget("freeze_depth")
            parts["params"] = gr.Markdown(elem_id="param-count")
        with gr.Column(scale=3):
            with gr.Row():
                form["epochs"] = field_widget("epochs")
                form["batch_size"] = field_widget("batch_size")
                form["lr"] = field_widget(
                    "lr", value=scratch_model(default_model).lr if is_scratch_model(default_model) else FINETUNE_LR)
            form["augment"] = field_widget("augment")
            parts["augment_note"] = gr.Markdown(augment_summary(form["augment"].value), elem_id="augment-summary")
    for section, rows in folded_rows(layout).items():
        with gr.Accordion(SECTIONS[section], open=False):
            for row in rows:
                field_row(row, form)
            if section == "optimization":
                parts["lora_note"] = gr.Markdown(lora_note("", None, 0, 0, None, None), elem_id="lora-note")
            if section == "augmentation":
                with gr.Row():
                    parts["preview_button"] = gr.Button("Preview augmentation", size="sm", elem_id="preview-button")
                    parts["preview_message"] = gr.Markdown(elem_id="preview-message")
                parts["preview"] = gr.Gallery(label="Augmented training images (current settings)", columns=8,
                                              height=240, object_fit="contain", elem_id="augment-preview")
    return form, parts


def _build_live() -> dict[str, Any]:
    """Start, Stop, Resume, the progress bar, status and messages, the after-run buttons and the
    live plots, by name."""
    live: dict[str, Any] = {}
    with gr.Group(elem_id="train-live"):
        with gr.Row(equal_height=True):
            live["start"] = gr.Button("Start", variant="primary", elem_id="start-button", scale=1, min_width=90)
            # Off until the first poll says what the shown run allows (button_states).
            live["stop"] = gr.Button("Stop", variant="stop", elem_id="stop-button", scale=1, min_width=90,
                                     interactive=False)
            live["resume"] = gr.Button("Resume", elem_id="resume-button", scale=1, min_width=90, interactive=False)
            live["progress"] = gr.HTML(elem_id="train-progress", scale=5, padding=False)
        live["message"] = gr.Markdown(elem_id="train-message")
        live["status"] = gr.Markdown(elem_id="train-status")
    with gr.Row(visible=False, elem_id="after-run") as live["after_run"]:
        live["evaluate_button"] = gr.Button("Evaluate this run", elem_id="evaluate-this-run", size="sm")
        live["try_button"] = gr.Button("Try it (Predict)", elem_id="try-this-run", size="sm")
        live["again_button"] = gr.Button("Train again with these settings", elem_id="train-again", size="sm")
    with gr.Row():
        live["loss"] = gr.Plot(label="Loss", elem_id="loss-plot")
        live["accuracy"] = gr.Plot(label="Accuracy", elem_id="accuracy-plot")
    with gr.Accordion("Run details (device, precision, notes)", open=False):
        live["details"] = gr.Markdown(status_details({}), elem_id="train-details")
    return live


def build(ctx: Any, data: Any) -> TrainTab:
    """Builds the Train tab's components and events.

    The chosen dataset is shown at the top; the common settings are always visible; the rest of
    the recipe (and precision, attention kernel, device notes) sits in folded groups. Start, Stop,
    Resume, the status line and the progress bar sit together above the live plots. Preset
    buttons fill the form; every control is named after its
    :class:`~vitft_app.config.TrainConfig` field and built from its declaration (ui/form.py).
    """
    # Where each TrainConfig field sits: (section, row). The model and training sections are the
    # two visible columns; the others fold (titles: config.SECTIONS). A field left out of this
    # table has no control; the widget itself comes from the field's declaration (ui/form.py).
    layout = {
        "model": ("model", 0), "image_size": ("model", 0), "freeze_depth": ("model", 0),
        "epochs": ("training", 0), "batch_size": ("training", 0), "lr": ("training", 0), "augment": ("training", 1),
        "crop_scale_min": ("augmentation", 0), "color_jitter": ("augmentation", 0),
        "random_erasing": ("augmentation", 0), "patch_mask_ratio": ("augmentation", 0),
        "patch_dropout": ("augmentation", 0),
        "mixup": ("augmentation", 1), "cutmix": ("augmentation", 1), "label_smoothing": ("augmentation", 1),
        "class_weights": ("augmentation", 1),
        "optimizer": ("optimization", 0), "scheduler": ("optimization", 0), "warmup_ratio": ("optimization", 0),
        "weight_decay": ("optimization", 0),
        "layer_decay": ("optimization", 1), "grad_accum_steps": ("optimization", 1),
        "max_grad_norm": ("optimization", 1), "ema_decay": ("optimization", 1), "auto_batch_size": ("optimization", 1),
        "gradual_unfreeze": ("optimization", 2), "distill_weight": ("optimization", 2),
        "early_stopping_patience": ("optimization", 2), "early_stopping_min_delta": ("optimization", 2),
        "lora_rank": ("optimization", 3), "lora_alpha": ("optimization", 3), "lora_targets": ("optimization", 3),
        "val_fraction": ("system", 0), "seed": ("system", 0), "log_every_steps": ("system", 0),
        "num_workers": ("system", 0), "max_nonfinite_steps": ("system", 0),
        "precision": ("system", 1), "attention": ("system", 1),
    }
    dataset_line = gr.Markdown(dataset_markdown(None), elem_id="train-dataset")
    banner = gr.Markdown(elem_id="train-banner")
    form, parts = _build_form(ctx, layout)
    live = _build_live()
    live["banner"] = banner
    run_state = gr.State(None)
    signature = gr.State(None)
    live["signature"] = signature
    _wire_run_events(ctx, data, form, live, run_state)
    on_load, suggested_for = _wire_form_events(ctx, data, form, parts, live, run_state, dataset_line)
    return TrainTab(run=run_state, evaluate_button=live["evaluate_button"], try_button=live["try_button"],
                    signature=signature, on_load=on_load, load_outputs=[*form.values(), suggested_for],
                    layout=layout, form=form)


def _wire_run_events(ctx: Any, data: Any, form: dict[str, Any], live: dict[str, Any], run_state: gr.State) -> None:
    """Start, Stop, Resume and the timer that polls the shown run."""
    message, signature = live["message"], live["signature"]

    def on_start(values: dict, progress: gr.Progress = gr.Progress()) -> tuple:
        def report(done: int, total: int) -> None:
            progress((done, total), desc="Checking images", unit="files")

        chosen = values[data.chosen]
        if not chosen or not chosen.get("path"):
            return button_outputs("✗ No dataset chosen: pick a folder in the Data tab and press Scan.", None)
        text, run_dir = start_run(ctx, {name: values[comp] for name, comp in form.items()}, chosen["path"], report)
        return button_outputs(text, run_dir)

    def on_resume(run_dir: str | None) -> tuple:
        return button_outputs(*resume_run(ctx, run_dir))

    def on_poll(run: str | None, sig: Any, shown: str | None) -> tuple:
        return poll_live(ctx, run, sig, shown)

    # On Start, bring the buttons, status and plots into view: that is where things move.
    scroll = "() => document.querySelector('#train-live')?.scrollIntoView({behavior: 'smooth', block: 'start'})"
    started = [message, run_state, signature, *(live[k] for k in BUTTON_KEYS[3:])]  # button_outputs' order
    live["start"].click(on_start, inputs=set(form.values()) | {data.chosen}, outputs=started)
    live["start"].click(None, js=scroll)
    live["stop"].click(lambda: stop_run(ctx), outputs=message)
    live["resume"].click(on_resume, inputs=run_state, outputs=started)
    live["resume"].click(None, js=scroll)
    timer = gr.Timer(1.0)
    timer.tick(on_poll, inputs=[run_state, signature, message], outputs=[*(live[k] for k in POLL_KEYS), message])


def _wire_form_events(ctx: Any, data: Any, form: dict[str, Any], parts: dict[str, Any], live: dict[str, Any],
                      run_state: gr.State, dataset_line: Any) -> tuple[Callable[[], list], gr.State]:
    """The form's own events: the chosen dataset, presets, Train again, the augmentation preview,
    the model notes.

    Returns:
        ``(on_load, suggested_for)``: the page-load handler and the state it also fills.
    """
    fields = list(form)
    message = live["message"]
    model, image_size, freeze_depth, augment = form["model"], form["image_size"], form["freeze_depth"], form["augment"]
    params, augment_note = parts["params"], parts["augment_note"]

    def info(name: str, size: int | None, depth: int, classes: list[str]) -> tuple[Any, str]:
        # A typed model folder must pass the app's confinement check (settings).
        return model_info(name, size, depth, classes, settings=ctx.settings)

    # The chosen dataset: shown at the top, its suggested augmentation in the form.
    # The dataset's suggestions (augmentation, scratch image size) are applied once per dataset, so a
    # re-scan keeps what the user chose, and "Train again" keeps the run's own settings.
    suggested_for = gr.State(None)

    def on_dataset(chosen: dict | None, done_for: str | None) -> tuple:
        chosen = chosen or {}
        path, suggestion, size = chosen.get("path"), chosen.get("augment"), chosen.get("suggested_image_size")
        if path == done_for or not path:
            return dataset_markdown(chosen), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return (dataset_markdown(chosen), suggestion or gr.skip(), size or gr.skip(), path,
                augment_summary(suggestion, chosen) if suggestion else gr.skip())

    data.chosen.change(on_dataset, inputs=[data.chosen, suggested_for],
                       outputs=[dataset_line, augment, image_size, suggested_for, augment_note])
    augment.change(lambda name, chosen: augment_summary(name, chosen), inputs=[augment, data.chosen],
                   outputs=augment_note)

    def on_again(run: str | None) -> list:
        values, data_dir, text = train_again(shown_run(ctx, run), fields)
        # The run's own augmentation wins over the dataset's suggestion.
        return [*values, data_dir if data_dir else gr.skip(), data_dir if data_dir else gr.skip(), text]

    live["again_button"].click(on_again, inputs=run_state,
                               outputs=[*form.values(), data.path, suggested_for, message]).then(
        data.scan_handler, inputs=data.path, outputs=data.outputs)

    for name, button in parts["presets"].items():
        def apply(model_name: str, size: float, name: str = name) -> list:
            values, text = preset_updates(name, model_name, size, fields)
            return [*values, text]

        # A preset changes the freeze depth, image size and augmentation: refresh their summaries too.
        button.click(apply, inputs=[model, image_size], outputs=[*form.values(), message]).then(
            info, inputs=[model, image_size, freeze_depth, data.classes], outputs=[freeze_depth, params])

    parts["auto"].click(lambda text: (lambda v, t: [*v, t])(*auto_preset_updates(text, ctx.settings, fields)),
                        inputs=data.path, outputs=[*form.values(), message]).then(
        info, inputs=[model, image_size, freeze_depth, data.classes], outputs=[freeze_depth, params])

    parts["preview_button"].click(
        lambda values: augmentation_preview({n: values[c] for n, c in form.items()}, values[data.path], ctx.settings),
        inputs=set(form.values()) | {data.path}, outputs=[parts["preview"], parts["preview_message"]],
    )
    data.balance_button.click(
        lambda: ("balanced", "⚖ Class weights set to **balanced** (Train tab → Augmentation and regularization)."),
        outputs=[form["class_weights"], message],
    )

    info_inputs = [model, image_size, freeze_depth, data.classes]
    model.change(lambda name: gr.update(visible=is_scratch_model(name)), inputs=model, outputs=image_size)
    # Only a model the user picks suggests a learning rate (a loaded run's settings keep theirs).
    model.input(lambda name: scratch_model(name).lr if is_scratch_model(name) else FINETUNE_LR, inputs=model,
                outputs=form["lr"])
    for component in (model, image_size, data.classes):
        component.change(info, inputs=info_inputs, outputs=[freeze_depth, params])
    for component in (model, image_size, data.classes):
        component.change(lambda name, size, text: catalog_info(name, size, text, ctx.settings),
                         inputs=[model, image_size, data.path], outputs=parts["catalog"])
    freeze_depth.input(info, inputs=info_inputs, outputs=[freeze_depth, params], trigger_mode="always_last")
    wire_lora_note([model, data.classes, freeze_depth, form["lora_rank"], form["lora_alpha"], form["lora_targets"],
                    image_size], parts["lora_note"], ctx.settings)

    def on_load() -> list:
        # A reopened page shows the running job's settings in the form, not the defaults.
        job = ctx.runner.current
        if job is None or not job.running or job.kind != "train":
            return [gr.skip() for _ in range(len(fields) + 1)]
        values, data_dir, _ = train_again(str(job.run_dir), fields)
        return [*values, data_dir if data_dir else gr.skip()]

    return on_load, suggested_for
