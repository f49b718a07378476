"""CPU an open app tab costs, with and without ``vitft_app.ui.page_head.IdleFrameThrottle``.

gradio 6's loading-screen status tracker keeps a ``requestAnimationFrame`` loop running after
the app has loaded, so an idle page draws 60 frames a second. The app's pages carry a script
(``ui.page_head.IDLE_FRAME_THROTTLE_JS``) that runs that module's frames from a 100 ms timer. This
script starts the app once, opens it in Debian's chromium (headless, 1400x900) and measures, in
alternating windows, the CPU seconds all chromium processes use while the page sits idle:

* ``throttled``: the page as the app serves it;
* ``stock``: the same page with the script cut out (Playwright rewrites the response), i.e.
  gradio's own behaviour.

Each window opens a fresh page, waits for the Data tab's example scan, measures ``--seconds`` on
the Data tab, then switches to the Train tab (its 1 s status poll running) and measures again.
With ``--train`` a ``vitft train`` process (vit-tiny-scratch on the built-in example digits)
runs in the background the whole time and the optimizer steps it makes in each Train-tab window
are counted from its ``status.json``: the training speed beside an open tab.

Usage (from the repository root; run alone, the numbers are CPU time of a shared machine)::

    python benchmarks/bench_idle_page.py                  # 2 rounds x 30 s windows
    python benchmarks/bench_idle_page.py --train --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CHROMIUM = os.environ.get("VITFT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_cpu_s() -> float:
    """User + system CPU seconds used so far by every running chromium process (``/proc``)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if b"chrom" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(port: int, process: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            sys.exit(f"the app exited:\n{log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"the app did not answer within {timeout_s:.0f} s")


def steps_of(output_dir: Path | None) -> int | None:
    """The ``step`` in the ``status.json`` of the run under ``output_dir`` (None before it exists)."""
    if output_dir is None:
        return None
    for status in output_dir.glob("*/status.json"):
        try:
            return int(json.loads(status.read_text()).get("step", 0))
        except (OSError, ValueError):
            return None
    return None


def measure(page, url: str, stock: bool, seconds: float, run_dir: Path | None) -> dict[str, float]:
    """One window pair (Data tab, Train tab) on a fresh page; CPU seconds per ``seconds``."""
    from playwright.sync_api import expect

    from vitft_app.ui.page_head import IDLE_FRAME_THROTTLE_JS

    if stock:
        def strip(route) -> None:
            response = route.fetch()
            body = response.body().replace(IDLE_FRAME_THROTTLE_JS, b"")
            route.fulfill(response=response, body=body)

        page.route(url + "/", strip)
    page.goto(url + "/")
    expect(page.locator("#data-summary")).to_contain_text("classes", timeout=120_000)
    served = page.evaluate("() => document.head.innerHTML.includes('-window.setTimeout')")
    assert served != stock, "the page does not carry the script the window expects"
    page.wait_for_timeout(3000)
    out = {}
    before = chromium_cpu_s()
    page.wait_for_timeout(seconds * 1000)
    out["data_tab_cpu_s"] = chromium_cpu_s() - before
    page.get_by_role("tab", name="Train").click()
    page.wait_for_timeout(3000)
    before, steps = chromium_cpu_s(), steps_of(run_dir)
    page.wait_for_timeout(seconds * 1000)
    out["train_tab_cpu_s"] = chromium_cpu_s() - before
    after = steps_of(run_dir)
    if steps is not None and after is not None:
        out["train_steps_per_s"] = (after - steps) / seconds
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="alternations of throttled/stock (default 2)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each measured window (default 30)")
    parser.add_argument("--train", action="store_true", help="train in the background and count its steps")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="bench-idle-page-"))
    env = {**os.environ, "VITFT_HOME": str(tmp / "home"), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    port = free_port()
    log = tmp / "app.log"
    processes: list[subprocess.Popen] = []
    try:
        with open(log, "w") as out:
            processes.append(subprocess.Popen(
                [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--runs-dir", str(tmp / "runs"),
                 "--no-browser"], cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT))
        wait_for(port, processes[0], log)
        url = f"http://127.0.0.1:{port}"
        run_dir = None
        if args.train:
            from vitft_app.data import ensure_example_dataset

            digits = ensure_example_dataset(tmp / "home")
            run_dir = tmp / "background"
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "vitft_app.cli", "train", "--data", str(digits), "--model", "vit-tiny-scratch",
                 "--epochs", "1000", "--output-dir", str(run_dir)], cwd=tmp, env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            deadline = time.time() + 300
            while (steps_of(run_dir) or 0) < 5 and time.time() < deadline:
                time.sleep(1)
        results: dict[str, list[dict[str, float]]] = {"throttled": [], "stock": []}
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                for round_ in range(args.rounds):
                    for mode in ("throttled", "stock"):
                        page = browser.new_page(viewport={"width": 1400, "height": 900})
                        try:
                            row = measure(page, url, mode == "stock", args.seconds, run_dir)
                        finally:
                            page.close()
                        results[mode].append(row)
                        print(f"round {round_ + 1} {mode:9s} " + "  ".join(f"{k} {v:.2f}" for k, v in row.items()),
                              flush=True)
            finally:
                browser.close()
    finally:
        for process in processes:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nchromium CPU seconds per {args.seconds:.0f} s with the page open (median of {args.rounds}):")
    print("| window | stock gradio | throttled | ratio |")
    print("|---|---:|---:|---:|")
    for key in results["stock"][0]:
        stock = statistics.median(r[key] for r in results["stock"])
        throttled = statistics.median(r[key] for r in results["throttled"])
        ratio = stock / throttled if throttled else float("inf")
        print(f"| {key} | {stock:.2f} | {throttled:.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
