"""`dialogen serve` on the real default model (SmolLM2-135M-Instruct): a sensible answer, replies
served together, a full queue (503), a client that leaves, and kill -9 in the middle of a reply."""

import json
import threading
import time

import httpx
import openai
import pytest

from dialogen.serve.launch import ServerProcess


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return tmp_path_factory.mktemp("serve_default") / "sessions.db"


def _start(db):
    return ServerProcess(["--db", str(db), "--max-active", "2", "--max-queue", "0", "--temperature", "0"]).start()


@pytest.fixture(scope="module")
def server(db):
    holder = {"srv": _start(db)}  # the durability test replaces it with a restarted one
    yield holder
    holder["srv"].stop()


def _client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_default_model_answers(server):
    r = _client(server["srv"]).chat.completions.create(
        model="default", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=20)
    assert "Paris" in r.choices[0].message.content


class Stream(threading.Thread):
    """A streamed completion read in the background, with the arrival time of each content delta."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.deltas: list[tuple[float, str]] = []
        self.first = threading.Event()

    def run(self):
        with httpx.stream("POST", self.url + "/v1/chat/completions", json={**self.body, "stream": True},
                          timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                    if delta:
                        self.deltas.append((time.monotonic(), delta))
                        self.first.set()


def test_concurrent_replies_interleave_and_a_full_queue_answers_503(server):
    srv = server["srv"]
    body = {"messages": [{"role": "user", "content": "Write a long story about a dragon."}], "max_tokens": 40,
            "temperature": 0, "stop": ["NEVER-SEEN"]}  # a stop string no reply contains: full length
    a, b = Stream(srv.url, body), Stream(srv.url, {**body, "messages": [{"role": "user", "content": "Count to 50."}]})
    a.start()
    assert a.first.wait(60)
    b.start()
    assert b.first.wait(60)
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30)  # two running, no queue
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "server_busy"
    a.join(120)
    b.join(120)
    # b started after a was under way, yet its first token came long before a's last: served together
    assert b.deltas[0][0] < a.deltas[-1][0]
    a_during_b = [t for t, _ in a.deltas if b.deltas[0][0] <= t <= b.deltas[-1][0]]
    assert len(a_during_b) >= 5
    assert srv.health()["worker"]["max_batch"] >= 2  # decode steps ran as one batch


def test_client_disconnect_cancels_the_generation(server):
    srv = server["srv"]
    before = srv.health()["worker"]
    body = {"messages": [{"role": "user", "content": "Tell me everything about the ocean."}], "max_tokens": 400,
            "stream": True, "stop": ["NEVER-SEEN"]}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: {")
            if seen >= 4:
                break  # leave mid-reply: closing the response closes the connection
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        w = srv.health()["worker"]
        if w["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.2)
    assert w["cancelled"] == before["cancelled"] + 1 and w["completed"] == before["completed"]
    assert w["running"] == 0


def test_kill_9_mid_reply_keeps_completed_turns_and_the_session_continues(server, db):
    srv = server["srv"]
    client = _client(srv)
    s = client.post("/sessions", body={"persona": "You are a helpful assistant.", "settings": {"max_tokens": 12}},
                    cast_to=object)
    turns = []
    for text in ["My name is Ada.", "I like tea."]:
        t = client.post(f"/sessions/{s['id']}/messages", body={"content": text}, cast_to=object)
        turns += [("user", text), ("assistant", t["message"]["content"])]
    got_delta = threading.Event()

    def third_turn():
        body = {"content": "Write a long poem about tea.", "stream": True, "max_tokens": 300}
        try:
            with httpx.stream("POST", f"{srv.url}/v1/sessions/{s['id']}/messages", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if '"content": "' in line and '"content": ""' not in line:
                        got_delta.set()
        except httpx.HTTPError:
            pass  # the server died under us

    t = threading.Thread(target=third_turn, daemon=True)
    t.start()
    assert got_delta.wait(60)
    busy = httpx.post(f"{srv.url}/v1/sessions/{s['id']}/messages", json={"content": "and?"}, timeout=30)
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "session_busy"  # one turn at a time
    srv.kill()  # SIGKILL in the middle of the streamed reply
    t.join(30)
    srv = server["srv"] = _start(db)
    client = _client(srv)
    stored = client.get(f"/sessions/{s['id']}", cast_to=object)
    assert [(m["role"], m["content"]) for m in stored["messages"]] == turns  # all of them, and no half turn
    again = client.post(f"/sessions/{s['id']}/messages", body={"content": "What is my name?"}, cast_to=object)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # rebuilt from the stored history
    # the same conversation sent whole to the stateless endpoint: same prompt, same greedy reply
    history = [{"role": "system", "content": "You are a helpful assistant."}]
    history += [{"role": r, "content": c} for r, c in turns] + [{"role": "user", "content": "What is my name?"}]
    whole = client.chat.completions.create(model="default", messages=history, max_tokens=12)
    assert again["usage"]["prompt_tokens"] == whole.usage.prompt_tokens > 40
    assert again["message"]["content"] == whole.choices[0].message.content
    stored = client.get(f"/sessions/{s['id']}", cast_to=object)
    assert len(stored["messages"]) == 6
