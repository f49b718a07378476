"""Real browser: fix the data from a confusion-matrix cell (select two images, move one, exclude
the other, undo both), with screenshots in test-artifacts/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_browser import ARTIFACTS, app_url, open_app, page, start_tiny_run  # noqa: F401 - fixtures

pytestmark = pytest.mark.browser


def _image_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*.png")}


def test_fix_data_from_a_confusion_cell_and_undo(app_url, page):  # noqa: F811 - fixtures
    from playwright.sync_api import expect

    url, tiny_vit, home = app_url
    dataset = home / "datasets" / "mnist-digits"
    open_app(page, url)
    before = _image_files(dataset)
    start_tiny_run(page, tiny_vit, epochs=1)
    expect(page.locator("#train-status")).to_contain_text("completed", timeout=300_000)
    page.set_viewport_size({"width": 1400, "height": 900})
    page.get_by_role("tab", name="Evaluate").click()
    expect(page.locator("#eval-run input")).to_have_value(re.compile("tiny-vit"), timeout=30_000)
    page.locator("#evaluate-button").click()
    expect(page.locator("#eval-summary")).to_contain_text("macro precision", timeout=120_000)

    # Open the first confusion cell of true class "0" holding at least two images.
    cells = page.locator("#eval-matrix [role=gridcell]")
    counts = [cells.nth(i).inner_text().strip() for i in range(1, 11)]
    column = next(i for i, text in enumerate(counts, start=1) if text.isdigit() and int(text) >= 2)
    cells.nth(column).click()
    expect(page.locator("#eval-cell-caption")).to_contain_text("true 0", timeout=30_000)
    gallery = page.locator("#eval-cell-gallery")
    gallery.locator("button.thumbnail-item").first.click()
    selection = page.locator("#fix-selection")
    expect(selection.locator("label")).to_have_count(1, timeout=30_000)
    page.keyboard.press("Escape")  # leave the gallery's preview
    close = gallery.locator("button[aria-label='Close']")
    if close.count():
        close.first.click()
    gallery.locator("button.thumbnail-item, button.thumbnail-small").nth(1).click()
    expect(selection.locator("label")).to_have_count(2, timeout=30_000)
    names = [text.strip() for text in selection.locator("label").all_inner_texts()]
    assert all(name.startswith("0/") for name in names), names
    selection.scroll_into_view_if_needed()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "fix-data-1-selected.png"))

    # Move the first to class 7: untick the second, choose the class, press Move.
    selection.locator("label").nth(1).click()
    target = page.locator("#fix-class input")
    target.click()
    target.fill("7")
    target.press("Enter")
    page.locator("#fix-move").click()
    expect(page.locator("#fix-message")).to_contain_text("Moved 1 image(s) to class 7", timeout=30_000)
    first, second = names
    assert (dataset / "7" / Path(first).name).is_file() and not (dataset / first).exists()
    # Exclude the other: tick it (the moved one left the list), press Exclude.
    expect(selection.locator("label")).to_have_count(1)
    selection.locator("label").first.click()
    page.locator("#fix-exclude").click()
    expect(page.locator("#fix-message")).to_contain_text("Excluded 1 image(s)", timeout=30_000)
    assert (dataset / "_excluded" / second).is_file() and not (dataset / second).exists()
    page.locator("#fix-message").scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "fix-data-2-moved-and-excluded.png"))

    # Undo both.
    page.locator("#fix-undo").click()
    expect(page.locator("#fix-message")).to_contain_text("Undid edit 2", timeout=30_000)
    page.locator("#fix-undo").click()
    expect(page.locator("#fix-message")).to_contain_text("Undid edit 1", timeout=30_000)
    assert _image_files(dataset) == before
    page.locator("#fix-undo").click()
    expect(page.locator("#fix-message")).to_contain_text("Nothing to undo", timeout=30_000)
    page.get_by_text("Edit journal").click()
    expect(page.locator("#fix-journal")).to_contain_text("undo")
    page.locator("#fix-journal").scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "fix-data-3-undone.png"))

