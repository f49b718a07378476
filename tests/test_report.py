"""Model card, HTML report (opened in headless chromium), and push to the Hub offline."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tests_helpers import CHROMIUM, CHROMIUM_ARGS
from vitft_app.config import TrainConfig
from vitft_app.jobs import JobRunner
from vitft_app.report import push_to_hub, write_html_report


@pytest.fixture(scope="module")
def card_run(tmp_path_factory, digits_root, tiny_vit):
    tmp = tmp_path_factory.mktemp("report")
    data = tmp / "digits"
    for digit in ("0", "1", "7"):
        shutil.copytree(digits_root / digit, data / digit)
    runner = JobRunner(tmp / "runs", device="cpu")
    job = runner.start(TrainConfig(data_dir=str(data), model=str(tiny_vit), epochs=2, batch_size=32, lr=3e-3,
                                   augment="none", precision="fp32", output_dir=str(tmp / "runs")))
    assert job.wait(300)
    return job.run_dir


def test_model_card_after_training_and_after_evaluation(card_run):
    from vitft_app.evaluate import evaluate_run

    card = (card_run / "model" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-classification")
    assert "## Intended use and limits" in card and "best validation accuracy" in card
    evaluate_run(card_run, split="val", device="cpu")
    card = (card_run / "model" / "README.md").read_text()
    assert "macro f1 (val)" in card and "![confusion matrix" in card
    with Image.open(card_run / "model" / "confusion_matrix.png") as image:
        assert image.size[0] > 100


def test_html_report_opens_in_headless_chromium(card_run, tmp_path):
    from playwright.sync_api import sync_playwright

    report = write_html_report(card_run, tmp_path / "report.html")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(report.as_uri())
        page.wait_for_selector(".plot-container", timeout=30_000)  # plotly rendered offline
        assert page.locator(".plot-container").count() == 4
        assert "Validation accuracy" in page.inner_text("body")
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape[0] > 1500 and pixels.std() > 20  # a long page with content, not a blank one


def test_push_to_hub_explains_offline(card_run, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ValueError, match="user/name"):
        push_to_hub(card_run, "", "token")
    with pytest.raises(ValueError, match="token"):
        push_to_hub(card_run, "me/model", "")
    with pytest.raises(ConnectionError, match="cannot be reached"):
        push_to_hub(card_run, "me/model", "hf_secret")

    from vitft_app.ui import predict_tab

    assert "cannot be reached" in predict_tab.push_model(str(card_run), "me/model", "hf_secret", True)


def test_report_button_and_cli(card_run):
    import subprocess
    import sys

    from vitft_app.ui import evaluate_tab

    path, message = evaluate_tab.make_report(str(card_run))
    assert path.endswith("-report.html") and "opens in any browser" in message
    done = subprocess.run([sys.executable, "-m", "vitft_app.cli", "report", str(card_run)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("report.html")


def test_report_says_how_many_epochs_a_stopped_run_trained():
    from vitft_app.config import TrainConfig
    from vitft_app.report import _epochs_trained
    from vitft_app.run_status import RunStatus

    config = TrainConfig(data_dir="/d", model="m", epochs=3)
    assert _epochs_trained(RunStatus(status="stopped", epochs=3, epoch=1.05), config) == "1.05 of 3 epochs (stopped early)"
    assert _epochs_trained(RunStatus(status="completed", epochs=3, epoch=3.0), config) == "3 epochs"
    assert _epochs_trained(RunStatus(status="completed"), config) == "3 epochs"  # an older status without epochs
