"""The Predict tab's int8 pieces: the "Export int8 ONNX" button (checked against fp32 on the run's
validation split) and the backend choice that offers "onnx int8" once the run has one."""

from __future__ import annotations

from typing import Any

import gradio as gr

#: Backend radio choices ``(label, value)``; the int8 one only when the run has ``model_int8.onnx``.
BASE_BACKENDS = [("torch", "torch")]
ONNX_BACKEND = ("onnx", "onnx")
INT8_BACKEND = ("onnx int8", "onnx-int8")


def backend_choices(run_dir: str | None) -> list[tuple[str, str]]:
    """The backends a run can predict with: torch, then onnx and onnx int8 when it was exported
    (a choice that could only answer "no export yet" is not offered)."""
    from ..export import has_onnx
    from ..quantize import has_int8

    return (BASE_BACKENDS + ([ONNX_BACKEND] if run_dir and has_onnx(run_dir) else [])
            + ([INT8_BACKEND] if run_dir and has_int8(run_dir) else []))


def update_backend(run_dir: str | None, current: str | None) -> Any:
    """Radio update for a run: its choices, keeping the current backend when it still applies."""
    choices = backend_choices(run_dir)
    values = [value for _, value in choices]
    return gr.update(choices=choices, value=current if current in values else "torch")


def export_int8_for_run(run_dir: str | None, force: bool) -> str:
    """Runs :func:`~vitft_app.quantize.export_onnx_int8` and returns a Markdown message (never raises)."""
    from ..export import ExportError
    from ..quantize import Int8Refused, export_onnx_int8

    if not run_dir:
        return "Choose a run first."
    try:
        result = export_onnx_int8(run_dir, force=bool(force))
    except Int8Refused as exc:
        return "✗ " + str(exc).replace("\n", "  \n")
    except (ExportError, FileNotFoundError, OSError, ValueError) as exc:
        return f"✗ {exc}"
    kept = "  \n**Kept despite the accuracy drop** (you ticked the box)." if result.check.forced else ""
    return (f"✓ `{result.path}`  \n" + result.check.summary().replace("\n", "  \n") + kept
            + "  \nChoose **onnx int8** as the backend above to predict with it.")


def build_export_controls() -> tuple[gr.Button, gr.Checkbox]:
    """The int8 button and its "keep even if less accurate" box (inside the Export accordion)."""
    with gr.Row():
        button = gr.Button("Export int8 ONNX (checked against fp32 on the validation split)", elem_id="export-int8",
                           scale=3)
        force = gr.Checkbox(False, label="Keep even if less accurate", elem_id="export-int8-force", scale=1,
                            info="by default an int8 model losing more than 1 accuracy point is refused")
    return button, force


def wire(run: gr.Dropdown, backend: gr.Radio, button: gr.Button, force: gr.Checkbox, message: gr.Markdown) -> None:
    """Connects the int8 button and keeps the backend choices in step with the chosen run."""
    button.click(export_int8_for_run, inputs=[run, force], outputs=message).then(
        update_backend, inputs=[run, backend], outputs=backend)
    run.change(update_backend, inputs=[run, backend], outputs=backend)
