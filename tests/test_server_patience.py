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
