"""Predict tab: choose a run, drop images, see the top-k classes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
import base64
import io

import gradio as gr
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from ..baseline import accuracy_with_baseline, run_baseline, weak_model_warning
from ..images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image
from ..runs import read_status
from ..predict import NOT_SURE, apply_threshold, expand_image_paths
from .common import download_path
from .errors import unexpected_error
from ..export import ExportError, export_model_zip, export_onnx, validation_images
from ..report import push_to_hub
from ..uploads import UnsafeArchiveError, extract_zip
from .data_tab import resolve_data_path
from . import int8_panel


class PixelCheckedImage(gr.Image):
    """``gr.Image`` that refuses an image over the pixel limit from its header, before Gradio
    decodes it (a 100 MP webcam frame sent through the API would otherwise cost ~400 MB first)."""

    is_template = True  # rendered by the frontend's Image component

    def preprocess(self, payload: Any) -> Any:
        if payload is not None:
            check_image_header(payload)
        return super().preprocess(payload)


def check_image_header(payload: Any, max_pixels: int | None = None) -> None:
    """Reads only the header of an uploaded or webcam image and refuses it when too large.

    Raises:
        gr.Error: not an image, or more than ``max_pixels`` pixels (default: the loader's limit).
    """

    limit = max_pixels or DEFAULT_MAX_PIXELS
    url = getattr(payload, "url", None) or ""
    try:
        if url.startswith("data:"):
            source: Any = io.BytesIO(base64.b64decode(url.split(",", 1)[1]))
        elif getattr(payload, "path", None):
            source = payload.path
        else:
            return
        with Image.open(source) as image:  # lazy: the header only
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, IndexError):
        raise gr.Error("That is not an image this app can read.", print_exception=False) from None
    if width * height > limit:
        raise gr.Error(f"The image is {width}x{height} ({width * height / 1e6:.0f} MP); the limit is"
                       f" {limit / 1e6:.0f} MP. Use a smaller photo.", print_exception=False)


def run_choices(ctx: Any) -> list[tuple[str, str]]:
    """``(label, run folder)`` for every run with a saved model, newest first."""
    choices = []
    for run in ctx.runner.store.runs_with_model():
        accuracy = ""
        if run.best_val_accuracy is not None:
            accuracy = ", val accuracy " + accuracy_with_baseline(run.best_val_accuracy, run_baseline(read_status(run.path)))
        choices.append((f"{run.run_id} ({run.status}{accuracy})", run.path))
    return choices


def model_warning(run_dir: str | None) -> str | None:
    """The weak-model warning of a run whose validation accuracy is near its majority-class
    baseline (its predictions are then shown without a confident bold label), else None."""
    if not run_dir:
        return None
    status = read_status(run_dir)
    if status.monitor == "val_map":
        return None
    return weak_model_warning(status.best_val_accuracy, run_baseline(status))


def refresh_runs(ctx: Any, current: str | None) -> Any:
    """Dropdown update: the runs with a model; keeps the current choice, else the newest."""
    choices = run_choices(ctx)
    paths = [path for _, path in choices]
    value = current if current in paths else (paths[0] if paths else None)
    return gr.update(choices=choices, value=value)


def _load_predictor(ctx: Any, run_dir: str | None, backend: str = "torch") -> tuple[Any, str | None]:
    """``(predictor, None)`` or ``(None, message)``."""
    if not run_dir:
        return None, "No trained model yet: train a run first, then choose it above."
    try:
        return ctx.predictor(run_dir, backend), None
    except FileNotFoundError as exc:
        if backend == "onnx":
            return None, "No ONNX export of this model yet: open *Export this model* and press *Export to ONNX*."
        if backend == "onnx-int8":
            return None, "No int8 export of this model yet: open *Export this model* and press *Export int8 ONNX*."
        return None, f"Cannot load the model of {Path(run_dir).name}: {exc}"
    except Exception as exc:  # noqa: BLE001 - a broken model folder is a message, not a server error
        return None, unexpected_error(exc, f"Cannot load the model of {Path(run_dir).name}", run_dir=run_dir,
                                      mark="", with_type=False)


def predict_files(
    ctx: Any,
    run_dir: str | None,
    files: list | None,
    top_k: int,
    threshold: float = 0.0,
    tta: bool = False,
    backend: str = "torch",
    explain: bool = False,
) -> list[dict[str, Any]]:
    """Predicts uploaded (or webcam) image files.

    Args:
        threshold: top-1 probability under which the answer is "not sure" (0..1).
        tta: average over the image and its horizontal flip.
        backend: ``"torch"`` or ``"onnx"`` (the run's ONNX export).
        explain: add ``"explanation"`` (an overlay image) and ``"method"``: attention rollout for
            ViT models (PyTorch backend only).

    Returns:
        One dict per file: ``{"name", "path", "scores", "answer", "multi_label"}`` (``scores`` is
        ``{label: probability}``, ``answer`` the top-1 label or "not sure"; for a multi-label model
        every label at or above the threshold, default 0.5) or ``{"name", "path",
        "error"}``. Never raises: a missing run, a broken model or a bad image becomes an error entry.
    """
    paths = [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in (files or []) if f]
    if not paths:
        return []
    predictor, problem = _load_predictor(ctx, run_dir, backend)
    if problem:
        return [{"name": "", "path": None, "error": problem}]
    results = []
    for path in paths:
        name = os.path.basename(path)
        try:
            prediction = predictor.predict([path], top_k=int(top_k), tta=bool(tta))[0]
        except ImageLoadError as exc:
            results.append({"name": name, "path": None, "error": f"{name}: {exc.reason}"})
            continue
        item = {"name": name, "path": path, "scores": prediction.as_dict(),
                "answer": apply_threshold(prediction, float(threshold or 0)), "multi_label": prediction.multi_label}
        if explain and backend == "torch":
            from ..explain import explain_image

            explanation = explain_image(predictor, path)
            item |= {"explanation": explanation.overlay, "method": f"{explanation.method} for '{explanation.label}'"}
        results.append(item)
    return results


def predict_batch(
    ctx: Any, run_dir: str | None, folder_text: str | None, zip_file: Any, top_k: int, threshold: float, tta: bool
) -> tuple[pd.DataFrame | None, str | None, str]:
    """Predicts every image of a server folder (under the data root) or of an uploaded zip.

    Returns:
        ``(table, CSV path, message)``: one row per image (file, top1, score, answer, top_k as
        ``label:score`` pairs, error). Never raises.
    """

    predictor, problem = _load_predictor(ctx, run_dir)
    if problem:
        return None, None, f"✗ {problem}"
    try:
        if zip_file:
            zip_path = zip_file if isinstance(zip_file, str) else getattr(zip_file, "name", str(zip_file))
            folder = extract_zip(zip_path, Path(ctx.settings.data_root) / "uploads",
                                 quota_bytes=getattr(ctx.settings, "uploads_quota_bytes", None))
            shown = Path(zip_path).name
        else:
            folder = resolve_data_path(folder_text, ctx.settings)
            shown = (folder_text or "").strip()
            if not folder.is_dir():
                raise ValueError(f"'{shown}' is a file; batch prediction takes a folder of images (or a .zip).")
    except (UnsafeArchiveError, ValueError, OSError) as exc:
        return None, None, f"✗ {exc}"
    # Symbolic links are skipped, as in the dataset scan: a link must not read outside the data root.
    paths = expand_image_paths([folder], follow_symlinks=False)
    if not paths:
        return None, None, f"✗ No images in {shown} (image files: .jpg .jpeg .png .bmp .gif .webp .tif .tiff)."
    rows = []
    for path in paths:
        row: dict[str, Any] = {"file": os.path.relpath(path, folder)}
        try:
            prediction = predictor.predict([path], top_k=int(top_k), tta=bool(tta))[0]
        except ImageLoadError as exc:
            rows.append(row | {"error": exc.reason})
            continue
        rows.append(row | {
            "top1": prediction.labels[0], "score": round(prediction.scores[0], 6),
            "answer": apply_threshold(prediction, float(threshold or 0)),
            "top_k": "; ".join(f"{l}:{s:.4f}" for l, s in zip(prediction.labels, prediction.scores)), "error": "",
        })
    table = pd.DataFrame(rows, columns=["file", "top1", "score", "answer", "top_k", "error"])
    out = download_path(f"{Path(folder).name}-predictions.csv")
    table.to_csv(out, index=False)
    return table, str(out), f"✓ {len(table)} images from `{shown}`."


def export_zip(run_dir: str | None) -> tuple[str | None, str]:
    """Zips the run's model (``transformers.pipeline`` format) into a temp folder for download.

    Returns:
        ``(zip path or None, message markdown)``; never raises.
    """
    if not run_dir:
        return None, "Choose a run first."
    dest = download_path(f"{Path(run_dir).name}-model.zip")
    try:
        path = export_model_zip(run_dir, dest)
    except (ExportError, OSError) as exc:
        return None, f"✗ {exc}"
    return str(path), f"✓ `{path.name}`: unzip it and load it with `transformers.pipeline(\"image-classification\", model=FOLDER)`."


def export_onnx_for_run(run_dir: str | None) -> str:
    """Exports the run's model to ONNX, checked on its validation images; returns a message."""
    if not run_dir:
        return "Choose a run first."
    try:
        result = export_onnx(run_dir, images=validation_images(run_dir) or None)
    except (ExportError, OSError) as exc:
        return f"✗ {exc}"
    return (f"✓ `{result.path}` (opset {result.opset}); largest probability difference from PyTorch"
            f" {result.max_abs_prob_diff:.2g} over {result.num_images} images."
            f" Use it with `vitft predict --backend onnx --model {run_dir} IMAGE`.")


def push_model(run_dir: str | None, repo_id: str | None, token: str | None, private: bool) -> str:
    """Pushes the run's model (with its card) to the Hub; returns a message. Never raises."""
    if not run_dir:
        return "Choose a run first."
    try:
        url = push_to_hub(run_dir, repo_id or "", token or "", private=bool(private))
    except (ValueError, ConnectionError, FileNotFoundError) as exc:
        return f"✗ {exc}"
    except Exception as exc:  # noqa: BLE001 - the Hub client raises many types; the user needs the message
        return unexpected_error(exc, "Push failed", run_dir=run_dir)
    return f"✓ Pushed to {url}"


def render_results(items: list[dict[str, Any]], warning: str | None) -> None:
    """Draws the predictions of the dropped images (a ``gr.render`` body): per image its thumbnail,
    the explanation heatmap when asked, and the top classes (or "Not sure", or a weak model's guess)."""
    if not items:
        gr.Markdown("Drop images above to see the model's top classes.", elem_id="predict-empty")
        return
    if warning:
        gr.Markdown(f"⚠ **{warning}**", elem_classes="predict-weak")
    for item in items:
        if "error" in item:
            gr.Markdown(f"✗ {item['error']}", elem_classes="predict-error")
            continue
        with gr.Row(equal_height=True):
            try:
                thumb = ImageOps.contain(load_image(item["path"]), (224, 224), Image.Resampling.NEAREST)
            except ImageLoadError:
                thumb = None
            gr.Image(thumb, label=item["name"], height=200, interactive=False, scale=1)
            if item.get("explanation") is not None:
                gr.Image(ImageOps.contain(item["explanation"], (224, 224)), label=item["method"], height=200,
                         interactive=False, scale=1, elem_classes="predict-explanation")
            with gr.Column(scale=2):
                # A bold top class only when the answer stands: "Not sure" replaces it, and a
                # weak model's guesses are listed as plain scores.
                confident = True
                if item.get("multi_label"):
                    gr.Markdown(f"**Labels present:** {item['answer']}", elem_classes="predict-present")
                elif item["answer"] == NOT_SURE:
                    confident = False
                    gr.Markdown("### Not sure\nThe top class is below the confidence threshold; the scores:",
                                elem_classes="predict-not-sure")
                elif warning:
                    confident = False
                    gr.Markdown(f"Guess of a weak model: {item['answer']}", elem_classes="predict-weak-guess")
                gr.Label(item["scores"], label=f"Top classes: {item['name']}", elem_classes="predict-label",
                         show_heading=confident)


def build(ctx: Any, demo: gr.Blocks, tab: gr.Tab) -> gr.Dropdown:
    """Builds the Predict tab's components and events.

    Returns:
        The run dropdown (the Runs tab's "open in Predict" sets it).
    """
    with gr.Row():
        run = gr.Dropdown(label="Model (run)", choices=[], elem_id="predict-run", scale=4)
        refresh = gr.Button("↻ Refresh", scale=1)
    with gr.Row():
        top_k = gr.Slider(1, 10, value=5, step=1, label="Top-k", scale=2)
        threshold = gr.Slider(0, 1, value=0, step=0.05, label="Confidence threshold",
                              info="below it the answer is 'not sure'", scale=2, elem_id="predict-threshold")
        tta = gr.Checkbox(False, label="Test-time augmentation (image + flip)", scale=1)
        backend = gr.Radio(int8_panel.BASE_BACKENDS, value="torch", label="Backend",
                           info="onnx (once exported below) runs the model's ONNX export with onnxruntime;"
                                " onnx int8 its int8 export", scale=1)
        explain = gr.Checkbox(False, label="Explain (attention rollout heatmap)", scale=1, elem_id="predict-explain")
    with gr.Row():
        files = gr.File(label="Drop one or more images here", file_count="multiple", file_types=["image"],
                        elem_id="predict-files", scale=3, height=170)
        webcam = PixelCheckedImage(sources=["webcam"], type="filepath", label="Or take a photo", scale=2,
                          elem_id="predict-webcam", height=170)
    results = gr.State([])
    weak = gr.State(None)
    shown_images = gr.State([])  # the last dropped images: the settings above re-predict them

    gr.render(inputs=[results, weak])(render_results)

    with gr.Accordion("Batch prediction: a folder or a zip of images", open=False):
        with gr.Row():
            batch_folder = gr.Textbox(label="Folder on the server (under the data root)", scale=3)
            batch_zip = gr.File(label="or a .zip of images", file_types=[".zip"], type="filepath", scale=2)
        batch_button = gr.Button("Predict all", elem_id="batch-predict")
        batch_message = gr.Markdown()
        batch_table = gr.Dataframe(interactive=False, elem_id="batch-table", visible=False)
        batch_csv = gr.DownloadButton("Download predictions (CSV)")
    with gr.Accordion("Export this model", open=False):
        with gr.Row():
            zip_button = gr.Button("Make a model zip (for transformers.pipeline)", elem_id="export-zip")
            onnx_button = gr.Button("Export to ONNX (checked against PyTorch)", elem_id="export-onnx")
        int8_button, int8_force = int8_panel.build_export_controls()
        export_file = gr.File(label="Model zip", interactive=False, elem_id="export-file")
        export_message = gr.Markdown(elem_id="export-message")
        with gr.Row():
            repo_id = gr.Textbox(label="Hub repository (user/name)", scale=2)
            token = gr.Textbox(label="Hugging Face write token", type="password", scale=2)
            private = gr.Checkbox(True, label="private", scale=1)
            push_button = gr.Button("Push to the Hub", scale=1, elem_id="push-button")
        push_message = gr.Markdown(elem_id="push-message")
    def on_predict(run_dir: str | None, images: list | None, k: int, limit: float, flip: bool, engine: str,
                   why: bool) -> tuple:
        return predict_files(ctx, run_dir, images, k, limit, flip, engine, why), model_warning(run_dir)

    def on_drop(run_dir: str | None, uploaded: list | None, k: int, limit: float, flip: bool, engine: str,
                why: bool) -> tuple:
        # A new drop replaces the shown images (the drop zone is emptied for the next one).
        images = [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in (uploaded or []) if f]
        if not images:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        items, warning = on_predict(run_dir, images, k, limit, flip, engine, why)
        return items, warning, images, None

    def on_photo(run_dir: str | None, photo: str | None, k: int, limit: float, flip: bool, engine: str,
                 why: bool) -> tuple:
        if not photo:
            return gr.skip(), gr.skip(), gr.skip()
        items, warning = on_predict(run_dir, [photo], k, limit, flip, engine, why)
        return items, warning, [photo]

    settings = [top_k, threshold, tta, backend, explain]
    files.upload(on_drop, inputs=[run, files, *settings], outputs=[results, weak, shown_images, files])
    webcam.change(on_photo, inputs=[run, webcam, *settings], outputs=[results, weak, shown_images])
    inputs = [run, shown_images, *settings]
    for trigger in (explain.change, backend.change, run.change, top_k.release, threshold.release, tta.change):
        trigger(on_predict, inputs=inputs, outputs=[results, weak])
    def on_batch(*values: Any) -> tuple:
        table, csv_path, text = predict_batch(ctx, *values)
        return gr.update(value=table, visible=table is not None), csv_path, text

    batch_button.click(on_batch,
                       inputs=[run, batch_folder, batch_zip, top_k, threshold, tta],
                       outputs=[batch_table, batch_csv, batch_message])
    zip_button.click(export_zip, inputs=run, outputs=[export_file, export_message])
    push_button.click(push_model, inputs=[run, repo_id, token, private], outputs=push_message)
    onnx_button.click(export_onnx_for_run, inputs=run, outputs=export_message).then(
        int8_panel.update_backend, inputs=[run, backend], outputs=backend)
    int8_panel.wire(run, backend, int8_button, int8_force, export_message)
    refresh.click(lambda current: refresh_runs(ctx, current), inputs=run, outputs=run)
    demo.load(lambda: refresh_runs(ctx, None), outputs=run)
    tab.select(lambda current: refresh_runs(ctx, current), inputs=run, outputs=run)
    return run
