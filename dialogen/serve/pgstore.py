"""Sessions on PostgreSQL, for several server replicas sharing one store (`--db postgresql://...`).

The same schema and behaviour as the SQLite store (store.py), through psycopg 3:
- a turn (the user message and the reply) is one transaction, committed before the client hears
  the turn is done, and appended only onto the message count its reply was computed on
  (compare-and-set under the session row's lock), so a turn is never lost nor applied twice;
- one writer per session across replicas: a turn holds a PostgreSQL advisory lock on the session
  for its duration, on a connection of its own. The lock ends with the turn, or with the
  connection when a replica dies (even by kill -9), so another replica can go on at once;
- the schema is created idempotently (under a lock, as replicas start together) and its version
  recorded; a database written by a newer dialogen is refused.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from contextlib import contextmanager

from ..errors import UserError
from .store import SCHEMA as TABLES, Conflict, Reads, _title

SCHEMA_VERSION = 1
# the SQLite store's tables, with PostgreSQL's name for a double; turn claims are advisory locks
SCHEMA = "CREATE TABLE IF NOT EXISTS dialogen_schema (version INTEGER NOT NULL);" + TABLES.replace(
    " REAL ", " DOUBLE PRECISION ")
SCHEMA_LOCK = 0x6469616C6F67656E  # advisory lock key held while creating or upgrading the schema


def is_postgres(db: str) -> bool:
    return str(db).startswith(("postgresql://", "postgres://"))


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise UserError("--db postgresql://... needs psycopg: pip install 'dialogen[postgres]'") from None
    return psycopg


def _lock_key(sid: str) -> int:
    """A session id -> a signed 64-bit advisory lock key."""
    return int.from_bytes(hashlib.sha256(sid.encode()).digest()[:8], "big", signed=True)


class PgStore(Reads):
    def __init__(self, dsn: str):
        self.path = _redacted(dsn)  # what messages show: never the password
        self._dsn = dsn
        self._db = self._connect()
        self._lock = threading.Lock()  # one statement at a time on the shared connection
        self._spare: list = []  # connections for turn locks, kept for the next turn
        self._held: dict[str, tuple] = {}  # holder -> (connection, key)
        self._held_lock = threading.Lock()
        self._create_schema()

    def _connect(self):
        psycopg = _psycopg()
        try:
            return psycopg.connect(self._dsn, autocommit=True, row_factory=psycopg.rows.dict_row,
                                   connect_timeout=10)
        except psycopg.Error as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--db {self.path}: cannot connect to PostgreSQL ({msg})") from None

    def _create_schema(self):
        with self._lock, self._db.transaction():
            self._db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            self._db.execute(SCHEMA)
            row = self._db.execute("SELECT max(version) AS v FROM dialogen_schema").fetchone()
            if row["v"] is None:
                self._db.execute("INSERT INTO dialogen_schema VALUES (%s)", (SCHEMA_VERSION,))
            elif row["v"] > SCHEMA_VERSION:
                raise UserError(f"--db {self.path}: the sessions schema is version {row['v']}, newer than this "
                                f"dialogen's ({SCHEMA_VERSION}); upgrade dialogen")

    def close(self):
        with self._held_lock:
            conns = self._spare + [c for c, _ in self._held.values()]
            self._spare, self._held = [], {}
        for c in conns + [self._db]:
            c.close()

    def journal_mode(self) -> str:
        return "postgresql"

    def _sql(self, query: str) -> str:
        return query.replace("?", "%s")

    @contextmanager
    def _snapshot(self):
        with self._lock, self._db.transaction():
            self._db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            yield

    # --- sessions -------------------------------------------------------------------------
    def create(self, owner: str, persona: str | None, settings: dict, title: str = "") -> dict:
        sid = "sess_" + secrets.token_hex(12)
        now = time.time()
        with self._lock:
            self._db.execute("INSERT INTO sessions (id, owner, created, updated, persona, settings, title) "
                             "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                             (sid, owner, now, now, persona, json.dumps(settings), title))
        return {"id": sid, "created": now, "updated": now, "persona": persona, "settings": settings, "title": title}

    def delete(self, sid: str, owner: str) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM sessions WHERE id = %s AND owner = %s", (sid, owner))
        return cur.rowcount > 0

    # --- one writer per session -----------------------------------------------------------
    def claim(self, sid: str, lease: float | None = None) -> str | None:
        """Take the session for one turn: a holder token, or None while another turn holds it
        (on any replica). `lease` is not needed: the lock lives as long as its connection."""
        with self._held_lock:
            conn = self._spare.pop() if self._spare else None
        if conn is None or conn.closed:
            conn = self._connect()
        key = _lock_key(sid)
        if not conn.execute("SELECT pg_try_advisory_lock(%s) AS ok", (key,)).fetchone()["ok"]:
            self._put_back(conn)
            return None
        holder = secrets.token_hex(8)
        with self._held_lock:
            self._held[holder] = (conn, key)
        return holder

    def renew(self, sid: str, holder: str, lease: float | None = None):
        """Nothing to renew: the advisory lock holds until released or its connection ends."""

    def release(self, sid: str, holder: str):
        with self._held_lock:
            conn, key = self._held.pop(holder, (None, None))
        if conn is None:
            return
        try:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        except _psycopg().Error:  # the connection broke: with it went the lock
            conn.close()
            return
        self._put_back(conn)

    def _put_back(self, conn):
        with self._held_lock:
            if len(self._spare) < 64 and not conn.closed:
                self._spare.append(conn)
                return
        conn.close()

    def add_turn(self, sid: str, user: str, reply: str, meta: dict | None = None, expected: int | None = None) -> bool:
        """Append a user message and its reply atomically; False if the session is gone.

        With `expected`, only onto a history of that many messages; else `Conflict`."""
        now = time.time()
        with self._lock, self._db.transaction():
            row = self._db.execute("SELECT title FROM sessions WHERE id = %s FOR UPDATE", (sid,)).fetchone()
            if row is None:
                return False
            n = self._db.execute("SELECT COUNT(*) AS n, COALESCE(MAX(seq), -1) AS last FROM messages "
                                 "WHERE session_id = %s", (sid,)).fetchone()
            if expected is not None and n["n"] != expected:
                raise Conflict(f"session '{sid}' has {n['n']} stored messages; the turn was computed on {expected}")
            seq = n["last"] + 1
            self._db.execute("INSERT INTO messages VALUES (%s, %s, 'user', %s, %s, NULL), "
                             "(%s, %s, 'assistant', %s, %s, %s)",
                             (sid, seq, user, now, sid, seq + 1, reply, now, json.dumps(meta) if meta else None))
            self._db.execute("UPDATE sessions SET updated = %s, title = %s WHERE id = %s",
                             (now, row["title"] or _title(user), sid))
        return True


def _redacted(dsn: str) -> str:
    """postgresql://user:secret@host/db -> postgresql://user:***@host/db."""
    head, sep, rest = dsn.partition("://")
    if "@" not in rest:
        return dsn
    cred, at, host = rest.rpartition("@")
    user = cred.split(":", 1)[0]
    return f"{head}{sep}{user}{':***' if ':' in cred else ''}{at}{host}"
