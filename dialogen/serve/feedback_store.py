"""Feedback on a session's replies, stored with its turns; written once for both stores.

A message is named by its index in the session's history, which is its `seq` (messages are only
appended, from 0). Three tables hang off an assistant message:
- `variants`: the replies it has had. Regenerating the last reply stores the new one as variant
  1, 2, ... and first copies the stored reply in as variant 0; the history keeps showing one of
  them (the message's `meta.variant`, 0 until a pick).
- `ratings`: one rating per variant, "up" or "down", with an optional comment; rating again
  replaces it.
- `picks`: a variant preferred over another. Picking also makes the chosen one the message's
  content, so the conversation goes on from it; a newer pick of the reverse order replaces an older one.

The mixin needs from its store: `_write()` (a write transaction yielding a connection whose
`execute` takes the store's placeholders), `_sql` (rewrites '?' placeholders), `_faults()`,
`_snapshot()` and `_fetch` (reads), and `_row_lock` (the clause that locks the session's row
for the transaction, where the database needs one).
"""

from __future__ import annotations

import json
import time

FEEDBACK_TABLES = """
CREATE TABLE IF NOT EXISTS variants (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    variant INTEGER NOT NULL,
    content TEXT NOT NULL,
    created REAL NOT NULL,
    meta TEXT,
    PRIMARY KEY (session_id, seq, variant)
);
CREATE TABLE IF NOT EXISTS ratings (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    variant INTEGER NOT NULL,
    rating TEXT NOT NULL,
    comment TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (session_id, seq, variant)
);
CREATE TABLE IF NOT EXISTS picks (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    chosen INTEGER NOT NULL,
    rejected INTEGER NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (session_id, seq, chosen, rejected)
);
"""


class Stale(Exception):
    """The message is not the session's last one: a turn was added after it."""


class Feedback:
    _row_lock = ""  # appended to the SELECT of the session's row in a write transaction

    def _run(self, db, query: str, args: tuple = ()):
        return db.execute(self._sql(query), args)

    def _reply_row(self, db, sid: str, seq: int):
        """The assistant message `seq` of the session (its row locked), or None."""
        if self._run(db, "SELECT id FROM sessions WHERE id = ?" + self._row_lock, (sid,)).fetchone() is None:
            return None
        return self._run(db, "SELECT content, created, meta FROM messages WHERE session_id = ? AND seq = ? "
                             "AND role = 'assistant'", (sid, seq)).fetchone()

    def _last_variant(self, db, sid: str, seq: int) -> int | None:
        row = self._run(db, "SELECT MAX(variant) AS v FROM variants WHERE session_id = ? AND seq = ?",
                        (sid, seq)).fetchone()
        return row["v"]

    def rate(self, sid: str, seq: int, variant: int, rating: str, comment: str | None) -> bool:
        """Store the rating of reply `variant` of message `seq`; False when either is gone."""
        with self._faults(), self._write() as db:
            if self._reply_row(db, sid, seq) is None:
                return False
            last = self._last_variant(db, sid, seq)
            if variant > (last or 0):
                return False
            self._run(db, "INSERT INTO ratings VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (session_id, seq, variant) "
                          "DO UPDATE SET rating = excluded.rating, comment = excluded.comment, created = excluded.created",
                      (sid, seq, variant, rating, comment or None, time.time()))
        return True

    def add_variant(self, sid: str, seq: int, content: str, meta: dict | None) -> int | None:
        """Store another reply to the turn of message `seq`, which must be the session's last
        (else `Stale`); its variant number, or None when the session or message is gone."""
        now = time.time()
        with self._faults(), self._write() as db:
            row = self._reply_row(db, sid, seq)
            if row is None:
                return None
            n = self._run(db, "SELECT COUNT(*) AS n FROM messages WHERE session_id = ?", (sid,)).fetchone()["n"]
            if n != seq + 1:
                raise Stale(f"message {seq} is not the session's last reply (it has {n} messages)")
            last = self._last_variant(db, sid, seq)
            if last is None:  # the stored reply becomes variant 0
                shown = {k: v for k, v in json.loads(row["meta"] or "{}").items() if k != "variant"}
                self._run(db, "INSERT INTO variants VALUES (?, ?, 0, ?, ?, ?)",
                          (sid, seq, row["content"], row["created"], json.dumps(shown) if shown else None))
                last = 0
            self._run(db, "INSERT INTO variants VALUES (?, ?, ?, ?, ?, ?)",
                      (sid, seq, last + 1, content, now, json.dumps(meta) if meta else None))
        return last + 1

    def pick(self, sid: str, seq: int, chosen: int, rejected: int) -> dict | None:
        """Prefer variant `chosen` of the last message `seq` over `rejected`, and make it the
        message's content; the message as shown, or None when the session, message or a variant is gone."""
        now = time.time()
        with self._faults(), self._write() as db:
            if self._reply_row(db, sid, seq) is None:
                return None
            n = self._run(db, "SELECT COUNT(*) AS n FROM messages WHERE session_id = ?", (sid,)).fetchone()["n"]
            if n != seq + 1:
                raise Stale(f"message {seq} is not the session's last reply (it has {n} messages)")
            rows = {r["variant"]: r for r in self._run(
                db, "SELECT variant, content, meta FROM variants WHERE session_id = ? AND seq = ? AND variant IN (?, ?)",
                (sid, seq, chosen, rejected)).fetchall()}
            if chosen not in rows or rejected not in rows:
                return None
            self._run(db, "DELETE FROM picks WHERE session_id = ? AND seq = ? AND chosen = ? AND rejected = ?",
                      (sid, seq, rejected, chosen))
            self._run(db, "INSERT INTO picks VALUES (?, ?, ?, ?, ?) ON CONFLICT (session_id, seq, chosen, rejected) "
                          "DO UPDATE SET created = excluded.created", (sid, seq, chosen, rejected, now))
            meta = {**json.loads(rows[chosen]["meta"] or "{}"), "variant": chosen}
            self._run(db, "UPDATE messages SET content = ?, meta = ? WHERE session_id = ? AND seq = ?",
                      (rows[chosen]["content"], json.dumps(meta), sid, seq))
            self._run(db, "UPDATE sessions SET updated = ? WHERE id = ?", (now, sid))
        return {"role": "assistant", "content": rows[chosen]["content"], **meta}

    def feedback_sessions(self) -> list[dict]:
        """Every session with ratings or picks, oldest first: its persona, messages ({seq: (role,
        content)}), variants ({(seq, variant): content}), ratings ({(seq, variant): rating}) and picks
        ([(seq, chosen, rejected)]), read from one state of the database."""
        out = []
        with self._faults(), self._snapshot():
            rows = self._fetch("SELECT id, persona FROM sessions WHERE id IN (SELECT session_id FROM ratings UNION "
                               "SELECT session_id FROM picks) ORDER BY created, id", ())
            for row in rows:
                sid = row["id"]
                msgs = self._fetch("SELECT seq, role, content FROM messages WHERE session_id = ?", (sid,))
                variants = self._fetch("SELECT seq, variant, content FROM variants WHERE session_id = ?", (sid,))
                ratings = self._fetch("SELECT seq, variant, rating FROM ratings WHERE session_id = ?", (sid,))
                picks = self._fetch("SELECT seq, chosen, rejected FROM picks WHERE session_id = ? ORDER BY seq, created",
                                    (sid,))
                out.append({"id": sid, "persona": row["persona"],
                            "messages": {m["seq"]: (m["role"], m["content"]) for m in msgs},
                            "variants": {(v["seq"], v["variant"]): v["content"] for v in variants},
                            "ratings": {(r["seq"], r["variant"]): r["rating"] for r in ratings},
                            "picks": [(p["seq"], p["chosen"], p["rejected"]) for p in picks]})
        return out
