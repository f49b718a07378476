"""The demo page of a run: summary with its baseline, the weak-model warning, the standalone bundle
(runs without vitft), the CLI, the Runs tab's button, and both pages in a real browser."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from tests_helpers import CHROMIUM, CHROMIUM_ARGS

from vitft_app.demo import DemoError, DemoSummary, demo_summary, majority_baseline, write_bundle

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"


def _train(tmp: Path, data: Path, model: Path, lr: float, epochs: int) -> Path:
    from vitft_app.config import TrainConfig
    from vitft_app.runs import RunRecorder, RunStore
    from vitft_app.training import train

    config = TrainConfig(data_dir=str(data), model=str(model), epochs=epochs, batch_size=16, lr=lr, augment="none",
                         precision="fp32", output_dir=str(tmp / "runs"))
    run_dir = RunStore(config.output_dir).create_run(config)
    train(config, run_dir, RunRecorder(run_dir), device="cpu")
    return run_dir


@pytest.fixture(scope="module")
def strong_run(tmp_path_factory, colors_root, tiny_vit) -> Path:
    """The tiny ViT on the colour squares: 100% validation accuracy after 2 epochs at lr 3e-3."""
    return _train(tmp_path_factory.mktemp("strong"), colors_root, tiny_vit, 3e-3, 2)


@pytest.fixture(scope="module")
def weak_run(tmp_path_factory, digits_root, tiny_vit) -> Path:
    """Digits with one class twice as large, trained at lr 1e-9: stays at the majority baseline."""
    tmp = tmp_path_factory.mktemp("weak")
    data = tmp / "digits"
    for digit, count in (("0", 40), ("1", 20), ("7", 20)):
        (data / digit).mkdir(parents=True)
        for path in sorted((digits_root / digit).iterdir())[:count]:
            shutil.copy(path, data / digit / path.name)
    return _train(tmp, data, tiny_vit, 1e-9, 1)


def test_majority_baseline_counts_the_split():
    assert majority_baseline(["a", "b", "b", "c"]) == ("b", 0.5)
    assert majority_baseline(["b", "a"]) == ("a", 0.5)  # ties: the first class in sorted order
    assert majority_baseline([]) == (None, None)


def test_summary_baseline_comes_from_the_validation_split(weak_run):
    from vitft_app.config import TrainConfig
    from vitft_app.data import scan_dataset

    config = TrainConfig.from_json_file(weak_run / "config.json")
    report = scan_dataset(config.data_dir, val_fraction=config.val_fraction, seed=config.seed)
    counts = Counter(report.classes[item.label] for item in report.val)
    top, count = counts.most_common(1)[0]

    summary = demo_summary(weak_run)
    assert summary.num_val == len(report.val)
    assert summary.majority_class == top == "0"
    assert summary.baseline == pytest.approx(count / len(report.val))
    assert summary.classes == ["0", "1", "7"]
    status = json.loads((weak_run / "status.json").read_text())
    assert summary.val_accuracy == pytest.approx(status["best_val_accuracy"])
    assert summary.weak
    assert f"always guessing '0' gets {summary.baseline:.1%}" in summary.headline()
    assert summary.warning().startswith("Weak model:")
    # examples: validation images, spread over the classes
    val_paths = {item.path for item in report.val}
    assert summary.examples and set(summary.examples) <= val_paths
    assert set(summary.example_labels) == {"0", "1", "7"}


def test_strong_model_has_no_warning(strong_run):
    summary = demo_summary(strong_run)
    assert summary.val_accuracy >= summary.baseline + 0.05 and not summary.weak and summary.warning() is None
    assert "Validation accuracy" in summary.headline() and "always guessing" in summary.headline()


def test_weak_rule_and_missing_numbers():
    def make(acc, base):
        return DemoSummary("t", ["a", "b", "c", "d"], acc, base, "a" if base else None, 10)

    assert make(0.56, 0.54).weak and not make(0.86, 0.54).weak
    assert make(0.28, None).weak and "chance" in make(0.28, None).warning()  # chance 25%
    assert make(None, 0.5).weak and "no validation accuracy" in make(None, 0.5).warning()


def test_not_a_run_or_no_model(tmp_path, strong_run):
    with pytest.raises(DemoError, match="Not a run folder"):
        demo_summary(tmp_path)
    bare = tmp_path / "bare"
    shutil.copytree(strong_run, bare, ignore=shutil.ignore_patterns("model", ".model.old", "checkpoint*"))
    with pytest.raises(DemoError, match="No saved model"):
        demo_summary(bare)


def test_bundle_is_self_contained(tmp_path, weak_run):
    out = write_bundle(weak_run, tmp_path / "bundle")
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"app.py", "requirements.txt", "README.md", "demo.json", "model/config.json", "model/model.safetensors",
            "model/preprocessor_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    examples = [n for n in names if n.startswith("examples/")]
    assert len(examples) == len(demo_summary(weak_run).examples)
    readme = (out / "README.md").read_text()
    head = readme.split("---")[1]
    assert "sdk: gradio" in head and "app_file: app.py" in head
    assert "pip install -r requirements.txt && python app.py" in readme
    assert str(weak_run.parent.parent) not in readme  # no local paths
    requirements = (out / "requirements.txt").read_text().split()
    assert {r.split(">=")[0] for r in requirements} >= {"torch", "transformers", "gradio", "pillow"}
    assert "vitft" not in (out / "app.py").read_text().split('"""', 2)[2].replace("vitft demo", "")
    info = json.loads((out / "demo.json").read_text())
    assert info["warning"].startswith("Weak model") and info["baseline"] == pytest.approx(demo_summary(weak_run).baseline)
    with pytest.raises(DemoError, match="not an empty folder"):
        write_bundle(weak_run, out)


def test_bundle_classifier_matches_vitft(tmp_path, strong_run):
    import importlib.util

    from vitft_app.predict import Predictor

    out = write_bundle(strong_run, tmp_path / "bundle")
    spec = importlib.util.spec_from_file_location("bundle_app_under_test", out / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    classifier = module.Classifier(out / "model")
    predictor = Predictor(strong_run, device="cpu")
    from PIL import Image

    for path in sorted((out / "examples").iterdir())[:4]:
        image = Image.open(path).convert("RGB")
        ours = classifier.classify(image)
        theirs = predictor.predict([path], top_k=len(predictor.id2label))[0].as_dict()
        assert set(ours) == set(theirs)
        assert max(abs(ours[k] - theirs[k]) for k in ours) < 1e-3
        overlay = classifier.explain(image)
        assert overlay is not None and overlay.size == (32, 32)


def test_cli_bundle_and_errors(tmp_path, weak_run, capsys):
    from vitft_app.cli import main

    assert main(["demo", str(weak_run), "--bundle", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "b")
    assert main(["demo", str(tmp_path / "nope"), "--bundle", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitft demo: error: Not a run folder") and "Traceback" not in err


def test_engine_modules_import_without_gradio():
    code = ("import sys; sys.modules['gradio'] = None; import vitft_app.demo, vitft_app.model_catalog; "
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr


def test_runs_tab_opens_a_demo_server(strong_run, tmp_path):
    from vitft_app.ui.demo_page import DemoServers
    from vitft_app.ui.runs_tab import open_demo

    class Ctx:
        demo_servers = DemoServers(device="cpu")

    ctx = Ctx()
    try:
        message, port = open_demo(ctx, str(strong_run))
        assert port and f"http://127.0.0.1:{port}/" in message
        html = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
        assert strong_run.name in html
        assert open_demo(ctx, str(strong_run))[1] == port  # reused, not a second server
        message, port2 = open_demo(ctx, str(tmp_path))
        assert port2 is None and "Not a run folder" in message
        assert open_demo(ctx, None) == ("Choose a run first (click its row).", None)
    finally:
        ctx.demo_servers.close()


# ---------------------------------------------------------------------------------------------
# Real browser


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(command: list[str], cwd: Path, env: dict, port: int, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w")
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {log_path.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise AssertionError("server did not start within 180 s")


def _stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def _drive_page(url: str, upload: Path, expected_classes: list[str], shot_prefix: str, overlay: bool,
                upload_class: str | None = None, example_index: int = -1, example_class: str | None = None) -> None:
    """Click an example -> a prediction; drop an image -> top-k bars; screenshots at 1400x900."""
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(url)
            expect(page.locator("#demo-header")).to_contain_text("Validation accuracy")
            label = page.locator("#demo-label")
            expect(label).not_to_contain_text("%")
            page.screenshot(path=str(ARTIFACTS / f"{shot_prefix}-open.png"))
            page.locator("#demo-examples button").nth(example_index).click()
            page.wait_for_timeout(300)
            expect(label).not_to_contain_text("processing")
            expect(label).to_contain_text("%")
            if example_class is not None:
                expect(label.locator(".output-class").first).to_have_text(example_class)
            page.screenshot(path=str(ARTIFACTS / f"{shot_prefix}-example.png"))
            page.locator("#demo-image input[type=file]").set_input_files(str(upload))
            page.wait_for_timeout(300)
            expect(label).not_to_contain_text("processing")
            expect(label).to_contain_text("%")
            if upload_class is not None:
                expect(label.locator(".output-class").first).to_have_text(upload_class)
            for name in expected_classes:
                expect(label).to_contain_text(name)
            page.screenshot(path=str(ARTIFACTS / f"{shot_prefix}-dropped.png"))
            if overlay:
                page.locator("#demo-overlay-toggle input").check()
                expect(page.locator("#demo-overlay img")).to_be_visible()
                page.screenshot(path=str(ARTIFACTS / f"{shot_prefix}-overlay.png"))
        finally:
            browser.close()


@pytest.mark.browser
def test_demo_page_in_a_browser(strong_run, tmp_path, colors_root):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    process = None
    try:
        process = _serve([sys.executable, "-m", "vitft_app.cli", "demo", str(strong_run), "--port", str(port),
                          "--no-browser"], tmp_path, env, port, tmp_path / "demo.log")
        # The page carries the app's frame throttle first in its <head> (ui/page_head.py).
        from vitft_app.ui.page_head import IDLE_FRAME_THROTTLE_JS

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60) as response:
            assert response.read().split(b"<head>", 1)[1].startswith(IDLE_FRAME_THROTTLE_JS)
        upload = sorted((colors_root / "blue").iterdir())[0]
        examples = demo_summary(strong_run).example_labels
        red = examples.index("red")
        _drive_page(f"http://127.0.0.1:{port}", upload, ["blue"], "demo-page", overlay=True, upload_class="blue",
                    example_index=red,
                    example_class="red")
    finally:
        _stop(process)


@pytest.mark.browser
def test_bundle_in_a_browser_without_vitft(weak_run, tmp_path, digits_root):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}")
    bundle = write_bundle(weak_run, tmp_path / "bundle")
    blocker = tmp_path / "no-vitft"
    blocker.mkdir()
    # vitft is pip-installed here: make importing it fail, to prove the bundle does not need it
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['vitft_app'] = None\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"PYTHONPATH": str(blocker), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"})
    port = free_port()
    process = None
    try:
        process = _serve([sys.executable, "app.py", "--port", str(port)], bundle, env, port, tmp_path / "bundle.log")
        upload = sorted((digits_root / "7").iterdir())[-1]
        _drive_page(f"http://127.0.0.1:{port}", upload, ["0", "1", "7"], "demo-bundle", overlay=False)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(f"http://127.0.0.1:{port}")
                page.locator("#demo-warning").wait_for(timeout=60_000)
                assert page.locator("#demo-warning").inner_text().startswith("Weak model")
            finally:
                browser.close()
    finally:
        _stop(process)
    assert "vitft_app" not in (tmp_path / "bundle.log").read_text()


@pytest.mark.browser
def test_app_train_tab_info_and_runs_tab_demo_button(strong_run, tmp_path):
    """The app: the model picker's info line (offline: scratch default with its note), then Runs ->
    select the run -> Open demo page opens the demo in a new tab."""
    from playwright.sync_api import expect, sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}")
    (tmp_path / "data").mkdir()
    port = free_port()
    env = {**os.environ, "VITFT_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
           "HF_HUB_CACHE": str(tmp_path / "empty-hf-cache"), "GRADIO_ANALYTICS_ENABLED": "False"}
    process = None
    try:
        process = _serve([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--data-root",
                          str(tmp_path / "data"), "--runs-dir", str(strong_run.parent), "--no-browser"],
                         tmp_path, env, port, tmp_path / "app.log")
        ARTIFACTS.mkdir(exist_ok=True)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.set_default_timeout(120_000)
                page.goto(f"http://127.0.0.1:{port}")
                expect(page.locator("#data-summary")).to_contain_text("10 classes", timeout=300_000)
                page.get_by_role("tab", name="Train").click()
                expect(page.locator("#model-choice input")).to_have_value(SCRATCH_MODEL_ID, timeout=120_000)
                info = page.locator("#model-catalog-info")
                expect(info).to_contain_text("per epoch", timeout=120_000)
                expect(info).to_contain_text("estimate", timeout=120_000)
                expect(info).to_contain_text("random weights: expect low accuracy on small datasets", ignore_case=True, timeout=120_000)
                page.screenshot(path=str(ARTIFACTS / "demo-app-train-info.png"))
                page.get_by_role("tab", name="Runs").click()
                page.locator("#runs-selected input").click()
                page.get_by_role("option", name=strong_run.name).click()
                expect(page.locator("#runs-selected input")).to_have_value(strong_run.name, timeout=120_000)
                page.locator("#runs-open-demo").click()
                expect(page.locator("#runs-message")).to_contain_text("Demo page of", timeout=120_000)
                page.screenshot(path=str(ARTIFACTS / "demo-app-runs-button.png"))
                with page.context.expect_page() as opened:
                    page.locator("#runs-demo-link").click()
                demo = opened.value
                expect(demo.locator("#demo-header")).to_contain_text("Validation accuracy")
                expect(demo.locator("#demo-header")).to_contain_text(strong_run.name)
            finally:
                browser.close()
    finally:
        _stop(process)


SCRATCH_MODEL_ID = "pvt-v2-b0-scratch"  # the offline default (vitft_app.scratch.RECOMMENDED_SCRATCH_MODEL)
