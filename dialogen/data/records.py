"""Conversations stored as JSON records: JSONL files, JSON array files, and table rows.

Two record shapes, told apart by their key:
- OpenAI's chat fine-tuning shape: `{"messages": [{"role", "content", "weight"?}, ...]}`. An
  assistant message's `"weight": 0` means it is never trained (1, the default, means it is).
- ShareGPT: `{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}`; `user`
  and `assistant` are accepted for `from` too, and `role`/`content` for `from`/`value`.

Either may carry `"system"` (or `"persona"`): a string put first as the system message, and
`"tools"`: the tools offered (OpenAI's shape), rendered as the chat template shows them; then
assistant messages may carry `tool_calls` and `tool` messages answer them (OpenAI's shape). A file
holds one shape: the first record decides it (or `--format`), and a record of another layout is
an error naming the shape expected and that record, never read as something else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..chat.messages import Conversation, Message, objects, parse_messages
from ..chat.toolformat import parse_tools
from ..errors import UserError
from ..textio import EncodingError, check_json_strings, decode, load_json, parse_json, read_file

OPENAI, SHAREGPT = "openai", "sharegpt"
EXPECTED = {
    OPENAI: "an object with a 'messages' list ({\"messages\": [{\"role\", \"content\"}, ...]}, OpenAI's chat format)",
    SHAREGPT: "an object with a 'conversations' list ({\"conversations\": [{\"from\", \"value\"}, ...]}, ShareGPT)",
}
KEYS = {OPENAI: "messages", SHAREGPT: "conversations"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Turn(Message):
    """A message with a training weight: 0 means never trained (OpenAI's `weight`, DialoGPT's TSV)."""

    weight: float = 1.0

    def to_dict(self) -> dict:
        d = super().to_dict()
        if self.weight != 1.0:
            d["weight"] = self.weight
        return d


@dataclass
class Parsed:
    conversations: list[list[Message]]
    skipped: list[str]  # one "file:line: reason" per skipped line or dialogue


def lines(path: Path):
    """The file's lines (universal newlines). Not UTF-8 stops the read at `file:line`, with or
    without --skip-bad (a file in another encoding has no good lines to keep)."""
    try:
        with open(path, encoding="utf-8") as f:
            yield from f
    except UnicodeDecodeError as e:  # the text reader decodes in blocks: find the line in the bytes
        decode(path.read_bytes(), str(path))
        raise EncodingError(f"{path}: not UTF-8 text ({e.reason})") from None  # (changed since)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def shape_of(obj) -> str | None:
    if isinstance(obj, dict):
        for shape, key in KEYS.items():
            if key in obj:
                return shape
    return None


def excerpt(obj, limit: int = 60) -> str:
    text = json.dumps(obj, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_record(obj, where: str, shape: str | None = None) -> list[Message]:
    """One conversation record of `shape` (or of either shape when None)."""
    got = shape_of(obj)
    if got is None or (shape is not None and got != shape):
        expected = EXPECTED[shape] if shape else f"{EXPECTED[OPENAI]} or {EXPECTED[SHAREGPT]}"
        hint = " (a JSON array on one line: for a file that is one array of conversations use --format json)" \
            if isinstance(obj, list) else ""
        raise UserError(f"{where}: expected {expected}; got {excerpt(obj)}{hint}")
    key = KEYS[got]
    items = obj[key]
    if got == SHAREGPT:
        items = _sharegpt_items(items, f"{where}: {key}")
    messages = parse_messages(items, f"{where}: {key}")
    messages = [_weighted(m, item, f"{where}: {key}[{i}]") for i, (m, item) in enumerate(zip(messages, items))]
    system = obj.get("system", obj.get("persona"))
    if system is not None:
        if not isinstance(system, str):
            raise UserError(f"{where}: 'system' must be a string")
        if messages and messages[0].role == "system":
            raise UserError(f"{where}: both a 'system' field and a system message")
        messages.insert(0, Message("system", system))
    if not any(m.role != "system" for m in messages):
        raise UserError(f"{where}: a conversation needs at least one user or assistant message")
    tools = obj.get("tools")
    return Conversation(messages, parse_tools(tools, f"{where}: tools") if tools is not None else None)


def _sharegpt_items(items, where: str) -> list:
    """ShareGPT turns -> {"role", "content", "weight"?} dicts (errors name the turn and field)."""
    out = []
    for at, t in objects(items, where, "an object with 'from' and 'value'"):
        speaker, field = ("from", "value") if "from" in t or "role" not in t else ("role", "content")
        role = SHAREGPT_ROLES.get(t.get(speaker)) if isinstance(t.get(speaker), str) else None
        if role is None:
            raise UserError(f"{at}.{speaker}: {t.get(speaker)!r} is not one of {', '.join(SHAREGPT_ROLES)}")
        item = {"role": role, "content": t.get(field)}
        if t.get("weight") is not None:
            item["weight"] = t["weight"]
        out.append(item)
    return out


def _weighted(m: Message, item: dict, at: str) -> Message:
    """OpenAI's per-message `weight`: 0 or 1, on assistant messages only."""
    w = item.get("weight")
    if w is None:
        return m
    if isinstance(w, bool) or not isinstance(w, (int, float)) or w not in (0, 1):
        raise UserError(f"{at}.weight: must be 0 or 1, got {excerpt(w)}")
    if m.role != "assistant":
        raise UserError(f"{at}.weight: only assistant messages take a weight (this one is {m.role!r})")
    return Turn(m.role, m.content, float(w), tool_calls=m.tool_calls)


def read_records(records, skip_bad: bool, shape: str | None) -> Parsed:
    """`records`: (where, parsed JSON or a UserError) pairs; the first good one decides the shape."""
    out, skipped = [], []
    for where, obj in records:
        try:
            if isinstance(obj, UserError):
                raise obj
            if shape is None:
                shape = shape_of(obj)
            out.append(parse_record(obj, where, shape))
        except UserError as e:
            if not skip_bad or isinstance(e, EncodingError):  # a wrong encoding is the file's, not a record's
                raise
            skipped.append(str(e))
    return Parsed(out, skipped)


# --- JSONL ----------------------------------------------------------------------------------
def _jsonl_records(path: Path):
    for lineno, line in enumerate(lines(path), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", load_json(line, str(path), lineno)
        except EncodingError:
            raise
        except UserError as e:
            yield f"{path}:{lineno}", e


def read_jsonl(path: Path, skip_bad: bool = False, shape: str | None = None) -> Parsed:
    """One conversation per line, of the shape the first line has (OpenAI's or ShareGPT's)."""
    return read_records(_jsonl_records(path), skip_bad, shape)


def read_sharegpt(path: Path, skip_bad: bool = False) -> Parsed:
    """ShareGPT records, one per line, or a JSON array of them (the original ShareGPT dumps)."""
    if _first_char(path) == "[":
        return read_json_array(path, skip_bad, SHAREGPT)
    return read_jsonl(path, skip_bad, SHAREGPT)


def read_openai(path: Path, skip_bad: bool = False) -> Parsed:
    return read_jsonl(path, skip_bad, OPENAI)


# --- a JSON array of conversations ----------------------------------------------------------
_WS = " \t\r\n"


def _first_char(path: Path) -> str:
    for line in lines(path):
        if line.strip():
            return line.lstrip(_WS)[:1]
    return ""


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def array_items(text: str, where: str):
    """(line, element) of a JSON array, each element parsed on its own, so errors name its line."""
    decoder = json.JSONDecoder()
    i = _skip(text, 0)
    if text[i:i + 1] != "[":
        got = "an object" if text[i:i + 1] == "{" else "no JSON array" if i < len(text) else "an empty file"
        hint = " (one conversation per line is --format jsonl)" if text[i:i + 1] == "{" else ""
        raise UserError(f"{where}:{text.count(chr(10), 0, i) + 1}: expected a JSON array of conversations "
                        f"(format json), got {got}{hint}")
    line, seen = 1, 0  # the line at offset `seen`

    def line_at(pos: int) -> int:
        nonlocal line, seen
        line += text.count("\n", seen, pos)
        seen = pos
        return line

    i = _skip(text, i + 1)
    if text[i:i + 1] == "]":
        return
    while True:
        at = line_at(i)
        value, end = parse_json(lambda: decoder.raw_decode(text, i), where, near=at)  # noqa: B023 (called now)
        check_json_strings(value, where, text, at)
        yield at, value
        i = _skip(text, end)
        if text[i:i + 1] == ",":
            i = _skip(text, i + 1)
            continue
        if text[i:i + 1] == "]" and _skip(text, i + 1) == len(text):
            return
        raise UserError(f"{where}:{line_at(min(i, len(text)))}: not valid JSON (expected ',' or ']' after "
                        "an element of the array, and nothing after the array)")


def read_json_array(path: Path, skip_bad: bool = False, shape: str | None = None) -> Parsed:
    """A JSON file holding one array; each element a conversation record, or a bare list of
    {"role", "content"} messages."""
    text = read_file(path)

    def records():
        for k, (line, value) in enumerate(array_items(text, str(path))):
            yield f"{path}:{line}: [{k}]", {"messages": value} if isinstance(value, list) else value

    return read_records(records(), skip_bad, shape)
