"""One writer per session: two server processes on one SQLite file (and two replicas on one
PostgreSQL database), interleaved turns on the same sessions. No turn is lost or duplicated, a concurrent turn gets 409,
and every reply is computed
on the whole stored history (its prompt is that history, token for token)."""

import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from dialogen.chat.messages import Message
from dialogen.chat.templates import get_template
from dialogen.models.tokenizer import Tokenizer
from dialogen.serve.launch import ServerProcess
from dialogen.serve.store import Conflict, Store

PERSONA = "You are terse."
TURNS = 4  # per client; two clients per session, all within the tiny model's 256-token context


# --- the store alone ----------------------------------------------------------------------------
def test_claims_and_compare_and_set_between_two_connections(tmp_path):
    a, b = Store(tmp_path / "s.db"), Store(tmp_path / "s.db")  # as two processes would open it
    try:
        sid = a.create("", None, {})["id"]
        holder = a.claim(sid)
        assert holder and b.claim(sid) is None  # held by a live process (this one)
        a.release(sid, holder)
        held_b = b.claim(sid)
        assert held_b and a.claim(sid) is None
        b.release(sid, held_b)
        assert a.add_turn(sid, "u1", "r1", expected=0)
        with pytest.raises(Conflict):
            b.add_turn(sid, "u1 again", "r1 again", expected=0)  # computed on a history that has grown
        assert b.add_turn(sid, "u2", "r2", expected=2) and a.count(sid) == 4
        assert [m["content"] for m in a.get(sid, "")["messages"]] == ["u1", "r1", "u2", "r2"]
        expired = a.claim(sid, lease=-1)  # a lease already run out is free to take
        assert expired and b.claim(sid) is not None
    finally:
        a.close()
        b.close()


def test_a_dead_process_claim_is_free_at_once(tmp_path):
    db = tmp_path / "s.db"
    store = Store(db)
    sid = store.create("", None, {})["id"]
    code = f"from dialogen.serve.store import Store; print(Store({str(db)!r}).claim({sid!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() not in ("", "None")  # the child took it and exited without releasing
    try:
        assert store.claim(sid) is not None
    finally:
        store.close()


def test_a_restarted_process_with_the_same_pid_is_not_the_holder(tmp_path):
    """In a container a restarted server often gets the same pid: its start time tells them apart."""
    import os
    import sqlite3

    from dialogen.serve.store import process_key

    store = Store(tmp_path / "s.db")
    sid = store.create("", None, {})["id"]
    me = process_key(os.getpid())
    assert me is not None and store.claim(sid) is not None
    db = sqlite3.connect(tmp_path / "s.db")
    with db:
        db.execute("UPDATE claims SET process = ?", (f"{os.getpid()}:1",))  # same pid, another start time
    db.close()
    try:
        assert store.claim(sid) is not None
    finally:
        store.close()


# --- two servers ------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def new_db(tmp_path_factory, request):
    """name -> a fresh --db value: an SQLite file, or a database in the throwaway PostgreSQL."""
    if request.param == "postgres":
        return request.getfixturevalue("pg_cluster").new_database
    return lambda name: str(tmp_path_factory.mktemp(name) / "sessions.db")


def _two_servers(tiny_llama, db: str):
    args = ["--model", str(tiny_llama[0]), "--template", "chatml", "--db", db, "--temperature", "0"]
    a = ServerProcess(args).start()
    try:
        return a, ServerProcess(args).start()
    except BaseException:
        a.stop()
        raise


@pytest.fixture(scope="module")
def servers(tiny_llama, new_db):
    a, b = _two_servers(tiny_llama, new_db("writers"))
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def prompt_len(tiny_llama):
    tok = Tokenizer.from_dir(tiny_llama[0])
    template = get_template("chatml", tok)

    def count(messages: list[dict]) -> int:
        convo = [Message("system", PERSONA)] + [Message(m["role"], m["content"]) for m in messages]
        return len(template.render(tok, convo, add_generation_prompt=True)[0])

    return count


def _turn(srv, sid, text, max_tokens=6, **kw):
    return httpx.post(f"{srv.url}/v1/sessions/{sid}/messages", json={"content": text, "max_tokens": max_tokens, **kw},
                      timeout=300)


def _stored(srv, sid):
    return httpx.get(f"{srv.url}/v1/sessions/{sid}", timeout=30).json()["messages"]


def test_a_stale_server_reloads_the_history_and_rebuilds_its_cache(servers, prompt_len):
    a, b = servers
    sid = httpx.post(a.url + "/v1/sessions", json={"persona": PERSONA}).json()["id"]
    first = _turn(a, sid, "one").json()
    again = _turn(a, sid, "two").json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # a keeps the session's cache
    _turn(b, sid, "three")  # a's copy is now two messages short
    late = _turn(a, sid, "four").json()
    stored = _stored(a, sid)
    assert [m["content"] for m in stored if m["role"] == "user"] == ["one", "two", "three", "four"]
    assert late["usage"]["prompt_tokens"] == prompt_len(stored[:6] + [stored[6]])  # b's turn included
    assert late["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # rebuilt, not the stale cache
    assert first["message"]["content"] == stored[1]["content"]


def test_a_turn_while_the_other_server_generates_gets_409(servers):
    a, b = servers
    sid = httpx.post(a.url + "/v1/sessions", json={"persona": PERSONA}).json()["id"]
    body = {"content": "Talk for a while.", "max_tokens": 200, "stop": ["NEVER-SEEN"], "stream": True}
    with httpx.stream("POST", f"{a.url}/v1/sessions/{sid}/messages", json=body, timeout=120) as r:
        # a claimed the session before it answered; freeze it there, mid-turn, so that its reply cannot
        # finish (the tiny model writes 200 tokens in a fraction of a second) before b's turn arrives
        a.proc.send_signal(signal.SIGSTOP)
        try:
            busy = _turn(b, sid, "me too")
        finally:
            a.proc.send_signal(signal.SIGCONT)
        assert r.status_code == 200
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "session_busy"
        events = [line for line in r.iter_lines() if line.startswith("data: {")]  # a finishes its reply
        assert events
    stored = _stored(b, sid)
    assert [m["content"] for m in stored if m["role"] == "user"] == ["Talk for a while."]
    assert _turn(b, sid, "now me").status_code == 200  # free again once a's turn is committed


def test_interleaved_turns_lose_nothing_and_duplicate_nothing(servers, prompt_len):
    a, b = servers
    sessions = [httpx.post(a.url + "/v1/sessions", json={"persona": PERSONA}).json()["id"] for _ in range(2)]
    done, conflicts, errors = [], [0], []
    lock = threading.Lock()

    def client(srv, name, sid):
        for i in range(TURNS):
            text = f"{name} turn {i}"
            for _ in range(200):
                r = _turn(srv, sid, text, max_tokens=4)
                if r.status_code == 409:
                    with lock:
                        conflicts[0] += 1
                    time.sleep(0.005)
                    continue
                with lock:
                    (done if r.status_code == 200 else errors).append((sid, text, r.json()))
                break

    threads = [threading.Thread(target=client, args=(srv, f"{tag}{k}", sid))
               for k, sid in enumerate(sessions) for srv, tag in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:3]
    assert len(done) == 4 * TURNS
    for sid in sessions:
        stored = _stored(b, sid)
        users = [m["content"] for m in stored if m["role"] == "user"]
        sent = sorted(text for s, text, _ in done if s == sid)
        assert sorted(users) == sent and len(set(users)) == 2 * TURNS  # 0 lost, 0 duplicated
        assert [m["role"] for m in stored] == ["user", "assistant"] * (2 * TURNS)
        for s, text, reply in done:
            if s != sid:
                continue
            i = next(k for k, m in enumerate(stored) if m["role"] == "user" and m["content"] == text)
            assert reply["message"]["content"] == stored[i + 1]["content"]
            # computed on every message stored before it, whichever server wrote them
            assert reply["usage"]["prompt_tokens"] == prompt_len(stored[: i + 1])
    assert conflicts[0] > 0  # the two servers did contend for the same sessions


def test_32_clients_round_robin_over_two_servers(servers, prompt_len):
    """Every turn goes to the other server than the last (no affinity, as replicas behind a load
    balancer): each rebuilds the session from the stored history. 0 errors, 0 lost, 0 duplicated,
    every reply on the full stored history."""
    turns = 3
    sessions = [httpx.post(servers[0].url + "/v1/sessions", json={"persona": PERSONA}).json()["id"]
                for _ in range(32)]
    results, errors = {sid: [] for sid in sessions}, []

    def client(k, sid):
        for i in range(turns):
            r = _turn(servers[(k + i) % 2], sid, f"client {k} turn {i}", max_tokens=4)
            if r.status_code != 200:
                errors.append((sid, r.status_code, r.text))
                return
            results[sid].append(r.json())

    threads = [threading.Thread(target=client, args=(k, sid)) for k, sid in enumerate(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors[:3]
    for k, sid in enumerate(sessions):
        stored = _stored(servers[1], sid)
        assert [m["content"] for m in stored if m["role"] == "user"] == [f"client {k} turn {i}" for i in range(turns)]
        assert [m["role"] for m in stored] == ["user", "assistant"] * turns
        for i, reply in enumerate(results[sid]):
            assert reply["message"]["content"] == stored[2 * i + 1]["content"]
            assert reply["usage"]["prompt_tokens"] == prompt_len(stored[: 2 * i + 1])


def test_a_server_killed_mid_stream_loses_no_committed_turn(tiny_llama, new_db, prompt_len):
    """kill -9 while streaming: the other server goes on with the session at once (the dead one's
    claim ends with it), on the committed history; the cut-off turn was never written."""
    import os
    import signal

    a, b = _two_servers(tiny_llama, new_db("killed"))
    try:
        sid = httpx.post(a.url + "/v1/sessions", json={"persona": PERSONA}).json()["id"]
        assert _turn(a, sid, "kept").status_code == 200
        body = {"content": "Talk for a while.", "max_tokens": 200, "stop": ["NEVER-SEEN"], "stream": True}
        with httpx.stream("POST", f"{a.url}/v1/sessions/{sid}/messages", json=body, timeout=120) as r:
            # a claimed the session before it answered: kill it now, before the tiny model's quick reply ends
            os.kill(a.proc.pid, signal.SIGKILL)
            a.proc.wait()
        r = _turn(b, sid, "after the crash")
        assert r.status_code == 200, r.text
        stored = _stored(b, sid)
        assert [m["content"] for m in stored if m["role"] == "user"] == ["kept", "after the crash"]
        assert r.json()["usage"]["prompt_tokens"] == prompt_len(stored[:3])
    finally:
        a.stop()
        b.stop()
