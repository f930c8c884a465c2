"""The server's page (GET /) in a real browser: Playwright driving the system's chromium (Debian's package, not
Playwright's own download), against a live server on a tiny random model.

One walk through the page as a user would: an API key, a memory added and its job followed to the end, the
memory found in the list and by search, a streamed chat answer showing the gate-weight bar of that memory, and
the memory forgotten. Skips when playwright or chromium is missing (.ci/browser-setup installs both).
With MEGAMEM_SCREENSHOT set it also rewrites docs/img/server-page.png (the page after the chat answer).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (run .ci/browser-setup, or pip install playwright)"
)
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no `chromium` on PATH (run .ci/browser-setup, or apt-get install chromium)"
)

from serverlib import LiveServer, make_server_store  # noqa: E402

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "server-page.png"
MEMORY = "In 2031 the Vexmoor bridge was painted teal by Ida Carrow."
QUESTION = "What colour was the Vexmoor bridge painted in 2031?"
WAIT_MS = 120_000  # learning a memory and answering on the tiny model take seconds; CI machines can be slow


@pytest.fixture()
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],  # containers, root
        )
        try:
            yield b
        finally:
            b.close()


def test_page_add_chat_forget(tmp_path, browser):
    expect = sync_api.expect
    store, keys = make_server_store(tmp_path)
    with LiveServer(store) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 660})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url + "/")
        expect(page.get_by_test_id("health")).to_have_text("server ready", timeout=30_000)

        # a wrong key: the API's own error message is shown
        key = page.get_by_label("API key")
        key.fill("not-a-key")
        expect(page.get_by_test_id("list-error")).to_contain_text("the API key is not valid")

        # the right key, kept in localStorage, clears the error and lists the (empty) namespace
        key.fill(keys["acme"])
        expect(page.get_by_test_id("list-error")).to_be_empty()
        expect(page.get_by_test_id("list-status")).to_have_text("no memories yet")
        assert page.evaluate("localStorage.getItem('megamem.apiKey')") == keys["acme"]

        # add a memory and follow its job to the end
        page.get_by_label("New memory").fill(MEMORY)
        page.get_by_label("User id").fill("ida")
        page.get_by_test_id("add-btn").click()
        job = page.get_by_test_id("job").first
        expect(job).to_have_attribute("data-status", "succeeded", timeout=WAIT_MS)
        memory_id = job.get_attribute("data-memory-id")
        assert memory_id
        expect(job).to_contain_text(f"learned as {memory_id}")

        # it appears in the list, with its user id
        item = page.locator(f'[data-testid="memory"][data-memory-id="{memory_id}"]')
        expect(item).to_contain_text(MEMORY)
        expect(item).to_contain_text("ida")
        expect(page.get_by_test_id("memory")).to_have_count(1)

        # search finds it (with a score); an empty search lists again
        page.get_by_label("Search memories").fill("Vexmoor bridge")
        page.get_by_label("Search memories").press("Enter")
        expect(page.get_by_test_id("list-status")).to_have_text(re.compile(r"1 match for"))
        expect(item).to_contain_text("score")
        page.get_by_label("Search memories").fill("")
        page.get_by_test_id("search-btn").click()
        expect(page.get_by_test_id("list-status")).to_have_text("1 memory")

        # ask about it: the streamed answer shows a gate-weight bar for that memory
        page.get_by_label("Message").fill(QUESTION)
        page.get_by_label("Message").press("Enter")
        expect(page.get_by_test_id("question")).to_have_text(re.compile(re.escape(QUESTION)))
        answer = page.get_by_test_id("answer").last
        bar = answer.locator(f'[data-testid="gate-bar"][data-memory-id="{memory_id}"]')
        expect(bar).to_be_visible(timeout=WAIT_MS)
        expect(bar).to_contain_text(memory_id)
        weight = float(bar.get_attribute("data-weight"))
        assert 0 < weight <= 1
        expect(bar.locator(".w")).to_have_text(f"{weight:.3f}")
        expect(page.get_by_test_id("chat-send")).to_be_enabled(timeout=WAIT_MS)  # the stream ended
        expect(answer).not_to_have_class(re.compile(r"streaming"))
        expect(page.get_by_test_id("chat-error")).to_be_empty()
        assert answer.locator(".text").inner_text().strip()  # some (gibberish) answer arrived
        if os.environ.get("MEGAMEM_SCREENSHOT"):
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)

        # forget it: it leaves the list, and the server agrees
        item.get_by_role("button", name=f"Forget memory {memory_id}").click()
        expect(item).to_have_count(0)
        expect(page.get_by_test_id("list-status")).to_have_text("no memories yet")
        expect(page.get_by_test_id("list-error")).to_be_empty()
        left = httpx.get(f"{url}/v1/memories", headers={"Authorization": f"Bearer {keys['acme']}"}, timeout=10)
        assert left.status_code == 200 and left.json()["results"] == []
        assert errors == [], f"errors in the page: {errors}"
