"""Running the server in production, in process (FastAPI's TestClient): a locked SQLite database
gives 503 with Retry-After, readiness, the request id, metrics that agree with what the clients
saw. The PostgreSQL restart is in test_serve_postgres.py; shutdown and slow clients drive a real
server process in test_serve_limits.py."""

import json
import sqlite3

import pytest
from fastapi.testclient import TestClient

from dialogen.chat.session import Engine
from dialogen.chat.templates import get_template
from dialogen.models.loading import load
from dialogen.serve.app import create_app
from dialogen.serve.service import Keys, Limits, Service
from dialogen.serve.store import Store


@pytest.fixture(scope="module")
def app_for(tiny_llama):
    loaded = load(str(tiny_llama[0]))
    made = []

    def make(db, keys=(), metrics=True):
        engine = Engine(loaded.model, loaded.tokenizer, get_template("chatml", loaded.tokenizer), 256, "tiny")
        svc = Service(engine, Store(db, busy_timeout=0.2), Keys(list(keys)), Limits(), metrics=metrics)
        made.append(svc)
        return TestClient(create_app(svc), base_url="http://127.0.0.1"), svc

    yield make
    for svc in made:
        svc.close()


def test_a_locked_sqlite_database_gives_503_with_retry_after(app_for, tmp_path):
    client, _ = app_for(tmp_path / "s.db")
    sid = client.post("/v1/sessions", json={}).json()["id"]
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another process holding the write lock
    try:
        for r in (client.post("/v1/sessions", json={}),
                  client.post(f"/v1/sessions/{sid}/messages", json={"content": "hi", "max_tokens": 2})):
            assert r.status_code == 503 and r.headers["retry-after"] == "2", r.text
            assert r.json()["error"]["code"] == "store_unavailable" and "s.db" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 200
    finally:
        other.execute("ROLLBACK")
        other.close()
    r = client.post(f"/v1/sessions/{sid}/messages", json={"content": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text  # the claim of the failed turn was let go
    assert len(client.get(f"/v1/sessions/{sid}").json()["messages"]) == 2
    assert client.get("/ready").json() == {"status": "ready"}



def _samples(text: str) -> dict:
    """(name, labels) -> value, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_agree_with_what_the_clients_saw_and_requests_carry_ids(app_for, tmp_path):
    client, svc = app_for(tmp_path / "s.db", keys=["k1"])
    auth = {"Authorization": "Bearer k1"}
    assert client.get("/metrics").status_code == 401  # behind the key
    tokens, ids = 0, set()
    msgs = [{"role": "user", "content": "hello"}]
    for stream in (False, True, False):
        r = client.post("/v1/chat/completions", headers=auth,
                        json={"messages": msgs, "max_tokens": 5, "stream": stream,
                              "stream_options": {"include_usage": True} if stream else None})
        assert r.status_code == 200
        ids.add(r.headers["x-request-id"])
        if stream:
            usage = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")][-1]["usage"]
        else:
            usage = r.json()["usage"]
        tokens += usage["completion_tokens"]
    sid = client.post("/v1/sessions", json={}, headers=auth).json()["id"]
    r = client.post(f"/v1/sessions/{sid}/messages", json={"content": "hi", "max_tokens": 4}, headers=auth)
    tokens += r.json()["usage"]["completion_tokens"]
    assert client.get("/v1/sessions/sess_nope", headers=auth).status_code == 404
    assert client.get("/nowhere").status_code == 404
    assert client.post("/v1/chat/completions", json={"messages": msgs}).status_code == 401
    r = client.get("/health", headers={"x-request-id": "lb-check.42"})
    assert r.headers["x-request-id"] == "lb-check.42"  # the client's own id, when sane
    assert len(ids) == 3 and all(i.startswith("req_") for i in ids)

    r = client.get("/metrics", headers=auth)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = _samples(r.text)

    def requests(route, status, method="POST"):
        return m.get(("dialogen_http_requests_total", (("method", method), ("route", route), ("status", str(status)))))

    assert requests("/v1/chat/completions", 200) == 3
    assert requests("/v1/sessions/{sid}/messages", 200) == 1
    assert requests("/v1/sessions/{sid}", 404, "GET") == 1 and requests("unmatched", 404, "GET") == 1
    assert requests("unmatched", 401) == 1 and requests("unmatched", 401, "GET") == 1  # refused before routing
    assert m[("dialogen_http_responses_total", (("class", "4xx"),))] == 4
    assert m[("dialogen_generated_tokens_total", ())] == tokens
    assert m[("dialogen_time_to_first_token_seconds_count", ())] == 4  # one per reply
    assert m[("dialogen_time_per_token_seconds_count", ())] >= tokens - 4 - 4  # deltas after the first
    assert m[("dialogen_replies_active", ())] == 0 and m[("dialogen_replies_queued", ())] == 0
    assert m[("dialogen_store_seconds_count", (("op", "add_turn"),))] == 1
    assert m[("dialogen_kv_cache_bytes", (("pool", "sessions"),))] > 0


def test_metrics_off_serves_replies_and_answers_404_at_metrics(app_for, tmp_path):
    client, svc = app_for(tmp_path / "s.db", metrics=False)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200 and r.headers["x-request-id"].startswith("req_")
    r = client.get("/metrics")
    assert r.status_code == 404 and "--no-metrics" in r.json()["error"]["message"]
    assert svc.metrics.requests == {} and svc.metrics.ttft.counts == [0] * len(svc.metrics.ttft.counts)


_BURST = """
import json, threading, time

import torch

from dialogen.serve.memory import _glibc


def rss_mb():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) / 1024


if _glibc() is None:
    print(json.dumps(None))
    raise SystemExit
_glibc().malloc_trim(0)
before, held, lock = rss_mb(), [], threading.Lock()


def job(i):
    for k in range(6):
        kv = torch.zeros(2, 30, 1, 3, 256, 64)  # a 135M model's cache of 256 positions
        time.sleep(0.005 * (i % 4))
        grown = torch.zeros(2, 30, 1, 3, 512, 64)
        grown[..., :256, :] = kv
        del kv
        with lock:
            held.append(grown) if k == 5 else None


threads = [threading.Thread(target=job, args=(i,)) for i in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
peak = rss_mb()
held.clear()
kept = rss_mb()
_glibc().malloc_trim(0)  # what the server's Trimmer does once idle
print(json.dumps([before, peak, kept, rss_mb()]))
"""


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="reads /proc")
def test_kv_caches_freed_after_a_burst_go_back_to_the_system_at_the_idle_trim():
    """Job threads grow KV caches (11.8 MB, then 23.6 MB) while others are freed, as a burst of
    replies does: glibc keeps much of it in its arenas; the trim the server runs once idle gives
    it back. In a process of its own, as a server is, so what earlier tests left in this heap
    (or set with mallopt) does not count."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _BURST], capture_output=True, text=True, check=True).stdout
    figures = json.loads(out)
    if figures is None:
        pytest.skip("not glibc")
    before, peak, kept, after = figures
    assert peak - before > 150 and after < kept and after - before < 0.25 * (peak - before), figures
