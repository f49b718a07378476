"""Builds the Gradio app: one module per tab, sharing one :class:`AppContext`."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from ..jobs import JobRunner

if TYPE_CHECKING:
    from .demo_page import DemoServers


@dataclass(frozen=True)
class AppSettings:
    """Server-side settings from the command line.

    Attributes:
        data_root: the path box and folder picker accept only folders under this one.
        runs_dir: the runs folder.
        example_dir: the built-in example dataset (always allowed).
        device: force a training and prediction device (tests use ``"cpu"``).
    """

    data_root: Path
    runs_dir: Path
    example_dir: Path
    device: str | None = None
    host: str = "127.0.0.1"
    """The address the app binds (demo pages started from the Runs tab bind the same)."""
    auth: tuple[str, str] | None = None
    """The app's login, required by its demo pages too."""


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
            backend: ``"torch"`` (:class:`~vitft_app.predict.Predictor`) or ``"onnx"``
                (:class:`~vitft_app.export.OnnxPredictor`, needs ``vitft export`` first).
        """
        from ..modeling import resolve_model_path
        from ..predict import Predictor

        folder = Path(resolve_model_path(model_path))
        weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("onnx/*.onnx")) or [folder / "config.json"]
        key = (str(folder), backend, tuple(p.stat().st_mtime_ns for p in weights if p.exists()))
        with self._predictor_lock:
            if key not in self._predictors:
                if backend == "onnx":
                    from ..export import OnnxPredictor

                    self._predictors[key] = OnnxPredictor(folder)
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
    from . import data_tab, evaluate_tab, predict_tab, runs_tab, sweep_tab, train_tab

    from .demo_page import DemoServers

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
            with gr.Tab("Train", id="train"):
                train_tab.build(ctx, data)
            with gr.Tab("Evaluate", id="evaluate") as evaluate:
                evaluate_run = evaluate_tab.build(ctx, demo, evaluate)
            with gr.Tab("Predict", id="predict") as predict:
                predict_run = predict_tab.build(ctx, demo, predict)
            with gr.Tab("Runs", id="runs") as runs:
                runs_tab.build(ctx, demo, runs, tabs, evaluate_run, predict_run)
            with gr.Tab("Sweep", id="sweep") as sweep:
                sweep_tab.build(ctx, demo, sweep, data)
        demo.load(data_tab.scan_folder_outputs_fn(ctx), inputs=data.path, outputs=data.outputs)
    return demo
