"""Messages and conversations, validated where they enter (files, stdin, HTTP bodies).

Besides `{"role", "content"}`, OpenAI's tool messages: an assistant message may carry
`tool_calls` (`[{"id", "type": "function", "function": {"name", "arguments"}}]`, its content
then possibly null) and a `tool` message answers one of them by `tool_call_id`. A call's
`arguments` are kept parsed (a dict), as chat templates take them; a null content is kept as "".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import UserError
from ..textio import load_json, read_file, read_stdin
from .toolformat import parse_tools

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Message:
    role: str
    content: str
    tool_calls: list[dict] | None = field(default=None, kw_only=True)  # an assistant's calls
    tool_call_id: str | None = field(default=None, kw_only=True)  # a tool message: the call it answers
    name: str | None = field(default=None, kw_only=True)  # a tool message: the function's name

    def to_dict(self) -> dict:
        """OpenAI's shape (arguments as JSON text)."""
        d = {"role": self.role, "content": self.content}
        if self.tool_calls:
            d["content"] = self.content or None
            d["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.dumps(
                c["function"]["arguments"], ensure_ascii=False)}} for c in self.tool_calls]
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            d["name"] = self.name
        return d

    def template_dict(self, content) -> dict:
        """What a chat template sees (transformers' shape): `content` in place of the content (None
        for an assistant's calls without text), arguments as dicts."""
        d = {"role": self.role, "content": content}
        if self.tool_calls:
            d["content"] = content or None
            d["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            d["name"] = self.name
        return d


class Conversation(list):
    """A list of messages with the tools offered in it (None: no tools), as in a training record."""

    def __init__(self, messages=(), tools: list[dict] | None = None):
        super().__init__(messages)
        self.tools = tools


def parse_messages(data, where: str = "messages") -> list[Message]:
    """A JSON list of {"role", "content"} (and tool calls) -> messages; errors name the element
    and field. A tool message must answer a call made earlier in the list."""
    out: list[Message] = []
    calls: dict[str, str] = {}  # call id -> function name, of the calls made so far
    for at, m in objects(data, where, "an object with 'role' and 'content'"):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"{at}.role: {role!r} is not one of {', '.join(ROLES)}")
        tool_calls = parse_tool_calls(m.get("tool_calls"), f"{at}.tool_calls") if role == "assistant" else None
        if content is None and tool_calls:
            content = ""
        if not isinstance(content, str):
            raise UserError(f"{at}.content: expected a string, got {type(content).__name__}")
        msg = Message(role, content, tool_calls=tool_calls or None)
        for c in tool_calls or ():
            calls[c["id"]] = c["function"]["name"]
        if role == "tool":
            cid = m.get("tool_call_id")
            if not isinstance(cid, str):
                raise UserError(f"{at}.tool_call_id: a tool message needs the id of the call it answers")
            if cid not in calls:
                raise UserError(f"{at}.tool_call_id: {cid!r} matches no earlier tool call")
            msg.tool_call_id, msg.name = cid, m.get("name") if isinstance(m.get("name"), str) else calls[cid]
        elif m.get("tool_call_id") is not None:
            raise UserError(f"{at}.tool_call_id: only a tool message answers a call")
        out.append(msg)
    return out


def parse_tool_calls(data, where: str) -> list[dict]:
    """OpenAI's `tool_calls` -> [{"id", "type": "function", "function": {"name", "arguments": dict}}]."""
    if data is None:
        return []
    if not isinstance(data, list):
        raise UserError(f"{where}: expected a list of calls")
    out = []
    for i, c in enumerate(data):
        at = f"{where}[{i}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise UserError(f"{at}.function.name: expected {{\"function\": {{\"name\": ..., \"arguments\": ...}}}}")
        cid = c.get("id", f"call_{len(out)}")
        if not isinstance(cid, str) or not cid:
            raise UserError(f"{at}.id: expected a non-empty string")
        out.append({"id": cid, "type": "function",
                    "function": {"name": fn["name"], "arguments": _arguments(fn.get("arguments", {}), at)}})
    return out


def _arguments(args, at: str) -> dict:
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise UserError(f"{at}.function.arguments: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(args, dict):
        raise UserError(f"{at}.function.arguments: expected a JSON object")
    return args


def objects(data, where: str, expected: str):
    """(where[i], element) of a JSON list whose elements must be objects; errors name the element."""
    if not isinstance(data, list):
        raise UserError(f"{where}: expected a JSON list of messages, got {type(data).__name__}")
    for i, m in enumerate(data):
        if not isinstance(m, dict):
            raise UserError(f"{where}[{i}]: expected {expected}")
        yield f"{where}[{i}]", m


def read_messages(path: str) -> list[Message]:
    """A messages JSON file ('-' for stdin) -> messages: a list, or {"messages": [...], "tools": [...]}
    (a `Conversation` with its tools); errors name the file and line (bytes that are not UTF-8,
    lone surrogates, JSON mistakes) or the element and field."""
    where = "<stdin>" if path == "-" else path
    data = load_json(read_stdin() if path == "-" else read_file(path), where)
    if isinstance(data, dict) and "messages" in data:
        tools = parse_tools(data["tools"], f"{where}: tools") if data.get("tools") is not None else None
        return Conversation(parse_messages(data["messages"], f"{where}: messages"), tools)
    return parse_messages(data, where)
