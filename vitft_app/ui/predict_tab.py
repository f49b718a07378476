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


def build(ctx: Any, demo: gr.Blocks, tab: gr.Tab) -> None:
    """Builds the Predict tab's components and events."""
    with gr.Row():
        run = gr.Dropdown(label="Model (run)", choices=[], elem_id="predict-run", scale=4)
        refresh = gr.Button("↻ Refresh", scale=1)
        top_k = gr.Slider(1, 10, value=5, step=1, label="Top-k", scale=2)
    files = gr.File(label="Drop one or more images here", file_count="multiple", file_types=["image"],
                    elem_id="predict-files")
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
    refresh.click(lambda current: refresh_runs(ctx, current), inputs=run, outputs=run)
    demo.load(lambda: refresh_runs(ctx, None), outputs=run)
    tab.select(lambda current: refresh_runs(ctx, current), inputs=run, outputs=run)
