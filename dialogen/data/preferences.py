"""Preference records for DPO, in TRL's format: one JSON object a line with `prompt`, `chosen` and
`rejected`. The prompt is a string (one user turn) or a list of messages (a conversation); chosen
and rejected are a string or a list of assistant messages, the two replies to that prompt. Errors
name file:line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..chat.messages import Message, parse_messages
from ..errors import UserError


@dataclass
class Preference:
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    where: str  # file:line


def _turns(value, where: str, key: str, role: str | None) -> list[Message]:
    if isinstance(value, str):
        return [Message(role or "user", value)]
    msgs = parse_messages(value, f"{where}: {key}")
    if not msgs:
        raise UserError(f"{where}: {key} is empty")
    if role is not None and any(m.role != role for m in msgs):
        raise UserError(f"{where}: {key} must hold {role} messages only")
    return msgs


def read_preferences(path: str | Path) -> list[Preference]:
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read preference records ({e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(r, dict):
            raise UserError(f"{where}: expected an object with prompt, chosen and rejected")
        for key in ("prompt", "chosen", "rejected"):
            if key not in r:
                raise UserError(f"{where}: missing {key!r}")
        prompt = _turns(r["prompt"], where, "prompt", None)
        if prompt[-1].role == "assistant":
            raise UserError(f"{where}: the prompt ends with an assistant turn; its last turn is the one replied to")
        chosen, rejected = (_turns(r[k], where, k, "assistant") for k in ("chosen", "rejected"))
        if chosen == rejected:
            raise UserError(f"{where}: chosen and rejected are the same reply (nothing to prefer)")
        out.append(Preference(prompt, chosen, rejected, where))
    if not out:
        raise UserError(f"{path}: no preference records")
    return out
