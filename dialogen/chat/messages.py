"""Messages and conversations, validated where they enter (files, stdin, HTTP bodies)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

ROLES = ("system", "user", "assistant")


@dataclass
class Message:
    role: str
    content: str

    def to_dict(self) -> dict:
        return {"role": self.role, "content": self.content}


def parse_messages(data, where: str = "messages") -> list[Message]:
    """A JSON list of {"role", "content"} -> messages; errors name the element and field."""
    if not isinstance(data, list):
        raise UserError(f"{where}: expected a JSON list of messages, got {type(data).__name__}")
    out = []
    for i, m in enumerate(data):
        at = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise UserError(f"{at}: expected an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"{at}.role: {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise UserError(f"{at}.content: expected a string, got {type(content).__name__}")
        out.append(Message(role, content))
    return out


def read_messages(path: str) -> list[Message]:
    """A messages JSON file ('-' for stdin) -> messages; errors name the file and line."""
    import json
    import sys

    where = "<stdin>" if path == "-" else path
    try:
        raw = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
        text = raw.decode("utf-8")
    except OSError as e:
        raise UserError(f"{where}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{where}:{line}: not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}:{e.lineno}: not valid JSON ({e.msg})") from None
    return parse_messages(data, where)
