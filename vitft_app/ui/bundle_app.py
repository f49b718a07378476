"""A demo page for one image classifier: drop an image (or use the webcam), see the top classes.

Written by ``vitft demo RUN_DIR --bundle DIR`` as ``DIR/app.py``; it runs on its own with

    pip install -r requirements.txt && python app.py [--host 127.0.0.1] [--port 7860]

(gradio, transformers, torch, pillow; vitft is not needed) and as a Hugging Face Space. vitft's own
``vitft demo RUN_DIR`` serves the same page (:func:`build_page`) with vitft's predictor.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Callable

import gradio as gr
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent

CSS = """
#demo-header h1 {margin-bottom: 0.2em}
#demo-warning {background: #fff4e5; padding: 10px 14px; border-radius: 4px}
#demo-warning p {color: #7a3e00 !important; margin: 0}
#demo-image img, #demo-overlay img {width: 100%; height: 100%; object-fit: contain}
"""

#: Classes shown as bars.
TOP_K = 5

logger = logging.getLogger(__name__)


def build_page(info: dict[str, Any], classify: Callable[[Image.Image], dict[str, float]],
               explain: Callable[[Image.Image], Image.Image | None] | None = None) -> gr.Blocks:
    """The demo page: title and summary line, a weak-model warning when there is one, a large drop
    zone with webcam, top-k bars, an optional attention overlay and the examples to click.

    Args:
        info: ``title``, ``headline``, ``warning`` (or None), ``classes`` and ``examples`` (a list of
            ``{"file": path}``; relative paths are taken from this file's folder).
        classify: RGB image -> ``{class name: probability}``.
        explain: RGB image -> the image with the relevance map blended over it (or None when the
            model has no attention map); None hides the overlay switch.

    Returns:
        The ``gr.Blocks`` page (call ``.launch()``).
    """
    examples = [str(Path(e["file"]) if Path(e["file"]).is_absolute() else HERE / e["file"])
                for e in info.get("examples") or []]
    top_k = max(1, min(TOP_K, len(info.get("classes") or []) or TOP_K))
    blocks_kwargs = {"css": CSS} if int(gr.__version__.split(".")[0]) < 6 else {}

    def run(image: Image.Image | None, show_overlay: bool) -> tuple:
        if image is None:
            return None, gr.update(value=None, visible=False), ""
        rgb = ImageOps.exif_transpose(image).convert("RGB")
        try:
            scores = classify(rgb)
        except Exception as exc:  # noqa: BLE001 - one line on the page instead of a server error
            logger.exception("cannot classify an image")  # the traceback goes to the server log
            return None, gr.update(value=None, visible=False), f"Cannot classify this image: {exc}"
        overlay = explain(rgb) if (show_overlay and explain is not None) else None
        note = "Bars: the model's probability for each of its top classes."
        if show_overlay and explain is not None and overlay is None:
            note += " This model gives no attention map."
        return scores, gr.update(value=overlay, visible=overlay is not None), note

    with gr.Blocks(title=info["title"], **blocks_kwargs) as page:
        gr.Markdown(f"# {info['title']}\n{info['headline']}", elem_id="demo-header")
        if info.get("warning"):
            gr.Markdown(f"**{info['warning']}**", elem_id="demo-warning")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                image = gr.Image(type="pil", sources=["upload", "webcam", "clipboard"], height=400,
                                 label="Drop an image here, click to choose one, or use the webcam",
                                 elem_id="demo-image")
                show_overlay = gr.Checkbox(False, label="Show where the model looks (attention overlay)",
                                           visible=explain is not None, elem_id="demo-overlay-toggle")
                if examples:
                    gr.Examples([[path] for path in examples], inputs=image, label="Examples from the validation"
                                " split: click one", examples_per_page=len(examples), elem_id="demo-examples")
            with gr.Column(scale=2):
                label = gr.Label(num_top_classes=top_k, label="Top classes", elem_id="demo-label")
                overlay = gr.Image(label="Where the model looks (red: most attended patches)", visible=False,
                                   interactive=False, height=320, elem_id="demo-overlay")
                note = gr.Markdown(elem_id="demo-note")
        outputs = [label, overlay, note]
        image.change(run, inputs=[image, show_overlay], outputs=outputs)
        show_overlay.change(run, inputs=[image, show_overlay], outputs=outputs)
    return page


class Classifier:
    """A ``save_pretrained`` image classifier with its processor (plain transformers).

    Args:
        folder: the model folder (``config.json``, ``model.safetensors``, ``preprocessor_config.json``).
    """

    def __init__(self, folder: str | Path):
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.torch = torch
        self.processor = AutoImageProcessor.from_pretrained(folder)
        self.model = AutoModelForImageClassification.from_pretrained(folder, use_safetensors=True).eval()
        config = self.model.config
        self.labels = [config.id2label[i] for i in sorted(config.id2label)]
        self.multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
        patch = getattr(config, "patch_size", None)
        self.patch = patch if isinstance(patch, int) else None

    def pixels(self, image: Image.Image):
        """RGB image -> float32 ``(1, 3, H, W)`` through the model's own processor."""
        return self.processor(images=image, return_tensors="pt")["pixel_values"]

    def classify(self, image: Image.Image) -> dict[str, float]:
        """``{class: probability}``: softmax, or per-label sigmoid for a multi-label model."""
        with self.torch.inference_mode():
            logits = self.model(pixel_values=self.pixels(image)).logits[0].float()
        probs = logits.sigmoid() if self.multi_label else logits.softmax(-1)
        return {label: float(p) for label, p in zip(self.labels, probs)}

    def explain(self, image: Image.Image) -> Image.Image | None:
        """Attention rollout (Abnar & Zuidema 2020) of the CLS token over the patches, blended over
        the image; None when the model is not a ViT-style patch model."""
        import numpy as np

        if self.patch is None or not hasattr(self.model, "set_attn_implementation"):
            return None
        torch = self.torch
        pixels = self.pixels(image)
        previous = self.model.config._attn_implementation
        try:
            self.model.set_attn_implementation("eager")  # SDPA returns no attention weights
            with torch.inference_mode():
                attentions = self.model(pixel_values=pixels, output_attentions=True).attentions
        finally:
            self.model.set_attn_implementation(previous)
        if not attentions:
            return None
        height, width = pixels.shape[-2:]
        rows, cols = height // self.patch, width // self.patch
        rollout = None
        for layer in attentions:
            fused = layer.float().mean(dim=1)
            fused = 0.5 * fused + 0.5 * torch.eye(fused.shape[-1]).expand_as(fused)
            fused = fused / fused.sum(dim=-1, keepdim=True)
            rollout = fused if rollout is None else fused @ rollout
        grid = rollout[0, 0, -rows * cols:].reshape(rows, cols).numpy()
        heat = grid - grid.min()
        heat = heat / heat.max() if heat.max() > 0 else heat
        view = image.resize((width, height))
        small = Image.fromarray((heat * 255).astype(np.uint8), mode="L").resize(view.size, Image.Resampling.BILINEAR)
        h = np.asarray(small, dtype=np.float32) / 255.0
        colour = np.stack([h, 1.0 - np.abs(h - 0.5) * 2, 1.0 - h], axis=-1) * 255
        blended = 0.5 * np.asarray(view, dtype=np.float32) + 0.5 * colour
        return Image.fromarray(blended.clip(0, 255).astype(np.uint8), mode="RGB")


def launch(page: gr.Blocks, host: str | None, port: int | None, allowed: list[str], open_browser: bool = False,
           **kwargs: Any) -> Any:
    """Serves the page (gradio 6 takes the CSS at launch, gradio 5 in ``gr.Blocks``)."""
    if int(gr.__version__.split(".")[0]) >= 6:
        kwargs["css"] = CSS
        kwargs.setdefault("footer_links", [])  # a clean page: no API or settings links
    return page.queue(default_concurrency_limit=2).launch(
        server_name=host, server_port=port, allowed_paths=allowed, inbrowser=open_browser, show_error=False,
        **kwargs)


def main() -> None:
    """``python app.py [--host H] [--port P]``; without flags gradio's defaults (and a Space's
    GRADIO_SERVER_NAME / GRADIO_SERVER_PORT) apply."""
    parser = argparse.ArgumentParser(description="Serve this folder's image classifier demo page.")
    parser.add_argument("--host", default=None, help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860)")
    args = parser.parse_args()
    info = json.loads((HERE / "demo.json").read_text(encoding="utf-8"))
    classifier = Classifier(HERE / "model")
    page = build_page(info, classifier.classify, classifier.explain if classifier.patch else None)
    launch(page, args.host, args.port, [str(HERE / "examples")])


if __name__ == "__main__":
    main()
