"""Feedback from use: ratings, regenerated replies and picks through the session API (the real app
in this process, on a tiny model), kept with the turns in the store; an old database file gaining
the tables; `dialogen export-feedback` writing DPO records that `dialogen train --dpo` trains on."""

import json
import sqlite3

import pytest
from inprocess import InProcessServer

from dialogen.cli import main
from dialogen.data.preferences import read_preferences
from dialogen.serve.feedback_export import preference_records
from dialogen.serve.store import Store

K1, K2 = "key-one", "key-two"
H1, H2 = ({"Authorization": f"Bearer {k}"} for k in (K1, K2))


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return tmp_path_factory.mktemp("feedback") / "sessions.db"


@pytest.fixture(scope="module")
def srv(tiny_llama, db):
    s = InProcessServer(tiny_llama[0], db, max_tokens=8, keys=[K1, K2])
    yield s
    s.close()


def _post(srv, path, body, headers=H1):
    return srv.request("POST", path, json=body, headers=headers)


def _session(srv, persona="You are terse.", first="Hello there"):
    sid = _post(srv, "/v1/sessions", {"persona": persona}).json()["id"]
    r = _post(srv, f"/v1/sessions/{sid}/messages", {"content": first, "temperature": 0})
    assert r.status_code == 200, r.text
    return sid, r.json()["message"]["content"]


def _get(srv, sid, headers=H1):
    return srv.request("GET", f"/v1/sessions/{sid}", headers=headers).json()


def _error(r, status: int, param: str | None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and "\n" not in err["message"], err
    return err


def test_a_rating_is_kept_with_the_turn_and_only_its_owner_sees_it(srv):
    sid, reply = _session(srv)
    r = _post(srv, f"/v1/sessions/{sid}/messages/1/feedback", {"rating": "up"})
    assert r.status_code == 200 and r.json() == {"object": "session.feedback", "session_id": sid, "message_index": 1,
                                                 "variant": 0, "rating": "up", "comment": None}
    assert _get(srv, sid)["messages"][1]["feedback"] == {"rating": "up", "comment": None}
    assert _post(srv, f"/v1/sessions/{sid}/messages/1/feedback", {"rating": "down", "comment": "too short"}).status_code == 200
    msgs = _get(srv, sid)["messages"]
    assert msgs[1]["feedback"] == {"rating": "down", "comment": "too short"} and msgs[1]["content"] == reply
    assert "feedback" not in msgs[0]
    # another key's request is told the session does not exist; no key at all is a 401
    _error(_post(srv, f"/v1/sessions/{sid}/messages/1/feedback", {"rating": "up"}, H2), 404, "session_id")
    _error(_post(srv, f"/v1/sessions/{sid}/messages/1/regenerate", {}, H2), 404, "session_id")
    _error(_post(srv, f"/v1/sessions/{sid}/messages/1/preference", {"chosen": 1, "rejected": 0}, H2), 404, "session_id")
    assert _post(srv, f"/v1/sessions/{sid}/messages/1/feedback", {"rating": "up"}, {}).status_code == 401
    assert _get(srv, sid)["messages"][1]["feedback"]["rating"] == "down"


@pytest.mark.parametrize("index, body, status, param", [
    ("1", {}, 400, "rating"),
    ("1", {"rating": "meh"}, 400, "rating"),
    ("1", {"rating": True}, 400, "rating"),
    ("1", {"rating": "up", "comment": 5}, 400, "comment"),
    ("1", {"rating": "up", "comment": "x" * 4001}, 400, "comment"),
    ("1", {"rating": "up", "variant": -1}, 400, "variant"),
    ("1", {"rating": "up", "variant": 1}, 404, "variant"),
    ("0", {"rating": "up"}, 400, "message_index"),
    ("2", {"rating": "up"}, 404, "message_index"),
    ("one", {"rating": "up"}, 400, "message_index"),
    ("-1", {"rating": "up"}, 400, "message_index"),
])
def test_bad_feedback_is_refused_naming_the_field(srv, index, body, status, param):
    sid, _ = _session(srv)
    _error(_post(srv, f"/v1/sessions/{sid}/messages/{index}/feedback", body), status, param)
    assert "feedback" not in _get(srv, sid)["messages"][1]


def _events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def test_regenerate_then_pick_and_the_conversation_goes_on_from_the_chosen_reply(srv, tiny_llama, db):
    # a second server on the same database answers the first turn, and keeps its copy of the session
    other = InProcessServer(tiny_llama[0], db, max_tokens=8, keys=[K1, K2])
    try:
        sid, first = _session(other)
        r = _post(srv, f"/v1/sessions/{sid}/messages/1/regenerate", {"temperature": 1.5, "seed": 3})
        assert r.status_code == 200, r.text
        alt = r.json()
        assert alt["object"] == "session.turn" and alt["message_index"] == 1 and alt["variant"] == 1
        assert alt["message"]["content"] != first
        shown = _get(srv, sid)["messages"]
        assert len(shown) == 2 and shown[1]["content"] == first and shown[1]["variant"] == 0  # the history is as it was
        assert shown[1]["variants"] == [{"variant": 0, "content": first}, {"variant": 1, "content": alt["message"]["content"]}]
        streamed = _post(srv, f"/v1/sessions/{sid}/messages/1/regenerate", {"stream": True, "temperature": 1.5, "seed": 4})
        events = _events(streamed.text)
        assert events[-1]["variant"] == 2 and events[-1]["message_index"] == 1
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices"))
        assert _get(srv, sid)["messages"][1]["variants"][2]["content"] == text
        _error(_post(srv, f"/v1/sessions/{sid}/messages/1/preference", {"chosen": 1, "rejected": 1}), 400, "rejected")
        _error(_post(srv, f"/v1/sessions/{sid}/messages/1/preference", {"chosen": 1, "rejected": 7}), 404, "rejected")
        _error(_post(srv, f"/v1/sessions/{sid}/messages/1/preference", {"chosen": 1}), 400, "rejected")
        held = srv.svc.store.claim(sid)  # as a turn generating on either server holds it
        for what, body in (("preference", {"chosen": 1, "rejected": 0}), ("regenerate", {})):
            assert _error(_post(srv, f"/v1/sessions/{sid}/messages/1/{what}", body), 409, None)["code"] == "session_busy"
        srv.svc.store.release(sid, held)
        r = _post(srv, f"/v1/sessions/{sid}/messages/1/preference", {"chosen": 1, "rejected": 0})
        assert r.status_code == 200 and r.json()["message"]["content"] == alt["message"]["content"]
        msgs = _get(srv, sid)["messages"]
        assert msgs[1]["content"] == alt["message"]["content"] and msgs[1]["variant"] == 1
        # the next turn, on the other server, answers the conversation with the chosen reply in it
        nxt = _post(other, f"/v1/sessions/{sid}/messages", {"content": "And then?", "temperature": 0}).json()
        fresh = _post(srv, "/v1/chat/completions", {"messages": [
            {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": alt["message"]["content"]}, {"role": "user", "content": "And then?"}],
            "temperature": 0}).json()
        assert nxt["message"]["content"] == fresh["choices"][0]["message"]["content"]
    finally:
        other.close()
    # only the last reply can be regenerated or picked; a pick needs two replies
    _error(_post(srv, f"/v1/sessions/{sid}/messages/1/regenerate", {}), 409, "message_index")
    _error(_post(srv, f"/v1/sessions/{sid}/messages/1/preference", {"chosen": 0, "rejected": 1}), 409, "message_index")
    _error(_post(srv, f"/v1/sessions/{sid}/messages/3/preference", {"chosen": 1, "rejected": 0}), 400, "message_index")
    _error(_post(srv, f"/v1/sessions/{sid}/messages/3/regenerate", {"temperature": 7}), 400, "temperature")
    assert len(_get(srv, sid)["messages"]) == 4


OLD_SCHEMA = """
CREATE TABLE sessions (id TEXT PRIMARY KEY, owner TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
                       persona TEXT, settings TEXT NOT NULL, title TEXT NOT NULL DEFAULT '');
CREATE INDEX sessions_by_owner ON sessions (owner, updated);
CREATE TABLE messages (session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE, seq INTEGER NOT NULL,
                       role TEXT NOT NULL, content TEXT NOT NULL, created REAL NOT NULL, meta TEXT,
                       PRIMARY KEY (session_id, seq));
CREATE TABLE claims (session_id TEXT PRIMARY KEY REFERENCES sessions (id) ON DELETE CASCADE, holder TEXT NOT NULL,
                     process TEXT NOT NULL, expires REAL NOT NULL);
"""


def test_an_old_database_file_opens_and_gains_the_tables(tmp_path):
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(OLD_SCHEMA)
    con.execute("INSERT INTO sessions VALUES ('sess_1', 'o', 1.0, 2.0, 'be kind', '{\"temperature\": 0.5}', 'hi')")
    con.execute("INSERT INTO messages VALUES ('sess_1', 0, 'user', 'hi', 1.0, NULL)")
    con.execute("INSERT INTO messages VALUES ('sess_1', 1, 'assistant', 'hello', 2.0, '{\"finish_reason\": \"stop\"}')")
    con.commit()
    con.close()
    store = Store(path)
    try:
        row = store.get("sess_1", "o")
        assert row["persona"] == "be kind" and row["settings"] == {"temperature": 0.5} and row["title"] == "hi"
        assert [(m["role"], m["content"], m.get("finish_reason")) for m in row["messages"]] == [
            ("user", "hi", None), ("assistant", "hello", "stop")]
        assert store.rate("sess_1", 1, 0, "up", "nice")
        assert store.get("sess_1", "o")["messages"][1]["feedback"] == {"rating": "up", "comment": "nice"}
    finally:
        store.close()
    con = sqlite3.connect(path)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"sessions", "messages", "claims", "variants", "ratings", "picks"} <= tables
    assert con.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 2
    con.close()


def _s(sid, messages, variants=None, ratings=None, picks=(), persona=None):
    return {"id": sid, "persona": persona, "messages": dict(enumerate(messages)), "variants": variants or {},
            "ratings": ratings or {}, "picks": list(picks)}


def test_pairs_come_from_picks_and_from_up_and_down_ratings_of_one_prompt():
    hi = ("user", "hi")
    sessions = [
        _s("a", [hi, ("assistant", "hello!")], ratings={(1, 0): "up"}),
        _s("b", [hi, ("assistant", "go away")], ratings={(1, 0): "down"}),
        _s("c", [hi, ("assistant", "hey")], ratings={(1, 0): "down"}, persona="be nice"),  # another prompt
        _s("d", [hi, ("assistant", "B"), ("user", "more"), ("assistant", "x")],
           variants={(3, 0): "x", (3, 1): "y", (3, 2): "x"}, picks=[(3, 1, 0), (3, 2, 0)],
           ratings={(3, 0): "up", (3, 1): "down", (3, 2): "down"}),
    ]
    records, counts = preference_records(sessions)
    got = [(r["prompt"], r["chosen"][0]["content"], r["rejected"][0]["content"], r["source"]) for r in records]
    long_prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "B"},
                   {"role": "user", "content": "more"}]
    assert got == [
        (long_prompt, "y", "x", "pick"),  # the pick of variant 2 over 0 has the same text on both sides: left out
        ([{"role": "user", "content": "hi"}], "hello!", "go away", "ratings"),  # two sessions, one prompt
    ]  # in d, "x" up over "y" down is the reverse of a pick (the pick stands), "x" over "x" is no preference
    assert counts == {"records": 2, "from_picks": 1, "from_ratings": 1, "ratings_without_a_pair": 4, "sessions": 4}


def _dpo(tiny, data, out, steps):
    return main(["train", "--dpo", "--init", str(tiny), "--data", str(data), "--out", str(out), "--template", "chatml",
                 "--lora-r", "4", "--max-len", "128", "--batch-size", "16", "--max-steps", str(steps), "--lr", "1e-2",
                 "--warmup-steps", "1", "--dpo-beta", "0.5"])


def test_exported_feedback_trains_dpo_and_widens_the_chosen_replys_margin(srv, tiny_llama, db, tmp_path, capsys):
    picked = []
    for i in range(5):  # regenerate and pick: the page's "better of two"
        sid, first = _session(srv, first=f"Question number {i}?")
        alt = _post(srv, f"/v1/sessions/{sid}/messages/1/regenerate", {"temperature": 1.5, "seed": 10 + i}).json()
        assert _post(srv, f"/v1/sessions/{sid}/messages/1/preference", {"chosen": 1, "rejected": 0}).status_code == 200
        picked.append((sid, alt["message"]["content"], first))
    up, _ = _session(srv, first="Same start")
    _post(srv, f"/v1/sessions/{up}/messages", {"content": "Go on", "temperature": 1.5, "seed": 1})
    down, _ = _session(srv, first="Same start")
    _post(srv, f"/v1/sessions/{down}/messages", {"content": "Go on", "temperature": 1.5, "seed": 2})
    for sid, rating in ((up, "up"), (down, "down")):  # the second replies answer the same conversation
        assert _post(srv, f"/v1/sessions/{sid}/messages/3/feedback", {"rating": rating}).status_code == 200
    out = tmp_path / "prefs.jsonl"
    capsys.readouterr()
    assert main(["export-feedback", "--db", str(db), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["records"] == len(records) and summary["out"] == str(out)
    mine = {r["session_id"]: r for r in records if r["session_id"] in {p[0] for p in picked} | {up}}
    for sid, chosen, rejected in picked:
        assert mine[sid]["prompt"] == [{"role": "system", "content": "You are terse."},
                                       {"role": "user", "content": _get(srv, sid)["messages"][0]["content"]}]
        assert mine[sid]["chosen"] == [{"role": "assistant", "content": chosen}]
        assert mine[sid]["rejected"] == [{"role": "assistant", "content": rejected}] and mine[sid]["source"] == "pick"
    both = [_get(srv, sid)["messages"] for sid in (up, down)]
    assert mine[up]["prompt"][1:] == [{"role": m["role"], "content": m["content"]} for m in both[0][:3]]
    assert (mine[up]["chosen"][0]["content"], mine[up]["rejected"][0]["content"]) == (both[0][3]["content"],
                                                                                      both[1][3]["content"])
    assert len(read_preferences(out)) == len(records)  # what train --dpo reads
    assert _dpo(tiny_llama[0], out, tmp_path / "run", 6) == 0
    log = [json.loads(line) for line in open(tmp_path / "run/metrics.jsonl") if '"reward_margin"' in line]
    assert abs(log[0]["reward_margin"]) < 1e-6  # the adapter starts as the base: no margin yet
    assert log[-1]["reward_margin"] > 0.5 and log[-1]["reward_accuracy"] == 1.0


def test_export_refuses_a_missing_database_in_one_line(tmp_path, capsys):
    assert main(["export-feedback", "--db", str(tmp_path / "none.db"), "--out", str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "none.db: no such session database" in err
    Store(tmp_path / "s.db").close()
    assert main(["export-feedback", "--db", str(tmp_path / "s.db"), "--out", str(tmp_path / "no/p.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export-feedback", "--db", str(tmp_path / "s.db"), "--out", str(tmp_path / "p.jsonl")]) == 0
    assert (tmp_path / "p.jsonl").read_text() == "" and json.loads(capsys.readouterr().out)["records"] == 0
