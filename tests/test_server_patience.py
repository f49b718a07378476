"""The app's launch waits for a slow localhost answer instead of aborting (loaded machines)."""

from __future__ import annotations

from gradio import networking

from vitft_app.server import patient_localhost_check


def test_gradio_localhost_check_retries_until_the_server_answers(monkeypatch):
    answers = iter([False, False, True])
    calls = []

    def slow_server(url: str) -> bool:
        calls.append(url)
        return next(answers)

    monkeypatch.setattr(networking, "url_ok", slow_server)
    patient_localhost_check(wait_s=30)
    patient_localhost_check(wait_s=30)  # wrapping twice keeps one retry loop
    assert networking.url_ok("http://127.0.0.1:1/") is True and len(calls) == 3


def test_gradio_localhost_check_gives_up_after_the_wait(monkeypatch):
    calls = []
    monkeypatch.setattr(networking, "url_ok", lambda url: calls.append(url) or False)
    patient_localhost_check(wait_s=0.5)
    assert networking.url_ok("http://127.0.0.1:1/") is False and 1 <= len(calls) <= 3


def test_the_frame_throttle_goes_first_in_the_page_head_and_nowhere_else():
    from vitft_app.ui.page_head import IDLE_FRAME_THROTTLE_JS, IdleFrameThrottle

    page = b'<!doctype html><html><head><meta charset="utf-8" /><script type="module" src="x.js"></script></head></html>'
    edited = IdleFrameThrottle.inject(page)
    assert edited.startswith(b"<!doctype html><html><head>" + IDLE_FRAME_THROTTLE_JS + b'<meta charset="utf-8" />')
    assert edited.index(IDLE_FRAME_THROTTLE_JS) < edited.index(b'type="module"')
    assert IdleFrameThrottle.inject(b'{"detail": "Not authenticated"}') == b'{"detail": "Not authenticated"}'
