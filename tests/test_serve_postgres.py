"""Sessions on PostgreSQL: the store against the SQLite one, claims across replicas (and a dead
one's), the schema and its version. Two real server replicas on one database are tested with the
SQLite pair in test_serve_writers.py. A throwaway cluster runs for the tests (see postgres.py)."""

import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from dialogen.errors import UserError
from dialogen.serve.store import Conflict, Store


def _script(store):
    """The same operations on a store; what a client could observe of them."""
    out = []
    a = store.create("owner", "be brief", {"temperature": 0.5}, "first")
    b = store.create("owner", None, {}, "")
    store.create("someone else", None, {}, "")
    assert store.add_turn(a["id"], "hello there", "hi", {"finish_reason": "stop"}, expected=0)
    assert store.add_turn(b["id"], "a question " * 20, "an answer")
    with pytest.raises(Conflict):
        store.add_turn(a["id"], "late", "never", expected=0)
    out.append([(m["role"], m["content"], m.get("finish_reason")) for m in store.get(a["id"], "owner")["messages"]])
    out.append(store.get(a["id"], "someone else"))
    out.append(sorted((s["title"], s["message_count"], s["persona"], json.dumps(s["settings"]))
                      for s in store.list("owner")))
    out.append((store.count(a["id"]), store.count("sess_missing")))
    out.append((store.delete(b["id"], "someone else"), store.delete(b["id"], "owner"), store.get(b["id"], "owner")))
    out.append(store.add_turn(b["id"], "to a deleted session", "x"))
    return out


def test_the_store_behaves_as_the_sqlite_one(pg_dsn, tmp_path):
    from dialogen.serve.pgstore import PgStore

    pg, lite = PgStore(pg_dsn), Store(tmp_path / "s.db")
    try:
        assert _script(pg) == _script(lite)
    finally:
        pg.close()
        lite.close()


def test_claims_hold_across_replicas_and_end_with_a_dead_one(pg_dsn):
    from dialogen.serve.pgstore import PgStore

    a, b = PgStore(pg_dsn), PgStore(pg_dsn)  # as two replicas hold it
    try:
        sid = a.create("", None, {})["id"]
        held = a.claim(sid)
        assert held and b.claim(sid) is None and a.claim(sid) is None
        a.release(sid, held)
        held = b.claim(sid)
        assert held and a.claim(sid) is None
        b.release(sid, held)
        # a replica killed while it holds a claim: the claim ends with its connection, at once
        code = (f"import os, sys; from dialogen.serve.pgstore import PgStore; s = PgStore({pg_dsn!r}); "
                f"print(s.claim({sid!r}), flush=True); sys.stdin.read()")
        child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() not in ("", "None")
        assert a.claim(sid) is None  # held by the live child
        child.send_signal(signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 10
        while (got := a.claim(sid)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got is not None
    finally:
        a.close()
        b.close()


def test_schema_creation_is_idempotent_and_versioned(pg_dsn):
    import psycopg

    from dialogen.serve.pgstore import SCHEMA_VERSION, PgStore

    stores, errors = [], []

    def open_one():
        try:
            stores.append(PgStore(pg_dsn))
        except Exception as e:  # noqa: BLE001 - the test reports any
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(4)]  # replicas starting together
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert not errors and len(stores) == 4
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM dialogen_schema").fetchall() == [(SCHEMA_VERSION,)]
        conn.execute("UPDATE dialogen_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(UserError, match="newer than this dialogen"):
        PgStore(pg_dsn)


def test_an_unreachable_database_is_one_line(capsys):
    from dialogen.cli import main

    assert main(["serve", "--db", "postgresql://postgres:secret@127.0.0.1:1/none", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot connect to PostgreSQL" in err and "secret" not in err


def test_keys_and_ownership_hold_across_replicas(tiny_llama, pg_dsn):
    import httpx

    from dialogen.serve.launch import ServerProcess

    args = ["--model", str(tiny_llama[0]), "--template", "chatml", "--db", pg_dsn, "--api-key", "key-one",
            "--api-key", "key-two"]
    a = ServerProcess(args).start()
    try:
        b = ServerProcess(args).start()
    except BaseException:
        a.stop()
        raise
    one, two = ({"Authorization": f"Bearer {k}"} for k in ("key-one", "key-two"))
    try:
        sid = httpx.post(a.url + "/v1/sessions", json={}, headers=one).json()["id"]
        r = httpx.post(f"{b.url}/v1/sessions/{sid}/messages", json={"content": "hi", "max_tokens": 3}, headers=one,
                       timeout=120)
        assert r.status_code == 200  # the other replica serves the owner's session
        assert httpx.get(f"{b.url}/v1/sessions/{sid}", headers=two).status_code == 404  # not another key's
        assert httpx.get(f"{a.url}/v1/sessions/{sid}").status_code == 401
        assert [s["id"] for s in httpx.get(f"{b.url}/v1/sessions", headers=one).json()["data"]] == [sid]
        assert httpx.get(f"{a.url}/v1/sessions", headers=two).json()["data"] == []
    finally:
        a.stop()
        b.stop()


def test_a_database_restart_gives_503s_then_recovers_without_losing_a_turn(tiny_llama, pg_cluster, pg_dsn):
    """Two clients keep sending turns while PostgreSQL restarts: 503 with Retry-After (never 500)
    while it is down, /ready fails and /health answers, turns go through again within 10 s of it
    coming back, and every acknowledged turn is stored once."""
    import httpx

    from dialogen.serve.launch import ServerProcess

    stop, log = threading.Event(), {0: [], 1: []}  # client -> [(content, status, finished at, retry-after)]
    srv = ServerProcess(["--model", str(tiny_llama[0]), "--template", "chatml", "--db", pg_dsn]).start()
    sids = [httpx.post(srv.url + "/v1/sessions", json={}).json()["id"] for _ in range(2)]

    def client(k):
        with httpx.Client(timeout=60) as http:
            for i in range(10_000):
                if stop.is_set():
                    return
                r = http.post(f"{srv.url}/v1/sessions/{sids[k]}/messages",
                              json={"content": f"c{k} turn {i}", "max_tokens": 2, "temperature": 0})
                log[k].append((f"c{k} turn {i}", r.status_code, time.monotonic(), r.headers.get("retry-after")))
                time.sleep(0.05)

    def ok_since(k, t):
        return any(s == 200 and at > t for _, s, at, _ in log[k])

    threads = [threading.Thread(target=client, args=(k,)) for k in (0, 1)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while not all(sum(s == 200 for _, s, _, _ in log[k]) >= 3 for k in (0, 1)) and time.monotonic() < deadline:
            time.sleep(0.05)
        pg_cluster.halt()
        down = time.monotonic()
        while not all(any(s == 503 and at > down for _, s, at, _ in log[k]) for k in (0, 1)):
            assert time.monotonic() - down < 20, "no 503 while the database is down"
            time.sleep(0.05)
        assert httpx.get(srv.url + "/ready", timeout=10).status_code == 503
        assert httpx.get(srv.url + "/health", timeout=2).status_code == 200
        pg_cluster.resume()
        back = time.monotonic()
        while not all(ok_since(k, back) for k in (0, 1)):
            assert time.monotonic() - back < 10, "no recovery within 10 s of the database coming back"
            time.sleep(0.05)
        recovered = max(min(at for _, s, at, _ in log[k] if s == 200 and at > back) for k in (0, 1)) - back
        print(f"turns served again {recovered:.2f} s after the database came back")
        assert httpx.get(srv.url + "/ready", timeout=10).status_code == 200
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        srv.stop()
    for k in (0, 1):
        statuses = {s for _, s, _, _ in log[k]}
        assert statuses <= {200, 503}, statuses
        assert all(ra == "2" for _, s, _, ra in log[k] if s == 503)
        from dialogen.serve.pgstore import PgStore

        store = PgStore(pg_dsn)
        try:
            msgs = store.get(sids[k], "")["messages"]
        finally:
            store.close()
        users = [m["content"] for m in msgs if m["role"] == "user"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * len(users)
        sent = [c for c, _, _, _ in log[k]]
        acked = [c for c, s, _, _ in log[k] if s == 200]
        assert len(set(users)) == len(users) and set(acked) <= set(users)  # none lost, none twice
        assert users == [c for c in sent if c in users]  # in the order sent; a 503'd one at most once


def _feedback_script(store):
    """Ratings, variants and picks on a store; what a client could observe of them (ids and times left out)."""
    from dialogen.serve.feedback_store import Stale

    sid = store.create("owner", "be brief", {}, "")["id"]
    assert store.add_turn(sid, "hi", "hello", {"finish_reason": "stop"})
    out = [store.rate(sid, 1, 0, "up", "good"), store.rate(sid, 0, 0, "up", None), store.rate(sid, 1, 1, "up", None)]
    out += [store.add_variant(sid, 1, "hey", {"finish_reason": "length"}), store.add_variant(sid, 1, "yo", None)]
    out += [store.rate(sid, 1, 2, "down", ""), store.pick(sid, 1, 2, 0), store.pick(sid, 1, 0, 2)]
    out.append([{k: v for k, v in m.items() if k != "created"} for m in store.get(sid, "owner")["messages"]])
    assert store.add_turn(sid, "more", "sure", expected=2)
    with pytest.raises(Stale):
        store.add_variant(sid, 1, "late", None)
    with pytest.raises(Stale):
        store.pick(sid, 1, 1, 0)
    out += [store.add_variant("sess_missing", 1, "x", None), store.rate("sess_missing", 1, 0, "up", None)]
    out.append([{**s, "id": None} for s in store.feedback_sessions()])
    out += [store.delete(sid, "owner"), store.feedback_sessions()]
    return out


def test_feedback_behaves_as_on_sqlite(pg_dsn, tmp_path):
    from dialogen.serve.pgstore import PgStore

    pg, lite = PgStore(pg_dsn), Store(tmp_path / "s.db")
    try:
        got = _feedback_script(lite)
        assert _feedback_script(pg) == got
    finally:
        pg.close()
        lite.close()
    assert got[:8] == [True, False, False, 1, 2, True, {"role": "assistant", "content": "yo", "variant": 2},
                       {"role": "assistant", "content": "hello", "finish_reason": "stop", "variant": 0}]
    assert got[8][1]["variants"] == [{"variant": 0, "content": "hello", "feedback": {"rating": "up", "comment": "good"}},
                                     {"variant": 1, "content": "hey"},
                                     {"variant": 2, "content": "yo", "feedback": {"rating": "down", "comment": None}}]
    assert got[8][1]["feedback"] == {"rating": "up", "comment": "good"} and got[9:11] == [None, False]
    assert got[11][0]["picks"] == [(1, 0, 2)] and got[12:] == [True, []]  # a deleted session's feedback goes with it


def test_a_version_1_database_gains_the_feedback_tables(pg_dsn, tmp_path, capsys):
    import psycopg

    from dialogen.cli import main
    from dialogen.serve.pgstore import SCHEMA_VERSION, PgStore
    from dialogen.serve.store import FEEDBACK_TABLES, SCHEMA

    old = SCHEMA.replace(FEEDBACK_TABLES, "").replace(" REAL ", " DOUBLE PRECISION ")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE dialogen_schema (version INTEGER NOT NULL); INSERT INTO dialogen_schema VALUES (1);"
                     + old)
        conn.execute("INSERT INTO sessions VALUES ('sess_1', 'o', 1, 2, NULL, '{}', 'hi')")
        conn.execute("INSERT INTO messages VALUES ('sess_1', 0, 'user', 'hi', 1, NULL), "
                     "('sess_1', 1, 'assistant', 'hello', 2, NULL)")
    store = PgStore(pg_dsn)
    try:
        assert [m["content"] for m in store.get("sess_1", "o")["messages"]] == ["hi", "hello"]
        assert store.add_variant("sess_1", 1, "hey", None) == 1 and store.pick("sess_1", 1, 1, 0)
    finally:
        store.close()
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT version FROM dialogen_schema").fetchall() == [(SCHEMA_VERSION,)]
    out = tmp_path / "prefs.jsonl"
    assert main(["export-feedback", "--db", pg_dsn, "--out", str(out)]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hey"}],
         "rejected": [{"role": "assistant", "content": "hello"}], "source": "pick", "session_id": "sess_1",
         "message_index": 1}]
