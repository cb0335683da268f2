"""Messages and conversations, validated where they enter (files, stdin, HTTP bodies)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..textio import load_json, read_file, read_stdin

ROLES = ("system", "user", "assistant")


@dataclass
class Message:
    role: str
    content: str

    def to_dict(self) -> dict:
        return {"role": self.role, "content": self.content}


def parse_messages(data, where: str = "messages") -> list[Message]:
    """A JSON list of {"role", "content"} -> messages; errors name the element and field."""
    out = []
    for at, m in objects(data, where, "an object with 'role' and 'content'"):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"{at}.role: {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise UserError(f"{at}.content: expected a string, got {type(content).__name__}")
        out.append(Message(role, content))
    return out


def objects(data, where: str, expected: str):
    """(where[i], element) of a JSON list whose elements must be objects; errors name the element."""
    if not isinstance(data, list):
        raise UserError(f"{where}: expected a JSON list of messages, got {type(data).__name__}")
    for i, m in enumerate(data):
        if not isinstance(m, dict):
            raise UserError(f"{where}[{i}]: expected {expected}")
        yield f"{where}[{i}]", m


def read_messages(path: str) -> list[Message]:
    """A messages JSON file ('-' for stdin) -> messages; errors name the file and line (bytes
    that are not UTF-8, lone surrogates, JSON mistakes) or the element and field."""
    where = "<stdin>" if path == "-" else path
    return parse_messages(load_json(read_stdin() if path == "-" else read_file(path), where), where)
