"""What the served gradio pages get in their ``<head>`` before gradio's own scripts run: an ASGI
middleware shared by the app (``server.launch``) and the demo page (``demo_page.serve_demo``).
No gradio import: the CLI imports this with ``server``."""

from __future__ import annotations

from typing import Any


async def rewrite_body(app: Any, scope: dict, receive: Any, send: Any, edit: Any) -> None:
    """Runs the ASGI ``app`` and sends its response with the body passed through ``edit``.

    The body is buffered whole (the pages this serves are a few hundred KB) and ``content-length``
    is set to the edited length.

    Args:
        app: the wrapped ASGI application.
        scope, receive, send: the ASGI call.
        edit: ``bytes -> bytes``, applied to the complete body.
    """
    start: dict = {}
    chunks: list[bytes] = []

    async def buffer(message: dict) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                body = edit(b"".join(chunks))
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": body})
        else:
            await send(message)

    await app(scope, receive, buffer)


#: Runs before gradio's frontend modules (:class:`IdleFrameThrottle` puts it first in ``<head>``).
#: gradio 6's status tracker (``statustracker-*.js``) counts a pending event's elapsed seconds in a
#: ``requestAnimationFrame`` loop, and the tracker of the page's loading screen never stops its
#: loop after the app has loaded: an idle page draws 60 frames a second for as long as it is open
#: (about 9% of a CPU core in headless chromium, measured by ``benchmarks/bench_idle_page.py``).
#: The status tracker captures ``window.requestAnimationFrame`` when its module loads, so this
#: wraps it before then: a frame asked for from that module runs from a 100 ms timer instead
#: (the elapsed time it shows has 0.1 s resolution, so it still moves at every tenth), which
#: draws no frame when nothing changed. Every other caller (plotly, transitions) is untouched.
IDLE_FRAME_THROTTLE_JS = b"""<script>
(() => {
  const frame = window.requestAnimationFrame.bind(window);
  const cancel = window.cancelAnimationFrame.bind(window);
  window.requestAnimationFrame = (callback) => {
    if (!String(new Error().stack).includes("statustracker")) return frame(callback);
    return -window.setTimeout(() => callback(performance.now()), 100);
  };
  window.cancelAnimationFrame = (id) => (id < 0 ? window.clearTimeout(-id) : cancel(id));
})();
</script>"""


class IdleFrameThrottle:
    """ASGI middleware: puts :data:`IDLE_FRAME_THROTTLE_JS` first in the ``<head>`` of the app's
    gradio pages (``GET /``), so an open but idle tab stops drawing frames continuously.

    Everything else passes through unchanged, as does a page without a ``<head>`` tag.
    """

    #: The paths that serve gradio's page (the app, and gradio's run-history page).
    PAGES = ("/", "/gradio_api/runs", "/gradio_api/runs/")

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") == "GET" and scope.get("path") in self.PAGES:
            await rewrite_body(self.app, scope, receive, send, self.inject)
        else:
            await self.app(scope, receive, send)

    @staticmethod
    def inject(body: bytes) -> bytes:
        """``body`` with the script right after its first ``<head>`` tag (unchanged without one)."""
        head = body.find(b"<head>")
        if head < 0:
            return body
        cut = head + len(b"<head>")
        return body[:cut] + IDLE_FRAME_THROTTLE_JS + body[cut:]
