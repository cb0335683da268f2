"""The chat page in a real browser: headless Debian chromium driven by Playwright.

Skips only when /usr/bin/chromium is absent (CI installs it in .ci/run). Playwright never
downloads a browser here: it is pointed at the system one.
"""

import os
import re

import pytest

from dialogen.serve.launch import ServerProcess

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not installed (apt-get install chromium)")

# counts text changes of the newest assistant reply, to tell a streamed reply from one shown at once
WATCH = """() => {
  window.__updates = 0;
  new MutationObserver(() => {
    const bodies = document.querySelectorAll('.msg.assistant .body');
    if (bodies.length && bodies[bodies.length - 1].textContent) window.__updates++;
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    db = tmp_path_factory.mktemp("browser") / "sessions.db"
    with ServerProcess(["--model", str(tiny_llama[0]), "--template", "chatml", "--db", str(db),
                        "--model-name", "tiny-chat", "--temperature", "0"]) as srv:
        yield srv


def test_page_sends_a_message_and_streams_the_reply(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    shot = os.environ.get("DIALOGEN_SCREENSHOT") or str(tmp_path / "chat.png")
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                   headless=True, args=ARGS, viewport={"width": 1100, "height": 700})
        try:
            page = ctx.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            sync_api.expect(page.locator("#model-name")).to_have_text("tiny-chat")
            page.fill("#persona", "You are a cheerful pirate.")
            page.fill("#max_tokens", "40")
            page.evaluate(WATCH)
            page.fill("#input", "Hello, who are you?")
            page.press("#input", "Enter")
            reply = page.locator(".msg.assistant").last
            sync_api.expect(reply).not_to_have_class(re.compile(r"\bstreaming\b"), timeout=60_000)
            sync_api.expect(page.locator(".msg.user .body")).to_have_text("Hello, who are you?")
            text = reply.locator(".body").inner_text()
            assert text.strip() and page.evaluate("window.__updates") > 1  # it arrived in pieces
            sync_api.expect(page.locator("#persona-shown")).to_contain_text("cheerful pirate")
            sync_api.expect(page.locator("#history li")).to_have_count(1)
            sync_api.expect(page.locator("#history .open")).to_have_text("Hello, who are you?")
            # reranking: three candidates, shown with their scores under the chosen reply
            page.fill("#num_candidates", "3")
            page.fill("#input", "Tell me a joke.")
            page.press("#input", "Enter")
            ranked = page.locator(".msg.assistant").nth(1)
            sync_api.expect(ranked.locator(".candidates li")).to_have_count(3, timeout=60_000)
            sync_api.expect(ranked.locator(".candidates li.winner")).to_have_count(1)
            ranked.locator(".candidates summary").click()
            page.screenshot(path=shot)
            page.fill("#num_candidates", "")
            # the server stored the same turn the page showed
            page.click("#new-chat")
            sync_api.expect(page.locator(".msg")).to_have_count(0)
            page.click("#history .open")
            sync_api.expect(page.locator(".msg.assistant .body").first).to_have_text(text)
            sync_api.expect(page.locator(".msg.assistant .candidates li")).to_have_count(3)
            assert not errors, errors
        finally:
            ctx.close()
    assert os.path.getsize(shot) > 10_000

