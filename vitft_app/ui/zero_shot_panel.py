"""The Data tab's zero-shot baseline: a CLIP or SigLIP model scores the chosen dataset's validation
split from the class names alone (:mod:`vitft_app.zero_shot`); the result becomes a Runs-table row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from ..baseline import format_accuracy
from ..zero_shot import DEFAULT_TEMPLATE, EXAMPLE_MODELS, ZeroShotError, evaluate_zero_shot, save_zero_shot_run


def run_zero_shot(ctx: Any, chosen: dict[str, Any] | None, model: str | None, template: str | None,
                  progress: Any = None) -> str:
    """Evaluates the zero-shot baseline on the chosen dataset and saves it as a run; returns Markdown.

    Args:
        ctx: the app context (settings: runs folder, model-path confinement).
        chosen: the Data tab's chosen dataset (:func:`~vitft_app.app_state.dataset_choice`), or None.
        model: a CLIP/SigLIP Hub id or a folder (under the data root or runs folder when confined).
        template: the prompt template (``{}`` = class name).
        progress: a ``gr.Progress`` (or None).

    Returns:
        The result with its baseline (and the weak warning when it is weak), or a one-line ✗ message.
        Never raises.
    """
    from ..config import TrainConfig
    from ..confine import PathNotAllowed

    if not chosen or not chosen.get("path"):
        return "Scan a dataset first: the zero-shot baseline uses its validation split."
    if not (model or "").strip():
        return f"✗ Type a CLIP or SigLIP model: a Hub id such as `{EXAMPLE_MODELS[0]}`, or a local folder."
    try:
        checked = ctx.settings.check_model(model)

        def report(done: int, total: int) -> None:
            if progress is not None:
                progress(done / max(total, 1), desc=f"zero-shot: {done}/{total} validation images")

        result = evaluate_zero_shot(chosen["path"], checked, template or DEFAULT_TEMPLATE,
                                    val_fraction=TrainConfig.val_fraction, seed=TrainConfig.seed, progress=report)
        run_dir = save_zero_shot_run(result, ctx.settings.runs_dir)
    except (ZeroShotError, PathNotAllowed, OSError) as exc:
        return f"✗ {exc}"
    baseline = result.baseline
    lines = [f"**Zero-shot {format_accuracy(result.accuracy)}** on {result.num_images} validation images of"
             f" *{chosen.get('name', '')}* with `{model.strip()}` and the prompt `{result.template}`"]
    if baseline is not None:
        lines.append(f"Always answering '{baseline.majority_class}' gets {format_accuracy(baseline.rate)};"
                     f" chance is {format_accuracy(baseline.chance)}.")
    if result.weak_warning:
        lines.append(f"⚠ **Weak:** {result.weak_warning.removeprefix('Weak baseline: ')}")
    lines.append(f"Saved as `{Path(run_dir).name}` in the Runs table (epochs shows *zero-shot*), beside your"
                 " trained runs; the split is the one training uses (20% validation, seed 42).")
    return "  \n".join(lines)


def build(ctx: Any, chosen: gr.State) -> None:
    """The zero-shot accordion (model, prompt template, button, result), wired to the chosen dataset."""
    with gr.Accordion("Zero-shot baseline: CLIP / SigLIP from the class names, no training", open=False,
                      elem_id="zero-shot"):
        gr.Markdown("How far does an image-text model get with nothing but the class names? Each name goes"
                    " into the prompt template; the model picks the closest prompt for each validation image."
                    f" Real weights come from the Hugging Face Hub (`{EXAMPLE_MODELS[0]}`, `{EXAMPLE_MODELS[1]}`);"
                    " without a connection, give a local folder saved with `save_pretrained`.")
        with gr.Row(equal_height=True):
            model = gr.Textbox(label="CLIP or SigLIP model", value=EXAMPLE_MODELS[0], scale=3,
                               elem_id="zero-shot-model", info="Hub id or local folder")
            template = gr.Textbox(label="Prompt template", value=DEFAULT_TEMPLATE, scale=2,
                                  elem_id="zero-shot-template", info="{} is replaced by each class name")
            button = gr.Button("Run zero-shot baseline", scale=1, elem_id="zero-shot-button")
        result = gr.Markdown(elem_id="zero-shot-result")

    def on_click(chosen_value: dict | None, model_value: str, template_value: str,
                 progress: gr.Progress = gr.Progress()) -> str:
        return run_zero_shot(ctx, chosen_value, model_value, template_value, progress)

    button.click(on_click, inputs=[chosen, model, template], outputs=result)
