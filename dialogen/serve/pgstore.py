"""Sessions on PostgreSQL, for several server replicas sharing one store (`--db postgresql://...`).

The same schema and behaviour as the SQLite store (store.py), through psycopg 3:
- a turn (the user message and the reply) is one transaction, committed before the client hears
  the turn is done, and appended only onto the message count its reply was computed on
  (compare-and-set under the session row's lock), so a turn is never lost nor applied twice;
- one writer per session across replicas: a turn holds a PostgreSQL advisory lock on the session
  for its duration, on a connection of its own. The lock ends with the turn, or with the
  connection when a replica dies (even by kill -9), so another replica can go on at once;
- the schema is created idempotently (under a lock, as replicas start together) and its version
  recorded; a database written by a newer dialogen is refused, an older one gains the tables it
  lacks (version 2: the feedback tables, see feedback_store.py).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from contextlib import contextmanager

from ..errors import UserError
from .feedback_store import Feedback
from .store import SCHEMA as TABLES, Conflict, Reads, StoreUnavailable, _title, guarded

SCHEMA_VERSION = 2
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


RECONNECT_DELAY = 1.0  # the longest wait between two attempts to reach a database that is down


def _pool(dsn: str, max_size: int):
    """A pool whose reconnection attempts back off to at most RECONNECT_DELAY apart (the
    library's own doubling would leave a restarted database unused for minutes)."""
    psycopg = _psycopg()
    try:
        from psycopg_pool import ConnectionPool
        from psycopg_pool.base import AttemptWithBackoff
    except ImportError:
        raise UserError("--db postgresql://... needs psycopg_pool: pip install 'dialogen[postgres]'") from None

    class Attempt(AttemptWithBackoff):
        def update_delay(self, now: float):
            super().update_delay(now)
            self.delay = min(self.delay, RECONNECT_DELAY)

    class Pool(ConnectionPool):
        def _add_connection(self, attempt, growing: bool = False):
            super()._add_connection(attempt or Attempt(timeout=self.reconnect_timeout), growing)

    return Pool(dsn, min_size=2, max_size=max_size, open=False, check=ConnectionPool.check_connection,
                kwargs={"autocommit": True, "row_factory": psycopg.rows.dict_row, "connect_timeout": 5},
                reconnect_timeout=float("inf"), name="dialogen")


def _lock_key(sid: str) -> int:
    """A session id -> a signed 64-bit advisory lock key."""
    return int.from_bytes(hashlib.sha256(sid.encode()).digest()[:8], "big", signed=True)


class PgStore(Reads, Feedback):
    """Every statement runs on a connection of a pool (psycopg_pool), checked before use: a
    connection broken by a database restart or a network fault is replaced, never reused. While
    the database is unreachable an operation raises StoreUnavailable (the HTTP layer answers 503);
    the pool keeps reconnecting, at most `RECONNECT_DELAY` apart, and serves again as soon as the
    database answers."""

    def __init__(self, dsn: str, max_connections: int = 100, wait: float = 5.0):
        self.path = _redacted(dsn)  # what messages show: never the password
        self._dsn = dsn
        self.wait = wait  # seconds an operation waits for a connection while the database is up
        self._down = threading.Event()  # set while the last attempt failed: operations wait less
        self._held: dict[str, tuple] = {}  # holder -> (connection, key): a turn's advisory lock
        self._held_lock = threading.Lock()
        self._local = threading.local()  # the connection of this thread's read snapshot
        psycopg = _psycopg()
        self._pool = _pool(dsn, max(2, max_connections))
        try:
            psycopg.connect(dsn, connect_timeout=10).close()  # fails fast, with the server's reason
            self._pool.open(wait=True, timeout=10)
        except psycopg.Error as e:
            self._pool.close()
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--db {self.path}: cannot connect to PostgreSQL ({msg})") from None
        self._create_schema()

    @contextmanager
    def _faults(self):
        psycopg = _psycopg()
        try:
            yield
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:  # includes the pool's timeout
            self._down.set()
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StoreUnavailable(f"the session database {self.path} is unavailable ({msg})") from None
        self._down.clear()

    @contextmanager
    def _conn(self, wait: float | None = None):
        """A checked connection of the pool, for one operation; waits at most `wait` seconds
        for one (less while the database is known to be down)."""
        wait = self.wait if wait is None else wait
        with self._pool.connection(timeout=min(wait, 1.0) if self._down.is_set() else wait) as conn:
            yield conn

    def _create_schema(self):
        with self._conn() as db, db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            db.execute(SCHEMA)
            row = db.execute("SELECT max(version) AS v FROM dialogen_schema").fetchone()
            if row["v"] is None:
                db.execute("INSERT INTO dialogen_schema VALUES (%s)", (SCHEMA_VERSION,))
            elif row["v"] > SCHEMA_VERSION:
                raise UserError(f"--db {self.path}: the sessions schema is version {row['v']}, newer than this "
                                f"dialogen's ({SCHEMA_VERSION}); upgrade dialogen")
            elif row["v"] < SCHEMA_VERSION:  # the tables it lacked were created above
                db.execute("UPDATE dialogen_schema SET version = %s", (SCHEMA_VERSION,))

    def close(self):
        with self._held_lock:
            held, self._held = list(self._held.values()), {}
        for conn, _ in held:
            conn.close()  # its advisory lock goes with it
            self._pool.putconn(conn)
        self._pool.close()

    def journal_mode(self) -> str:
        return "postgresql"

    @guarded
    def ping(self):
        """Raise StoreUnavailable unless the database answers (the readiness check)."""
        with self._conn(wait=2.0) as db:
            db.execute("SELECT 1")

    def _sql(self, query: str) -> str:
        return query.replace("?", "%s")

    _row_lock = " FOR UPDATE"  # a write on a session's feedback waits for its turn's commit, and vice versa

    @contextmanager
    def _write(self):
        with self._conn() as db, db.transaction():
            yield db

    def _fetch(self, query: str, args: tuple, one: bool = False):
        cur = self._tx.execute(self._sql(query), args)
        return cur.fetchone() if one else cur.fetchall()

    @contextmanager
    def _snapshot(self):
        with self._conn() as db, db.transaction():
            db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            self._local.tx = db
            try:
                yield
            finally:
                self._local.tx = None

    @property
    def _tx(self):
        return self._local.tx

    # --- sessions -------------------------------------------------------------------------
    @guarded
    def create(self, owner: str, persona: str | None, settings: dict, title: str = "") -> dict:
        sid = "sess_" + secrets.token_hex(12)
        now = time.time()
        with self._conn() as db:
            db.execute("INSERT INTO sessions (id, owner, created, updated, persona, settings, title) "
                             "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                             (sid, owner, now, now, persona, json.dumps(settings), title))
        return {"id": sid, "created": now, "updated": now, "persona": persona, "settings": settings, "title": title}

    @guarded
    def delete(self, sid: str, owner: str) -> bool:
        with self._conn() as db:
            cur = db.execute("DELETE FROM sessions WHERE id = %s AND owner = %s", (sid, owner))
        return cur.rowcount > 0

    # --- one writer per session -----------------------------------------------------------
    @guarded
    def claim(self, sid: str, lease: float | None = None) -> str | None:
        """Take the session for one turn: a holder token, or None while another turn holds it
        (on any replica). `lease` is not needed: the lock lives as long as its connection, which
        the turn keeps out of the pool until `release`."""
        conn = self._pool.getconn(timeout=1.0 if self._down.is_set() else self.wait)
        try:
            ok = conn.execute("SELECT pg_try_advisory_lock(%s) AS ok", (_lock_key(sid),)).fetchone()["ok"]
        except BaseException:
            self._pool.putconn(conn)  # a broken one is discarded by the pool
            raise
        if not ok:
            self._pool.putconn(conn)
            return None
        holder = secrets.token_hex(8)
        with self._held_lock:
            self._held[holder] = (conn, _lock_key(sid))
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
        self._pool.putconn(conn)  # a closed or broken one is discarded by the pool

    @guarded
    def add_turn(self, sid: str, user: str, reply: str, meta: dict | None = None, expected: int | None = None) -> bool:
        """Append a user message and its reply atomically; False if the session is gone.

        With `expected`, only onto a history of that many messages; else `Conflict`."""
        now = time.time()
        with self._conn() as db, db.transaction():
            row = db.execute("SELECT title FROM sessions WHERE id = %s FOR UPDATE", (sid,)).fetchone()
            if row is None:
                return False
            n = db.execute("SELECT COUNT(*) AS n, COALESCE(MAX(seq), -1) AS last FROM messages "
                                 "WHERE session_id = %s", (sid,)).fetchone()
            if expected is not None and n["n"] != expected:
                raise Conflict(f"session '{sid}' has {n['n']} stored messages; the turn was computed on {expected}")
            seq = n["last"] + 1
            db.execute("INSERT INTO messages VALUES (%s, %s, 'user', %s, %s, NULL), "
                             "(%s, %s, 'assistant', %s, %s, %s)",
                             (sid, seq, user, now, sid, seq + 1, reply, now, json.dumps(meta) if meta else None))
            db.execute("UPDATE sessions SET updated = %s, title = %s WHERE id = %s",
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
