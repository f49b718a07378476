"""The stakeholder demo page of one run (``vitft demo RUN_DIR`` and the Runs tab's "Open demo
page"): the bundle's page layout (:func:`vitft_app.ui.bundle_app.build_page`) fed by vitft's
predictor and attention rollout. No training controls."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path
from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from ..demo import DemoSummary, demo_summary
from .bundle_app import build_page, launch
from .page_head import IdleFrameThrottle
from ..explain import explain_image
from ..predict import Predictor
from ..runs import model_dir

logger = logging.getLogger(__name__)


def page_info(summary: DemoSummary) -> dict[str, Any]:
    """The ``info`` dict :func:`build_page` takes, from a :class:`~vitft_app.demo.DemoSummary`."""
    return {"title": summary.title, "headline": summary.headline(), "warning": summary.warning(),
            "classes": summary.classes, "examples": [{"file": path} for path in summary.examples]}


def build_demo_page(run_dir: str | Path, device: str | None = None) -> tuple[gr.Blocks, list[str]]:
    """Builds the demo page of a run.

    Args:
        run_dir: a run folder with a saved model.
        device: force a device; default from the device policy.

    Returns:
        ``(page, allowed file paths)``: the example images the page may serve.

    Raises:
        DemoError: not a run folder, or no saved model.
    """

    summary = demo_summary(run_dir)
    predictor = Predictor(run_dir, device=device, precision="auto")
    lock = threading.Lock()  # one forward at a time: the eager-attention switch is not thread-safe

    def classify(image: Any) -> dict[str, float]:
        with lock:
            return predictor.predict([image], top_k=len(predictor.id2label))[0].as_dict()

    def explain(image: Any) -> Any:
        with lock:
            explanation = explain_image(predictor, image)
        return explanation.overlay if explanation.method == "attention rollout" else None

    has_patches = isinstance(getattr(predictor.model.config, "patch_size", None), int)
    page = build_page(page_info(summary), classify, explain if has_patches else None)
    return page, list(summary.examples)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free on ``host`` now."""
    with socket.socket() as sock:
        sock.bind((host if host not in ("0.0.0.0", "") else "127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_demo(run_dir: str | Path, host: str = "127.0.0.1", port: int | None = None, open_browser: bool = True,
               auth: tuple[str, str] | None = None, device: str | None = None, block: bool = True) -> gr.Blocks:
    """Builds and serves a run's demo page.

    Args:
        run_dir: a run folder with a saved model.
        host, port: where to bind (``port=None``: a free port).
        open_browser: open a browser tab.
        auth: ``(user, password)`` to require, or None.
        device: force a device.
        block: serve until interrupted (the CLI); False returns at once with the server running
            in a thread (the app's Runs tab), stopped with ``page.close()``.

    Returns:
        The served page (``page.server_port`` is its port).

    Raises:
        DemoError: not a run folder, or no saved model.
    """
    page, allowed = build_demo_page(run_dir, device)
    launch(page, host, port if port is not None else free_port(host), allowed, open_browser=open_browser,
           auth=auth, prevent_thread_lock=not block, quiet=not block,
           app_kwargs={"middleware": [Middleware(IdleFrameThrottle)]})
    return page


class DemoServers:
    """The demo pages the app has started, one per run, in this app process (not module state:
    :class:`~vitft_app.ui.app.AppContext` holds one). Keeps the ``limit`` latest running."""

    def __init__(self, host: str = "127.0.0.1", auth: tuple[str, str] | None = None, device: str | None = None,
                 limit: int = 3):
        self.host, self.auth, self.device, self.limit = host, auth, device, limit
        self._pages: dict[tuple, gr.Blocks] = {}
        self._lock = threading.Lock()

    def open(self, run_dir: str | Path) -> int:
        """The port of the run's demo page, started if needed.

        Raises:
            DemoError: not a run folder, or no saved model.
        """
        folder = model_dir(run_dir)
        weights = sorted(folder.glob("*.safetensors")) if folder is not None else []
        # a new best model (the run kept training, or was resumed) gets a fresh page
        key = (str(Path(run_dir).resolve()), tuple(p.stat().st_mtime_ns for p in weights))
        with self._lock:
            page = self._pages.pop(key, None)
            if page is None:
                page = self._start(key[0])
            self._pages[key] = page  # newest last
            while len(self._pages) > self.limit:
                _, oldest = next(iter(self._pages.items()))
                self._pages.pop(next(iter(self._pages)))
                oldest.close()
            return int(page.server_port)

    def _start(self, run_dir: str) -> gr.Blocks:
        """Builds and serves the page in a fresh thread: inside an event handler gradio treats
        new components as updates (a context variable a new thread does not inherit)."""
        result: dict[str, Any] = {}

        def target() -> None:
            try:
                result["page"] = serve_demo(run_dir, self.host, None, open_browser=False, auth=self.auth,
                                            device=self.device, block=False)
            except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread
                result["error"] = exc

        thread = threading.Thread(target=target, name="vitft-demo-start", daemon=True)
        thread.start()
        thread.join()
        if "error" in result:
            raise result["error"]
        return result["page"]

    def close(self) -> None:
        """Stops every demo page."""
        with self._lock:
            for page in self._pages.values():
                page.close()
            self._pages.clear()
