"""The chat page in a real browser: headless Debian chromium driven by Playwright.

Skips only when /usr/bin/chromium is absent (CI installs it in .ci/run). Playwright never
downloads a browser here: it is pointed at the system one.
"""

import http.server
import os
import re
import threading

import httpx
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
def other_site():
    """Another web site on this machine: http://127.0.0.1:PORT (listed with --cors-origin) and
    http://localhost:PORT (the same pages, but another origin, not listed)."""
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<!doctype html><title>other site</title><p>another origin"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    yield f"http://127.0.0.1:{port}", f"http://localhost:{port}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory, other_site):
    db = tmp_path_factory.mktemp("browser") / "sessions.db"
    with ServerProcess(["--model", str(tiny_llama[0]), "--template", "chatml", "--db", str(db),
                        "--model-name", "tiny-chat", "--temperature", "0", "--cors-origin", other_site[0]]) as srv:
        yield srv


# from another site's page: a JSON POST (with a CORS preflight), and a form-like text/plain POST
CALL = """async ([url, body, type]) => {
  try {
    const r = await fetch(url, {method: "POST", headers: {"Content-Type": type}, body: JSON.stringify(body),
                                mode: type === "application/json" ? "cors" : "no-cors"});
    return {status: r.status, type: r.type, body: r.type === "opaque" ? null : await r.json()};
  } catch (e) {
    return {error: String(e)};
  }
}"""


def test_listed_origin_works_from_the_browser_and_others_do_not(server, other_site, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    listed, unlisted = other_site
    chat = [server.url + "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi from another site"}], "max_tokens": 4}]
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                   headless=True, args=ARGS)
        try:
            page = ctx.new_page()
            page.goto(listed + "/")
            ok = page.evaluate(CALL, [*chat, "application/json"])
            assert ok["status"] == 200 and ok["body"]["choices"][0]["message"]["content"], ok
            page.goto(unlisted + "/")
            refused = page.evaluate(CALL, [*chat, "application/json"])
            assert "error" in refused and "Failed to fetch" in refused["error"], refused
            before = httpx.get(server.url + "/v1/sessions").json()["data"]
            blind = page.evaluate(CALL, [server.url + "/v1/sessions", {"persona": "planted"}, "text/plain"])
            assert blind.get("type") == "opaque"  # the browser sent it; the server must not have acted on it
            assert httpx.get(server.url + "/v1/sessions").json()["data"] == before
        finally:
            ctx.close()



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
            # the tiny model writes its whole reply within milliseconds, which would reach the page in one
            # read: a slow link (about a token's event per 20 ms) shows whether the page renders it in pieces
            cdp = ctx.new_cdp_session(page)
            cdp.send("Network.enable")
            cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                          "downloadThroughput": 12_000, "uploadThroughput": -1})
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



def test_page_rates_a_reply_and_picks_the_better_of_two(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                   headless=True, args=ARGS)
        try:
            page = ctx.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.fill("#max_tokens", "8")
            page.fill("#input", "Rate this, please.")
            page.press("#input", "Enter")
            reply = page.locator(".msg.assistant").last
            expect(reply.locator(".rate.up")).to_be_visible(timeout=60_000)
            reply.locator(".rate.up").click()
            expect(reply.locator(".rate.up")).to_have_attribute("aria-pressed", "true")
            expect(reply.locator(".rate.down")).to_have_attribute("aria-pressed", "false")
            sid = page.evaluate("state.session.id")
            url = f"{server.url}/v1/sessions/{sid}"
            assert httpx.get(url).json()["messages"][1]["feedback"] == {"rating": "up", "comment": None}
            first = reply.locator(".body").text_content()
            # regenerate (sampled, so the second reply differs), then pick the new one
            page.fill("#temperature", "1.5")
            reply.locator(".regenerate").click()
            alt = page.locator(".msg.alternative")
            expect(alt.locator(".better")).to_be_visible(timeout=60_000)
            expect(page.locator("#input")).to_be_disabled()  # waits for a pick
            second = alt.locator(".body").text_content()
            assert second and second != first
            alt.locator(".better").click()
            expect(page.locator(".msg.alternative")).to_have_count(0)
            expect(page.locator("#input")).to_be_enabled()
            assert reply.locator(".body").text_content() == second
            expect(reply.locator(".rate.up")).to_have_attribute("aria-pressed", "false")  # the rating was the first's
            stored = httpx.get(url).json()["messages"][1]
            assert stored["content"] == second and stored["variant"] == 1
            assert [v["content"] for v in stored["variants"]] == [first, second]
            assert stored["variants"][0]["feedback"]["rating"] == "up"
            # the next turn goes on from the chosen reply; only the last reply offers Regenerate
            page.fill("#input", "And then?")
            page.press("#input", "Enter")
            expect(page.locator(".msg.assistant .rate")).to_have_count(4, timeout=60_000)
            expect(page.locator(".msg.assistant .regenerate:visible")).to_have_count(1)
            page.locator(".msg.assistant").last.locator(".rate.down").click()
            expect(page.locator(".msg.assistant").last.locator(".rate.down")).to_have_attribute("aria-pressed", "true")
            # reopened, the conversation shows the chosen reply and the rating
            page.click("#new-chat")
            page.locator("#history .open").first.click()
            expect(page.locator(".msg.assistant .body").first).to_have_text(second)
            expect(page.locator(".msg.assistant").last.locator(".rate.down")).to_have_attribute("aria-pressed", "true")
            expect(page.locator(".msg.assistant .regenerate:visible")).to_have_count(1)
            assert not errors, errors
        finally:
            ctx.close()
