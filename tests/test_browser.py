"""Real browser: Playwright drives Debian's chromium against the app started on a free port."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests_helpers import CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, tiny_vit):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's chromium (see README, .ci/run)")
    tmp = tmp_path_factory.mktemp("browser")
    (tmp / "data").mkdir()
    # --data-root confines model folders typed in the app too (issue 13): the model lives there.
    tiny_vit = Path(shutil.copytree(tiny_vit, tmp / "data" / "tiny-vit"))
    port = free_port()
    env = {**os.environ, "VITFT_HOME": str(tmp / "home"), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(tmp / "app.log", "w")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--data-root", str(tmp / "data"),
         "--runs-dir", str(tmp / "runs"), "--no-browser"],
        cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"app exited: {(tmp / 'app.log').read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("app did not start within 180 s")
    yield url, tiny_vit, tmp / "home"
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture
def page(request):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
        )
        page = browser.new_page(viewport={"width": 1300, "height": 1500})
        page.set_default_timeout(30_000)
        yield page
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
        browser.close()


def choose_model(page, name: str) -> None:
    box = page.locator("#model-choice input")
    box.click()
    box.fill(name)
    box.press("Enter")


def open_app(page, url: str) -> None:
    """Opens the app and waits for the example dataset's scan (10 digit classes); the chosen
    dataset is saved server-side, so a test that chose another one is undone here."""
    from playwright.sync_api import expect

    page.goto(url)
    expect(page.locator("#data-summary")).to_contain_text("classes", timeout=120_000)
    if "10 classes" not in page.locator("#data-summary").inner_text():
        page.locator("#example-button").click()
    expect(page.locator("#data-summary")).to_contain_text("10 classes", timeout=120_000)


def start_tiny_run(page, tiny_vit, epochs: int) -> None:
    """Train tab: choose the tiny model, set the epochs, press Start and see it accepted."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Train").click()
    choose_model(page, str(tiny_vit))
    expect(page.locator("#param-count")).to_contain_text("2 encoder blocks", timeout=120_000)
    page.locator("#epochs input").fill(str(epochs))
    page.locator("#start-button").click()
    expect(page.locator("#train-message")).to_contain_text("Started run", timeout=120_000)


def test_train_on_the_example_then_predict(app_url, page):
    from playwright.sync_api import expect

    url, tiny_vit, home = app_url
    open_app(page, url)  # Data tab: the built-in example is scanned on load
    expect(page.locator("#class-table")).to_contain_text("500")

    # Train tab: a tiny model for one epoch.
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#param-count")).to_contain_text("4 stages", timeout=120_000)  # pvt-v2-b0-scratch, the offline default (a hierarchical model)
    choose_model(page, "google/vit-base-patch16-224")  # not cached, Hub unreachable
    expect(page.locator("#param-count")).to_contain_text("cannot be reached", timeout=120_000)
    expect(page.locator("#param-count")).to_contain_text("vit-tiny-scratch")
    start_tiny_run(page, tiny_vit, epochs=1)
    expect(page.locator("#train-status")).to_contain_text("completed", timeout=300_000)
    expect(page.locator("#train-status")).to_contain_text("best val accuracy")
    page.wait_for_function(
        "() => document.querySelectorAll('#loss-plot .scatterlayer .point').length > 0", timeout=30_000
    )

    # Predict tab: the new run is chosen, an uploaded digit gets a label.
    page.get_by_role("tab", name="Predict").click()
    expect(page.locator("#predict-run input")).to_have_value(re.compile("tiny-vit"), timeout=120_000)
    example = sorted((home / "datasets" / "mnist-digits" / "7").glob("*.png"))[0]
    page.locator("#predict-files input[type=file]").set_input_files(str(example))
    label = page.locator(".predict-label").first
    expect(label).to_be_visible(timeout=60_000)
    expect(label).to_contain_text(re.compile(r"\b[0-9]\b"))
    expect(label).to_contain_text("%")
    page.locator("#predict-explain input").check()
    expect(page.locator(".predict-explanation").first).to_be_visible(timeout=60_000)
    expect(page.locator(".predict-explanation").first).to_contain_text("attention rollout")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "predict-tab.png"), full_page=True)


def test_busy_and_stop_in_the_browser(app_url, page):
    from playwright.sync_api import expect

    url, tiny_vit, _ = app_url
    open_app(page, url)
    start_tiny_run(page, tiny_vit, epochs=100)
    expect(page.locator("#train-status")).to_contain_text("running", timeout=60_000)
    start, stop, resume = (page.locator(f"#{name}-button") for name in ("start", "stop", "resume"))
    # While it trains only Stop is on (a second Start could only answer "Busy").
    expect(start).to_be_disabled(timeout=60_000)
    expect(stop).to_be_enabled()
    expect(resume).to_be_disabled()
    stop.click()
    # "Stopping…" shows until the run has stopped; the next poll clears it, so a run that stops
    # within a poll may be seen stopped directly.
    page.wait_for_function(
        "() => (document.querySelector('#train-message')?.innerText || '').includes('Stopping')"
        " || (document.querySelector('#train-status')?.innerText || '').includes('stopped')", timeout=120_000)
    expect(page.locator("#train-status")).to_contain_text("stopped", timeout=60_000)
    expect(start).to_be_enabled(timeout=60_000)
    expect(stop).to_be_disabled()
    expect(resume).to_be_enabled()
    # Resume continues the same run from its checkpoint; stop it again.
    page.locator("#resume-button").click()
    expect(page.locator("#train-message")).to_contain_text("Resumed run", timeout=60_000)
    expect(page.locator("#train-status")).to_contain_text("running", timeout=60_000)
    page.locator("#stop-button").click()
    expect(page.locator("#train-status")).to_contain_text("stopped", timeout=60_000)


def test_presets_and_augmentation_preview_in_the_browser(app_url, page):
    from playwright.sync_api import expect

    url, _, _ = app_url
    open_app(page, url)
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#param-count")).to_contain_text("4 stages", timeout=120_000)  # pvt-v2-b0-scratch
    page.locator("#preset-best").click()
    expect(page.locator("#train-message")).to_contain_text("Preset best", timeout=120_000)
    expect(page.locator("#augment input")).to_have_value("randaugment")
    expect(page.locator("#epochs input")).to_have_value("20")
    page.get_by_text("Augmentation and regularization").click()
    expect(page.locator("#mixup input")).to_have_value("0.8")
    page.locator("#preview-button").click()
    expect(page.locator("#preview-message")).to_contain_text("augmented versions", timeout=60_000)
    page.wait_for_function("() => document.querySelectorAll('#augment-preview img').length >= 8", timeout=120_000)
    expect(page.locator("#augment-summary")).to_contain_text("RandAugment", timeout=120_000)
    page.locator("#preset-quick").click()
    expect(page.locator("#augment input")).to_have_value("none", timeout=120_000)
    expect(page.locator("#train-message")).to_contain_text("smoke test")
    # The preset changed the freeze depth and the augmentation: their summaries follow.
    expect(page.locator("#param-count")).to_contain_text("linear probe", timeout=120_000)
    expect(page.locator("#augment-summary")).to_contain_text("only resized")


def test_upload_a_folder_and_a_zip(app_url, page, tmp_path):
    import zipfile

    from PIL import Image
    from playwright.sync_api import expect

    url, _, _ = app_url
    folder = tmp_path / "pets"
    for n, name in enumerate(("cat", "dog")):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 12), (n * 120, i * 60, 30)).save(folder / name / f"{i}.png")
    open_app(page, url)
    page.get_by_text("Upload a dataset").click()
    page.locator("#folder-upload input[type=file]").set_input_files(str(folder))
    expect(page.locator("#upload-message")).to_contain_text("Copied 6 files", timeout=60_000)
    expect(page.locator("#data-summary")).to_contain_text("2 classes", timeout=60_000)
    expect(page.locator("#class-table")).to_contain_text("cat")

    archive = tmp_path / "birds.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for name in ("owl", "tit", "wren"):
            for i in range(2):
                zipped.write(folder / "cat" / f"{i}.png", f"birds/{name}/{i}.png")
    page.locator("#zip-upload input[type=file]").set_input_files(str(archive))
    expect(page.locator("#upload-message")).to_contain_text("Extracted", timeout=60_000)
    expect(page.locator("#data-summary")).to_contain_text("3 classes", timeout=60_000)
    expect(page.locator("#data-problems")).to_contain_text("duplicate")  # the same picture in three classes


def test_evaluate_tab_in_the_browser(app_url, page):
    from playwright.sync_api import expect

    url, tiny_vit, _ = app_url
    open_app(page, url)
    start_tiny_run(page, tiny_vit, epochs=1)
    expect(page.locator("#train-status")).to_contain_text("completed", timeout=300_000)
    page.get_by_role("tab", name="Evaluate").click()
    expect(page.locator("#eval-run input")).to_have_value(re.compile("tiny-vit"), timeout=120_000)
    page.locator("#evaluate-button").click()
    expect(page.locator("#eval-summary")).to_contain_text("macro precision", timeout=120_000)
    expect(page.locator("#eval-per-class")).to_contain_text("support")
    # Click the first count of the confusion matrix (true "0", predicted "0").
    page.locator("#eval-matrix [role=gridcell]").nth(1).click()
    expect(page.locator("#eval-cell-caption")).to_contain_text("true 0, predicted 0", timeout=120_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "evaluate-tab.png"), full_page=True)


def test_the_newcomer_path_at_1400x900(app_url, page, digits_root):
    """Open, pick a dataset folder outside the home folder, Train (the dataset is shown), Start:
    the status counts steps and the loss plot has a point within 5 s of the first optimizer step;
    Stop, Resume, reload mid-run (same dataset, live run), Evaluate's plain headline with its
    baseline, Predict's results under the drop zone. A screenshot of each state."""
    import json
    import shutil

    from playwright.sync_api import expect

    url, tiny_vit, home = app_url
    page.set_viewport_size({"width": 1400, "height": 900})
    ARTIFACTS.mkdir(exist_ok=True)

    def shot(name: str) -> None:
        page.screenshot(path=str(ARTIFACTS / f"newcomer-{name}.png"))

    # A small unbalanced dataset in the data root (a temp folder, outside the home folder).
    dataset = home.parent / "data" / "threes-and-sevens"
    for name, count in (("three", 30), ("seven", 45)):
        (dataset / name).mkdir(parents=True, exist_ok=True)
        for path in sorted((digits_root / ("3" if name == "three" else "7")).iterdir())[:count]:
            shutil.copy(path, dataset / name / path.name)
    runs = home.parent / "runs"
    before = {p.name for p in runs.iterdir()} if runs.exists() else set()
    try:
        open_app(page, url)
        page.locator("#data-path textarea, #data-path input").first.fill(str(dataset))
        page.locator("#scan-button").click()
        expect(page.locator("#data-summary")).to_contain_text("2 classes", timeout=60_000)
        shot("1-data")

        page.get_by_role("tab", name="Train").click()
        line = page.locator("#train-dataset")
        expect(line).to_contain_text("threes-and-sevens")
        expect(line).to_contain_text("2 classes")
        expect(line).to_contain_text("60 train / 15 val images")
        expect(page.locator("#augment input")).to_have_value("none")  # small grayscale digits: no flips
        choose_model(page, str(tiny_vit))
        expect(page.locator("#param-count")).to_contain_text("2 encoder blocks", timeout=120_000)
        page.locator("#epochs input").fill("2000")
        page.locator("#batch-size input").fill("4")
        expect(page.locator("#train-status")).to_contain_text(re.compile(r"No run yet|run \d{8}-"), timeout=20_000)
        shot("2-train-form")
        page.locator("#start-button").click()
        expect(page.locator("#train-message")).to_contain_text("Started run", timeout=60_000)
        run_dir = next(runs / n for n in {p.name for p in runs.iterdir() if p.is_dir()} - before)

        # The first optimizer step, seen in the run folder; the page must show it within 5 s.
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if json.loads((run_dir / "status.json").read_text()).get("step", 0) >= 1:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        first_step = time.time()
        # The new run's own step count (not the status of an earlier run the page showed before Start).
        expect(page.locator("#train-status")).to_contain_text(
            re.compile(re.escape(run_dir.name) + r".*step [1-9]\d*/\d+|step [1-9]\d*/\d+.*" + re.escape(run_dir.name)),
            timeout=5_000)
        page.wait_for_function(
            "() => document.querySelectorAll('#loss-plot .scatterlayer .point').length > 0", timeout=5_000)
        assert time.time() - first_step <= 5.5
        expect(page.locator("#train-progress")).to_contain_text("steps")
        box = page.locator("#train-status").bounding_box()
        assert box is not None and 0 <= box["y"] < 900, box  # scrolled into view on Start
        shot("3-running")

        page.locator("#stop-button").click()
        status = page.locator("#train-status")
        expect(status).to_contain_text(re.compile(r"stopped after step (\d+) of \d+, epoch"), timeout=60_000)
        stopped_at = int(re.search(r"after step (\d+)", status.inner_text()).group(1))
        expect(page.locator("#train-message")).not_to_contain_text("Stopping", timeout=10_000)
        shot("4-stopped")

        page.locator("#resume-button").click()
        expect(page.locator("#train-message")).to_contain_text("Resumed run", timeout=60_000)
        expect(status).to_contain_text("running", timeout=60_000)
        shown = int(re.search(r"step (\d+)/", status.inner_text()).group(1))
        assert shown >= stopped_at  # continues from the checkpoint's step, never "step 0"
        shot("5-resumed")

        page.reload()
        page.get_by_role("tab", name="Train").click()
        expect(page.locator("#train-dataset")).to_contain_text("threes-and-sevens", timeout=60_000)
        expect(page.locator("#data-path textarea, #data-path input").first).to_have_value(str(dataset))
        expect(status).to_contain_text("running", timeout=60_000)
        expect(status).to_contain_text(run_dir.name)
        expect(page.locator("#train-banner")).to_contain_text("Training")
        expect(page.locator("#epochs input")).to_have_value("2000")  # the running job's settings, not defaults
        shot("6-reloaded")

        page.locator("#stop-button").click()
        expect(status).to_contain_text("stopped", timeout=60_000)
        page.locator("#evaluate-this-run").click()  # switches to Evaluate, the run selected, and evaluates it
        expect(page.locator("#eval-run input")).to_have_value(re.compile(run_dir.name), timeout=120_000)
        summary = page.locator("#eval-summary")
        expect(summary).to_contain_text(re.compile(r"\d+ of 15 validation images right \(\d+\.\d%\)"),
                                        timeout=120_000)
        expect(summary).to_contain_text("always guessing 'seven' gets 60.0%")  # 9 of the 15 val images
        shot("7-evaluate")

        page.get_by_role("tab", name="Train").click()
        page.locator("#try-this-run").click()
        expect(page.locator("#predict-run input")).to_have_value(re.compile(run_dir.name), timeout=120_000)
        page.locator("#predict-files input[type=file]").set_input_files(str(sorted((dataset / "seven").iterdir())[0]))
        result = page.locator(".predict-label").first
        expect(result).to_be_visible(timeout=60_000)
        drop_zone = page.locator("#predict-files").bounding_box()
        batch = page.get_by_text("Batch prediction: a folder or a zip of images").bounding_box()
        assert drop_zone["y"] < result.bounding_box()["y"] < batch["y"]  # right under the drop zone
        page.locator("#predict-files input[type=file]").set_input_files(str(sorted((dataset / "three").iterdir())[0]))
        expect(page.locator(".predict-label")).to_have_count(1, timeout=120_000)  # a new drop replaces the old
        result.scroll_into_view_if_needed()
        shot("8-predict")
    finally:
        # The app process owns the job: stop it from the page (Stop is off when nothing runs).
        page.get_by_role("tab", name="Train").click()
        if page.locator("#stop-button").is_enabled():
            page.locator("#stop-button").click()
        expect(page.locator("#train-status")).not_to_contain_text("running", timeout=60_000)
        shutil.rmtree(dataset, ignore_errors=True)


#: Counts, in the page, the animation frames that gradio's status tracker module asks the
#: browser for (installed before any page script, so it sits under the app's own wrapper).
COUNT_TRACKER_FRAMES_JS = """
window.__trackerFrames = 0;
const browserFrame = window.requestAnimationFrame.bind(window);
window.requestAnimationFrame = (callback) => {
  if (String(new Error().stack).includes("statustracker")) window.__trackerFrames += 1;
  return browserFrame(callback);
};
"""


def test_an_idle_page_draws_no_frames_for_the_status_tracker(app_url, page):
    """gradio 6's loading-screen status tracker keeps a requestAnimationFrame loop running after
    the app has loaded: about 180 frames in 3 s of an idle page (9% of a core in chromium).
    ``page_head.IdleFrameThrottle`` runs that module's frames from a 100 ms timer, so none reach the
    browser, while a pending event's elapsed time still counts up (tested below in the page)."""
    url, _, _ = app_url
    page.add_init_script(COUNT_TRACKER_FRAMES_JS)
    open_app(page, url)
    page.evaluate("window.__trackerFrames = 0")
    page.wait_for_timeout(3000)
    assert page.evaluate("window.__trackerFrames") == 0
    # The status tracker's loop itself still runs, from the timer: a loop in a script named like
    # that module gets its callbacks about every 100 ms (a frame would come every ~16 ms).
    gaps = page.evaluate("""() => new Promise((done) => eval(`
      const times = [];
      const ask = () => requestAnimationFrame((t) => { times.push(t); times.length < 5 ? ask() : done(times); });
      ask();
      //# sourceURL=statustracker-loop-test.js
    `)).then((times) => times.slice(1).map((t, i) => t - times[i]))""")
    assert len(gaps) == 4 and min(gaps) >= 90, gaps
