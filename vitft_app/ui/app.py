"""Builds the Gradio app: one module per tab, sharing one :class:`AppContext`."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from ..jobs import JobRunner
from . import data_tab, evaluate_tab, predict_tab, runs_tab, sweep_tab, train_tab
from ..confine import check_model_input
from ..modeling import MODEL_CHOICES, resolve_model_path
from ..predict import Predictor
from .demo_page import DemoServers
from .predict_tab import refresh_runs


#: The app's stylesheet (passed to ``launch(css=...)``): hidden helpers, the training progress bar,
#: and disabled buttons that look disabled (Gradio's default only fades a coloured button a little:
#: a disabled red Stop looked more clickable than an enabled grey Resume).
APP_CSS = """
.vitft-hidden {display: none !important}
button:disabled, button[disabled] {opacity: 0.35 !important; filter: grayscale(1); cursor: not-allowed}
.vitft-progress {position: relative; height: 2.2em; border-radius: 6px; background: #e5e7eb; overflow: hidden;
  margin: 4px 0}
.vitft-progress > div {height: 100%; background: #60a5fa; transition: width 0.5s}
.vitft-progress-completed > div {background: #4ade80}
.vitft-progress-stopped > div, .vitft-progress-interrupted > div {background: #fbbf24}
.vitft-progress-failed > div {background: #f87171}
.vitft-progress > span {position: absolute; inset: 0; display: flex; align-items: center; justify-content: center;
  font-weight: 600; color: #111827}
"""


@dataclass(frozen=True)
class AppSettings:
    """Server-side settings from the command line.

    Attributes:
        data_root: where relative paths start, the folder browser's root and the parent of
            ``uploads/``; when ``confined``, paths typed in the app must lie under it.
        runs_dir: the runs folder.
        example_dir: the built-in example dataset (always allowed).
        device: force a training and prediction device (tests use ``"cpu"``).
        confined: the data-root rule (:func:`vitft_app.confine.is_confined`): True unless the app
            is bound to loopback without ``--auth`` and without ``--data-root``.
        uploads_quota_bytes: the most the ``uploads/`` folder may hold; an upload that would
            exceed it is refused (``--uploads-quota-mb``).
    """

    data_root: Path
    runs_dir: Path
    example_dir: Path
    device: str | None = None
    confined: bool = True
    uploads_quota_bytes: int = 20 * 1024**3
    host: str = "127.0.0.1"
    """The address the app binds (demo pages started from the Runs tab bind the same)."""
    auth: tuple[str, str] | None = None
    """The app's login, required by its demo pages too."""

    @property
    def uploads_dir(self) -> Path:
        """``<data root>/uploads``: where zips and folders uploaded in the browser land."""
        return Path(self.data_root) / "uploads"

    def check_model(self, text: str) -> str:
        """A model typed in the app: a Hub id, or a folder under the data root or the runs folder
        when confined (:func:`vitft_app.confine.check_model_input`).

        Raises:
            PathNotAllowed: see there.
        """

        if (text or "").strip() in MODEL_CHOICES:
            return text.strip()
        return check_model_input(text, Path(self.data_root), Path(self.runs_dir), self.confined)


@dataclass
class AppContext:
    """What every tab shares inside one app process: settings, the job runner, loaded predictors.

    Created by :func:`build_app`, never at module level, so two apps in one process (tests)
    do not share state.
    """

    settings: AppSettings
    runner: JobRunner
    demo_servers: "DemoServers | None" = None
    """Demo pages started from the Runs tab (one port each; see :mod:`vitft_app.ui.demo_page`)."""
    _predictors: OrderedDict = field(default_factory=OrderedDict)
    _predictor_lock: threading.Lock = field(default_factory=threading.Lock)

    def predictor(self, model_path: str, backend: str = "torch"):
        """A cached prediction backend for a run or model folder, reloaded when the saved model
        changes (a running job replaces ``model/`` when validation improves). Keeps the two latest.

        Args:
            model_path: a run folder or a ``save_pretrained`` folder.
            backend: ``"torch"`` (:class:`~vitft_app.predict.Predictor`), ``"onnx"`` or ``"onnx-int8"``
                (:class:`~vitft_app.export.OnnxPredictor` on ``model.onnx`` / ``model_int8.onnx``, needs
                ``vitft export`` first).
        """

        folder = Path(resolve_model_path(model_path))
        weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("onnx/*.onnx")) or [folder / "config.json"]
        key = (str(folder), backend, tuple(p.stat().st_mtime_ns for p in weights if p.exists()))
        with self._predictor_lock:
            if key not in self._predictors:
                if backend in ("onnx", "onnx-int8"):
                    from ..export import ONNX_FILE_NAME, OnnxPredictor
                    from ..quantize import INT8_FILE_NAME

                    name = INT8_FILE_NAME if backend == "onnx-int8" else ONNX_FILE_NAME
                    self._predictors[key] = OnnxPredictor(folder, file_name=name)
                else:
                    # auto: bf16 autocast where the hardware has it (about 4x faster on an AVX512-BF16
                    # CPU, same top-1 as fp32 in benchmarks/bench_predict.py), else fp32.
                    self._predictors[key] = Predictor(folder, device=self.settings.device, precision="auto")
                while len(self._predictors) > 2:
                    self._predictors.popitem(last=False)
            return self._predictors[key]


def build_app(settings: AppSettings) -> gr.Blocks:
    """Builds the vitft UI.

    Args:
        settings: data root, runs folder and example dataset.

    Returns:
        The ``gr.Blocks`` app (call ``.launch()``).
    """

    ctx = AppContext(settings=settings, runner=JobRunner(settings.runs_dir, device=settings.device, launch_multi_gpu=True),
                     demo_servers=DemoServers(host=settings.host, auth=settings.auth, device=settings.device))
    with gr.Blocks(title="vitft: fine-tune a Vision Transformer") as demo:
        gr.Markdown(
            "# vitft\nFine-tune a Vision Transformer on a folder of images: **Data** → **Train** → **Evaluate** → **Predict**."
            " **Runs** lists and compares every run; **Sweep** searches hyperparameters."
        )
        with gr.Tabs() as tabs:
            with gr.Tab("Data", id="data"):
                data = data_tab.build(ctx)
            with gr.Tab("Train", id="train") as train_page:
                train = train_tab.build(ctx, data)
            # Opening the tab redraws the live view (its components may mount after earlier ticks).
            train_page.select(lambda: None, outputs=train.signature)
            with gr.Tab("Evaluate", id="evaluate") as evaluate:
                evaluate_run = evaluate_tab.build(ctx, demo, evaluate)
            with gr.Tab("Predict", id="predict") as predict:
                predict_run = predict_tab.build(ctx, demo, predict)
            with gr.Tab("Runs", id="runs") as runs:
                runs_tab.build(ctx, demo, runs, tabs, evaluate_run, predict_run)
            with gr.Tab("Sweep", id="sweep") as sweep:
                sweep_tab.build(ctx, demo, sweep, data)
        # A new page shows the chosen dataset (saved server-side), scanned.
        demo.load(data_tab.load_outputs_fn(ctx), outputs=[data.path, *data.outputs])
        demo.load(train.on_load, outputs=train.load_outputs)
        # After a run: "Evaluate this run" and "Try it" open those tabs with the run selected.
        for button, target, dropdown in ((train.evaluate_button, "evaluate", evaluate_run),
                                         (train.try_button, "predict", predict_run)):
            switched = button.click(lambda run: refresh_runs(ctx, train_tab.shown_run(ctx, run)), inputs=train.run,
                                    outputs=dropdown).then(lambda target=target: gr.Tabs(selected=target), outputs=tabs)
            if target == "evaluate":  # and evaluate it at once: the tab opens with the plain headline
                switched.then(None, js="() => setTimeout(() => document.querySelector('#evaluate-button')?.click(), 300)")
    return demo
