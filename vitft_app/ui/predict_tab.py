"""Predict tab: choose a run, drop images, see the top-k classes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image, ImageOps

from ..images import ImageLoadError, load_image


def run_choices(ctx: Any) -> list[tuple[str, str]]:
    """``(label, run folder)`` for every run with a saved model, newest first."""
    choices = []
    for run in ctx.runner.store.runs_with_model():
        accuracy = f", val acc {run.best_val_accuracy:.3f}" if run.best_val_accuracy is not None else ""
        choices.append((f"{run.run_id} ({run.status}{accuracy})", run.path))
    return choices


def refresh_runs(ctx: Any, current: str | None) -> Any:
    """Dropdown update: the runs with a model; keeps the current choice, else the newest."""
    choices = run_choices(ctx)
    paths = [path for _, path in choices]
    value = current if current in paths else (paths[0] if paths else None)
    return gr.update(choices=choices, value=value)


def predict_files(ctx: Any, run_dir: str | None, files: list | None, top_k: int) -> list[dict[str, Any]]:
    """Predicts uploaded files.

    Returns:
        One dict per file: ``{"name", "path", "scores"}`` (``{label: probability}``) or
        ``{"name", "path", "error"}``. Never raises: a missing run, a broken model or a bad
        image becomes an error entry.
    """
    paths = [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in (files or [])]
    if not paths:
        return []
    if not run_dir:
        return [{"name": "", "path": None, "error": "No trained model yet: train a run first, then choose it above."}]
    try:
        predictor = ctx.predictor(run_dir)
    except Exception as exc:  # noqa: BLE001 - a broken model folder is a message, not a server error
        return [{"name": "", "path": None, "error": f"Cannot load the model of {Path(run_dir).name}: {exc}"}]
    results = []
    for path in paths:
        name = os.path.basename(path)
        try:
            prediction = predictor.predict([path], top_k=int(top_k))[0]
        except ImageLoadError as exc:
            results.append({"name": name, "path": None, "error": f"{name}: {exc.reason}"})
            continue
        results.append({"name": name, "path": path, "scores": prediction.as_dict()})
    return results


def export_zip(run_dir: str | None) -> tuple[str | None, str]:
    """Zips the run's model (``transformers.pipeline`` format) into a temp folder for download.

    Returns:
        ``(zip path or None, message markdown)``; never raises.
    """
    import tempfile

    from ..export import ExportError, export_model_zip

    if not run_dir:
        return None, "Choose a run first."
    dest = Path(tempfile.mkdtemp(prefix="vitft-export-")) / f"{Path(run_dir).name}-model.zip"
    try:
        path = export_model_zip(run_dir, dest)
    except (ExportError, OSError) as exc:
        return None, f"❌ {exc}"
    return str(path), f"📦 `{path.name}`: unzip it and load it with `transformers.pipeline(\"image-classification\", model=FOLDER)`."


def export_onnx_for_run(run_dir: str | None) -> str:
    """Exports the run's model to ONNX, checked on its validation images; returns a message."""
    from ..export import ExportError, export_onnx, validation_images

    if not run_dir:
        return "Choose a run first."
    try:
        result = export_onnx(run_dir, images=validation_images(run_dir) or None)
    except (ExportError, OSError) as exc:
        return f"❌ {exc}"
    return (f"✅ `{result.path}` (opset {result.opset}); largest probability difference from PyTorch"
            f" {result.max_abs_prob_diff:.2g} over {result.num_images} images."
            f" Use it with `vitft predict --backend onnx --model {run_dir} IMAGE`.")


def build(ctx: Any, demo: gr.Blocks, tab: gr.Tab) -> None:
    """Builds the Predict tab's components and events."""
    with gr.Row():
        run = gr.Dropdown(label="Model (run)", choices=[], elem_id="predict-run", scale=4)
        refresh = gr.Button("↻ Refresh", scale=1)
        top_k = gr.Slider(1, 10, value=5, step=1, label="Top-k", scale=2)
    files = gr.File(label="Drop one or more images here", file_count="multiple", file_types=["image"],
                    elem_id="predict-files")
    with gr.Accordion("Export this model", open=False):
        with gr.Row():
            zip_button = gr.Button("Make a model zip (for transformers.pipeline)", elem_id="export-zip")
            onnx_button = gr.Button("Export to ONNX (checked against PyTorch)", elem_id="export-onnx")
        export_file = gr.File(label="Model zip", interactive=False, elem_id="export-file")
        export_message = gr.Markdown(elem_id="export-message")
    results = gr.State([])

    @gr.render(inputs=results)
    def show(items: list[dict[str, Any]]) -> None:
        if not items:
            gr.Markdown("Upload images to see the model's top classes.")
            return
        for item in items:
            if "error" in item:
                gr.Markdown(f"❌ {item['error']}", elem_classes="predict-error")
                continue
            with gr.Row(equal_height=True):
                try:
                    thumb = ImageOps.contain(load_image(item["path"]), (224, 224), Image.Resampling.NEAREST)
                except ImageLoadError:
                    thumb = None
                gr.Image(thumb, label=item["name"], height=200, interactive=False, scale=1)
                gr.Label(item["scores"], label=f"Top classes: {item['name']}", scale=2, elem_classes="predict-label")

    def on_predict(run_dir: str | None, uploaded: list | None, k: int) -> list[dict[str, Any]]:
        return predict_files(ctx, run_dir, uploaded, k)

    files.change(on_predict, inputs=[run, files, top_k], outputs=results)
    run.change(on_predict, inputs=[run, files, top_k], outputs=results)
    top_k.release(on_predict, inputs=[run, files, top_k], outputs=results)
    zip_button.click(export_zip, inputs=run, outputs=[export_file, export_message])
    onnx_button.click(export_onnx_for_run, inputs=run, outputs=export_message)
    refresh.click(lambda current: refresh_runs(ctx, current), inputs=run, outputs=run)
    demo.load(lambda: refresh_runs(ctx, None), outputs=run)
    tab.select(lambda current: refresh_runs(ctx, current), inputs=run, outputs=run)
