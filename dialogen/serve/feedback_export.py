"""`dialogen export-feedback`: the preferences people gave the server's replies, as DPO records.

Each record is TRL's preference format, which `dialogen train --dpo` reads as it is
(data/preferences.py): `prompt` is the conversation before the reply (the session's persona first,
as a system message), `chosen` and `rejected` are one assistant message each; `source`,
`session_id` and `message_index` say where the chosen reply came from. Pairs come from:
- picks: a regenerated reply preferred over another (the chat page's "pick the better of two");
- ratings: a reply rated up and another rated down that answer the same prompt (two variants of
  one message, or the same conversation so far in two sessions): every such up-down pair.
A rating alone forms no pair, as a record needs two replies to one prompt; the summary counts
those. Left out: pairs of equal texts, repeats, and a ratings pair whose reverse was picked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError
from ..paths import atomic_file
from .cli import default_db
from .pgstore import is_postgres


def register(sub):
    p = sub.add_parser("export-feedback", help="write the ratings and picks stored by `dialogen serve` as DPO "
                                               "records for `dialogen train --dpo`",
                       description="Reads the session store and writes one preference record a line "
                                   "(prompt, chosen, rejected): picked replies over the ones passed over, and "
                                   "replies rated up over replies to the same prompt rated down. Prints a summary.")
    p.add_argument("--db", default=None, help="the session store: an SQLite file or postgresql://USER@HOST/DB "
                                              "(default: the one `dialogen serve` uses)")
    p.add_argument("--out", required=True, help="the JSONL file to write (replaced whole)")
    p.set_defaults(func=main)


def main(args) -> int:
    from .cli import open_store

    db = args.db or str(default_db())
    out = Path(args.out).expanduser()
    if not is_postgres(db) and not os.path.isfile(db):
        raise UserError(f"--db {db}: no such session database")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: the directory {out.parent} does not exist")
    store = open_store(db, connections=2)
    try:
        sessions = store.feedback_sessions()
    finally:
        store.close()
    records, summary = preference_records(sessions)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    try:
        atomic_file(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as e:
        raise UserError(f"--out {out}: cannot write ({e.strerror})") from None
    print(json.dumps({**summary, "out": str(out)}))
    return 0


def preference_records(sessions: list[dict]) -> tuple[list[dict], dict]:
    """(DPO records, counts) of the sessions `Feedback.feedback_sessions` reads."""
    records, seen = [], set()

    def add(prompt, chosen: str, rejected: str, source: str, sid: str, seq: int) -> bool:
        key = (json.dumps(prompt), chosen, rejected)
        if chosen == rejected or key in seen:
            return False
        seen.add(key)
        records.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "assistant", "content": rejected}], "source": source,
                        "session_id": sid, "message_index": seq})
        return True

    picks = 0
    for s in sessions:
        for seq, chosen, rejected in s["picks"]:
            c, r = _content(s, seq, chosen), _content(s, seq, rejected)
            if c is not None and r is not None:
                picks += add(_prompt(s, seq), c, r, "pick", s["id"], seq)
    groups: dict[str, tuple[list, dict]] = {}  # the prompt's JSON -> (prompt, {"up": [...], "down": [...]})
    for s in sessions:
        for (seq, variant), rating in sorted(s["ratings"].items()):
            text = _content(s, seq, variant)
            if text is None or rating not in ("up", "down"):
                continue
            prompt = _prompt(s, seq)
            groups.setdefault(json.dumps(prompt), (prompt, {"up": [], "down": []}))[1][rating].append((text, s["id"], seq))
    rated = paired = pairs = 0
    for key, (prompt, g) in groups.items():
        rated += len(g["up"]) + len(g["down"])
        used = set()
        for i, (up, sid, seq) in enumerate(g["up"]):
            for j, (down, _, _) in enumerate(g["down"]):
                if up == down or (key, down, up) in seen:  # picked the other way: the pick stands
                    continue
                pairs += add(prompt, up, down, "ratings", sid, seq)  # False: a pick or another session has it
                used |= {("up", i), ("down", j)}
        paired += len(used)
    return records, {"records": len(records), "from_picks": picks, "from_ratings": pairs,
                     "ratings_without_a_pair": rated - paired, "sessions": len(sessions)}


def _prompt(session: dict, seq: int) -> list[dict]:
    head = [{"role": "system", "content": session["persona"]}] if session["persona"] else []
    return head + [{"role": role, "content": text} for k, (role, text) in sorted(session["messages"].items()) if k < seq]


def _content(session: dict, seq: int, variant: int) -> str | None:
    """The text of reply `variant` of message `seq` (variant 0 of a message never regenerated is the message)."""
    if (seq, variant) in session["variants"]:
        return session["variants"][seq, variant]
    role, text = session["messages"].get(seq, (None, None))
    return text if variant == 0 and role == "assistant" else None
