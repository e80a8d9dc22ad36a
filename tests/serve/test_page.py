"""The chat page in a real headless Chromium (the OS package, driven by Playwright; no browser download)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server's tests need the serve extra: pip install -e '.[dev]'")
pytest.importorskip("uvicorn", reason="the server's tests need the serve extra: pip install -e '.[dev]'")

CHROMIUM = Path(os.environ.get("LIT_LLM_CHROMIUM", "/usr/bin/chromium"))
# The machine's network is closed: no background services, updates or sync.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: install the Debian package `chromium` (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' (playwright)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_a_message_gets_a_streamed_answer(browser, server, web, tmp_path):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model-name').textContent === 'tiny-gpt'")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "30")
    page.fill("#input", "Name a module.")
    page.click("#send")
    answer = page.locator(".message.assistant").last
    page.wait_for_function(
        "document.querySelector('.message.assistant:last-child')?.dataset.done === 'true'", timeout=60_000)
    shown = answer.text_content()
    chunks = int(answer.get_attribute("data-chunks"))
    page.screenshot(path=str(tmp_path / "chat-page.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'chat-page.png'}")
    # The page showed, piece by piece, what the API answers to the same conversation.
    status, body = web.post(server.url + "/v1/chat/completions", {
        "model": "tiny-gpt", "messages": [{"role": "user", "content": "Name a module."}], "max_tokens": 30,
        "temperature": 0,
    })
    assert status == 200
    assert shown == body["choices"][0]["message"]["content"] != ""
    assert chunks > 1
    assert page.locator(".message.user").text_content() == "Name a module."
    assert not page.is_disabled("#send") and page.is_disabled("#stop")
    assert not errors
    assert (tmp_path / "chat-page.png").stat().st_size > 1000


def test_stop_ends_the_answer_frees_the_slot_and_the_conversation_goes_on(browser, thread_server, tmp_path):
    with thread_server(slots=2, max_tokens=100) as server:
        decode = server.engine.decoder.decode

        def slowed(*args, **kwargs):  # 100 tokens take seconds: the answer is still streaming at the click
            time.sleep(0.05)
            return decode(*args, **kwargs)

        server.engine.decoder.decode = slowed
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model-name').textContent === 'tiny'")
        page.fill("#max-tokens", "100")
        page.fill("#input", "Tell me everything.")
        page.click("#send")
        page.wait_for_function("Number(document.querySelector('.message.assistant')?.dataset.chunks) >= 2")
        page.click("#stop")
        page.wait_for_function("document.getElementById('stop').disabled")
        assert page.locator(".message.assistant").last.get_attribute("data-done") == "true"
        assert page.text_content("#status") == "Stopped."
        deadline = time.monotonic() + 3
        while server.engine.stats()["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.engine.stats()["active"] == 0  # the aborted stream left its slot
        server.engine.decoder.decode = decode
        page.fill("#max-tokens", "10")
        page.fill("#input", "And then?")
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelectorAll('.message.user').length === 2")
        page.wait_for_function(
            "document.querySelector('.message.assistant:last-child')?.dataset.done === 'true'", timeout=60_000)
        page.screenshot(path=str(tmp_path / "chat-page-stopped.png"), full_page=True)
