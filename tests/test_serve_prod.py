"""Running the server in production, in process (FastAPI's TestClient): a locked SQLite database
gives 503 with Retry-After, readiness, the request id, metrics that agree with what the clients
saw. The PostgreSQL restart is in test_serve_postgres.py; shutdown and slow clients drive a real
server process in test_serve_limits.py."""

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

    def make(db, keys=()):
        engine = Engine(loaded.model, loaded.tokenizer, get_template("chatml", loaded.tokenizer), 256, "tiny")
        svc = Service(engine, Store(db, busy_timeout=0.2), Keys(list(keys)), Limits())
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

