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
