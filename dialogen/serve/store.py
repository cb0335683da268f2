"""Sessions on disk: SQLite in WAL mode, one transaction per completed turn.

A turn (the user message and the reply) is written in one transaction with synchronous=FULL,
so once the client has seen the turn complete it survives a crash or `kill -9`; a turn cut off
mid-reply was never written. Sessions belong to an owner (a hash of the API key that made
them, never the key itself); every read and write is scoped to the owner.

One writer per session, even with several server processes on one file: a turn first takes the
session's claim (a row naming the holder's process by pid and start time, with a lease it renews
while it generates; a dead process's claim is free at once, a live one's when its lease runs
out), and is appended only if the session still has the message count its reply was computed on
(compare-and-set).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from .feedback_store import FEEDBACK_TABLES, Feedback

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    persona TEXT,
    settings TEXT NOT NULL,
    title TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions (owner, updated);
CREATE TABLE IF NOT EXISTS messages (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created REAL NOT NULL,
    meta TEXT,
    PRIMARY KEY (session_id, seq)
);
""" + FEEDBACK_TABLES
CLAIMS = """
CREATE TABLE IF NOT EXISTS claims (
    session_id TEXT PRIMARY KEY REFERENCES sessions (id) ON DELETE CASCADE,
    holder TEXT NOT NULL,
    process TEXT NOT NULL,
    expires REAL NOT NULL
);
"""
CLAIM_LEASE = 120.0  # seconds a claim holds without renewal; a generating turn renews it


class Conflict(Exception):
    """The session's stored history is not the one a turn was computed on (another writer)."""


class StoreUnavailable(Exception):
    """The database cannot be reached or written for now (down, restarting, locked, I/O error);
    the HTTP layer answers 503 with Retry-After. Nothing of the operation was stored."""


def guarded(method):
    """Run a store method under the store's `_faults()`: its driver's transient errors become
    StoreUnavailable."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._faults():
            return method(self, *args, **kwargs)

    return run

# SQLite's primary result codes of a database that is there but cannot be used for now
TRANSIENT = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL,
             sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PROTOCOL}


class Reads:
    """The reads both stores share, written once: SQL with '?' placeholders (`_sql` rewrites them
    for another driver), run on `self._db` inside `self._snapshot()`."""

    def _sql(self, query: str) -> str:
        return query

    def _snapshot(self):
        return self._lock

    @contextmanager
    def _faults(self):
        yield

    def _fetch(self, query: str, args: tuple, one: bool = False):
        cur = self._db.execute(self._sql(query), args)
        return cur.fetchone() if one else cur.fetchall()

    @guarded
    def get(self, sid: str, owner: str) -> dict | None:
        """The session with its messages, or None when it does not exist for this owner."""
        with self._snapshot():  # the row and its messages from one state of the database
            row = self._fetch("SELECT * FROM sessions WHERE id = ? AND owner = ?", (sid, owner), one=True)
            if row is None:
                return None
            msgs = self._fetch("SELECT role, content, created, meta FROM messages WHERE session_id = ? ORDER BY seq",
                               (sid,))
            notes = self._feedback_of(sid)
        out = _session(row)
        out["messages"] = [_message(m) for m in msgs]
        annotate(out["messages"], *notes)
        return out

    @guarded
    def list(self, owner: str, limit: int = 100) -> list[dict]:
        with self._snapshot():
            rows = self._fetch("SELECT s.*, (SELECT COUNT(*) FROM messages m WHERE m.session_id = s.id) AS n "
                               "FROM sessions s WHERE owner = ? ORDER BY updated DESC LIMIT ?", (owner, limit))
        return [{**_session(r), "message_count": r["n"]} for r in rows]

    @guarded
    def count(self, sid: str) -> int | None:
        """How many messages the session has stored (None when it does not exist)."""
        with self._snapshot():
            row = self._fetch("SELECT (SELECT COUNT(*) FROM messages WHERE session_id = ?) AS n FROM sessions "
                              "WHERE id = ?", (sid, sid), one=True)
        return None if row is None else row["n"]

    @guarded
    def tail(self, sid: str) -> tuple[int, str | None] | None:
        """(how many messages the session has stored, the last one's content); None when it does
        not exist. A kept copy whose tail differs is stale: another server wrote turns or a pick."""
        with self._snapshot():
            row = self._fetch("SELECT (SELECT COUNT(*) FROM messages WHERE session_id = ?) AS n, (SELECT content FROM "
                              "messages WHERE session_id = ? ORDER BY seq DESC LIMIT 1) AS last FROM sessions WHERE id = ?",
                              (sid, sid, sid), one=True)
        return None if row is None else (row["n"], row["last"])

    def _feedback_of(self, sid: str) -> tuple[list, list]:
        """(variants, ratings) rows of a session, inside the caller's snapshot."""
        variants = self._fetch("SELECT seq, variant, content FROM variants WHERE session_id = ? ORDER BY seq, variant",
                               (sid,))
        ratings = self._fetch("SELECT seq, variant, rating, comment FROM ratings WHERE session_id = ?", (sid,))
        return variants, ratings


def annotate(messages: list[dict], variants, ratings):
    """Add to each assistant message (index = seq) its `variant` (the one shown) and `variants`
    (when regenerated), and `feedback` ({"rating", "comment"}) of the one shown, also on each variant."""
    notes = {(r["seq"], r["variant"]): {"rating": r["rating"], "comment": r["comment"]} for r in ratings}
    for v in variants:
        if v["seq"] >= len(messages):
            continue
        m = messages[v["seq"]]
        m.setdefault("variant", 0)
        entry = {"variant": v["variant"], "content": v["content"]}
        if (v["seq"], v["variant"]) in notes:
            entry["feedback"] = notes[v["seq"], v["variant"]]
        m.setdefault("variants", []).append(entry)
    for (seq, variant), note in notes.items():
        if seq < len(messages) and messages[seq].get("variant", 0) == variant:
            messages[seq]["feedback"] = note


class Store(Reads, Feedback):
    def __init__(self, path: str | Path, busy_timeout: float = 5.0):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # a write waits up to `busy_timeout` seconds for another process's; then StoreUnavailable
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                       timeout=busy_timeout)
            self._db.row_factory = sqlite3.Row
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA + CLAIMS)
        except (OSError, sqlite3.Error) as e:
            raise UserError(f"--db {self.path}: cannot open the session database ({e})") from None
        if mode.lower() != "wal":
            raise UserError(f"--db {self.path}: the file system does not support SQLite WAL mode")
        self._lock = threading.Lock()

    def close(self):
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self):
        """A write transaction (the whole file's: SQLite serialises writers)."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            yield self._db

    def journal_mode(self) -> str:
        with self._lock:
            return self._db.execute("PRAGMA journal_mode").fetchone()[0]

    @contextmanager
    def _faults(self):
        try:
            yield
        except sqlite3.OperationalError as e:
            if (getattr(e, "sqlite_errorcode", 0) & 0xFF) not in TRANSIENT:
                raise
            raise StoreUnavailable(f"the session database {self.path} is unavailable ({e})") from None

    @guarded
    def ping(self):
        """Raise StoreUnavailable unless the database answers a read (the readiness check)."""
        with self._lock:
            self._db.execute("SELECT 1 FROM sessions LIMIT 1").fetchall()

    # --- sessions -------------------------------------------------------------------------
    @guarded
    def create(self, owner: str, persona: str | None, settings: dict, title: str = "") -> dict:
        sid = "sess_" + secrets.token_hex(12)
        now = time.time()
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT INTO sessions (id, owner, created, updated, persona, settings, title) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)", (sid, owner, now, now, persona, json.dumps(settings), title))
        return {"id": sid, "created": now, "updated": now, "persona": persona, "settings": settings, "title": title}

    @guarded
    def delete(self, sid: str, owner: str) -> bool:
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            cur = self._db.execute("DELETE FROM sessions WHERE id = ? AND owner = ?", (sid, owner))
        return cur.rowcount > 0

    @guarded
    def claim(self, sid: str, lease: float = CLAIM_LEASE) -> str | None:
        """Take the session for one turn: a holder token, or None while another turn holds it."""
        holder, now = secrets.token_hex(8), time.time()
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT process, expires FROM claims WHERE session_id = ?", (sid,)).fetchone()
            if row is not None and row["expires"] > now and _running(row["process"]):
                return None
            self._db.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?)",
                             (sid, holder, process_key(os.getpid()), now + lease))
        return holder

    @guarded
    def renew(self, sid: str, holder: str, lease: float = CLAIM_LEASE):
        with self._lock, self._db:
            self._db.execute("UPDATE claims SET expires = ? WHERE session_id = ? AND holder = ?",
                             (time.time() + lease, sid, holder))

    @guarded
    def release(self, sid: str, holder: str):
        with self._lock, self._db:
            self._db.execute("DELETE FROM claims WHERE session_id = ? AND holder = ?", (sid, holder))

    @guarded
    def add_turn(self, sid: str, user: str, reply: str, meta: dict | None = None, expected: int | None = None) -> bool:
        """Append a user message and its reply atomically; False if the session is gone.

        With `expected`, only onto a history of that many messages; else `Conflict`."""
        now = time.time()
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT title, (SELECT COALESCE(MAX(seq), -1) FROM messages WHERE session_id = ?), "
                                   "(SELECT COUNT(*) FROM messages WHERE session_id = ?) FROM sessions WHERE id = ?",
                                   (sid, sid, sid)).fetchone()
            if row is None:
                return False
            if expected is not None and row[2] != expected:
                raise Conflict(f"session '{sid}' has {row[2]} stored messages; the turn was computed on {expected}")
            title, seq = row[0], row[1] + 1
            self._db.execute("INSERT INTO messages VALUES (?, ?, 'user', ?, ?, NULL)", (sid, seq, user, now))
            self._db.execute("INSERT INTO messages VALUES (?, ?, 'assistant', ?, ?, ?)",
                             (sid, seq + 1, reply, now, json.dumps(meta) if meta else None))
            self._db.execute("UPDATE sessions SET updated = ?, title = ? WHERE id = ?",
                             (now, title or _title(user), sid))
        return True


def process_key(pid: int) -> str | None:
    """'pid:start time' of a running process (Linux: a restarted server that got the same pid, as
    in a container, is told apart), else 'pid'; None when no process has this pid. SQLite WAL
    files are shared on one machine only, so the claims' processes are this machine's."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f"{pid}:{f.read().rsplit(b')', 1)[1].split()[19].decode()}"
    except FileNotFoundError:
        return None if os.path.isdir("/proc/self") else _kill_probe(pid)
    except (OSError, IndexError):
        return _kill_probe(pid)


def _kill_probe(pid: int) -> str | None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:  # it exists, under another user
        pass
    return str(pid)


def _running(process: str) -> bool:
    pid = process.split(":", 1)[0]
    return pid.isdigit() and process_key(int(pid)) in (process, pid)


def _title(text: str, n: int = 60) -> str:
    line = " ".join(text.split())
    return line if len(line) <= n else line[: n - 1] + "…"


def _session(row) -> dict:
    return {"id": row["id"], "created": row["created"], "updated": row["updated"], "persona": row["persona"],
            "settings": json.loads(row["settings"]), "title": row["title"]}


def _message(row) -> dict:
    out = {"role": row["role"], "content": row["content"], "created": row["created"]}
    if row["meta"]:
        out.update(json.loads(row["meta"]))
    return out
