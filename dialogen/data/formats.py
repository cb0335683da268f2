"""Data files -> conversations (lists of `Message` with roles system/user/assistant).

Formats (`FORMATS`, picked by name or by the file's extension):

- `chitchat`: the chitchat-dataset package (real human chats), no file needed. Consecutive
  messages of one sender form one turn (joined by a space); the first speaker is `user`, the
  other `assistant`, alternating.
- `jsonl` (`.jsonl`): one conversation per line, `{"messages": [{"role", "content"}, ...]}`,
  optionally `"system"` (or `"persona"`): a string put first as the system message.
- `tsv` (`.tsv`), DialoGPT's format: `turn EOS turn EOS ... <TAB> response`. Turns alternate
  backwards from the response, which is always `assistant`. A line whose every turn starts with
  a decimal weight (`0.0 hi EOS 1.0 hello <TAB> 1.0 how are you`) is weighted: a turn of weight
  0 is never trained; the weights are stripped from the text.
- `text` (`.txt`): one turn per line, a blank line between dialogues; user first, alternating.

Errors name `file:line: reason`. With `skip_bad`, a bad line (or dialogue) is skipped and
counted instead, and the reasons are returned.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..chat.messages import Message, parse_messages
from ..errors import UserError
from ..textio import EncodingError, decode, load_json, read_file


@dataclass
class Turn(Message):
    """A message with a training weight: 0 means never trained (DialoGPT's weighted TSV)."""

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


EXTENSIONS = {".jsonl": "jsonl", ".tsv": "tsv", ".txt": "text"}


def alternate(texts: list[str], last_role: str | None = None) -> list[Message]:
    """Two speakers taking turns: user first, or ending on `last_role` when given."""
    roles = ("user", "assistant")
    if last_role is None:
        return [Message(roles[i % 2], t) for i, t in enumerate(texts)]
    flip = len(texts) % 2 if last_role == "assistant" else (len(texts) - 1) % 2
    return [Message(roles[(i + flip) % 2], t) for i, t in enumerate(texts)]


# --- chitchat -------------------------------------------------------------------------------
def chitchat_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the chitchat dataset is not installed: pip install chitchat-dataset")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset.json"


def read_chitchat(path: Path, skip_bad: bool = False) -> Parsed:
    data = load_json(read_file(path), str(path))
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected the chitchat dataset's JSON object of conversations")
    out, skipped = [], []
    for key, conv in data.items():
        try:
            turns = _chitchat_turns(conv, f"{path}: conversation {json.dumps(key)[:40]}")
        except UserError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        if len(turns) >= 2:  # else nothing to answer
            out.append(alternate([t for _, t in turns]))
    return Parsed(out, skipped)


def _chitchat_turns(conv, where: str) -> list[tuple[str, str]]:
    """(sender, text) turns: consecutive messages of one sender joined."""
    groups = conv.get("messages", []) if isinstance(conv, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
        raise UserError(f"{where}: expected {{\"messages\": [[{{\"sender\", \"text\"}}, ...], ...]}}")
    turns: list[tuple[str, str]] = []
    for group in groups:
        for utt in group:
            if not isinstance(utt, dict) or not isinstance(utt.get("text", ""), str):
                raise UserError(f"{where}: a message must be an object with a string 'text'")
            text = " ".join(utt.get("text", "").split())
            if not text:
                continue
            sender = json.dumps(utt.get("sender"))
            if turns and turns[-1][0] == sender:
                turns[-1] = (sender, turns[-1][1] + " " + text)
            else:
                turns.append((sender, text))
    return turns


# --- JSONL ----------------------------------------------------------------------------------
def _jsonl_line(line: str, where: str, lineno: int) -> list[Message]:
    obj = load_json(line, where, lineno)
    where = f"{where}:{lineno}"
    if not isinstance(obj, dict) or "messages" not in obj:
        raise UserError(f"{where}: expected an object with a 'messages' list")
    messages = parse_messages(obj["messages"], f"{where}: messages")
    system = obj.get("system", obj.get("persona"))
    if system is not None:
        if not isinstance(system, str):
            raise UserError(f"{where}: 'system' must be a string")
        if messages and messages[0].role == "system":
            raise UserError(f"{where}: both a 'system' field and a system message")
        messages.insert(0, Message("system", system))
    if not any(m.role != "system" for m in messages):
        raise UserError(f"{where}: a conversation needs at least one user or assistant message")
    return messages


def read_jsonl(path: Path, skip_bad: bool = False) -> Parsed:
    out, skipped = [], []
    for lineno, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            out.append(_jsonl_line(line, str(path), lineno))
        except UserError as e:
            if not skip_bad or isinstance(e, EncodingError):  # a wrong encoding is the file's, not a line's
                raise
            skipped.append(str(e))
    return Parsed(out, skipped)


# --- DialoGPT TSV ---------------------------------------------------------------------------
_WEIGHT = re.compile(r"^(\d+\.\d+) (.*)$", re.S)


def _tsv_line(line: str, where: str) -> list[Message]:
    cols = line.rstrip("\r\n").split("\t")
    if len(cols) != 2:
        raise UserError(f"{where}: expected 'context EOS context ... <TAB> response' "
                        f"(2 tab-separated columns), got {len(cols)}")
    texts = [t.strip() for t in cols[0].split(" EOS ")] + [cols[1].strip()]
    if any(not t for t in texts):
        raise UserError(f"{where}: an empty turn (check the ' EOS ' separators and the response)")
    weighted = [_WEIGHT.match(t) for t in texts]
    weights = [1.0] * len(texts)
    if all(weighted):
        weights = [float(m.group(1)) for m in weighted]
        texts = [m.group(2).strip() for m in weighted]
        if any(not t for t in texts):
            raise UserError(f"{where}: a weighted turn has no text")
    msgs = alternate(texts, last_role="assistant")
    return [Turn(m.role, m.content, w) for m, w in zip(msgs, weights)]


def read_tsv(path: Path, skip_bad: bool = False) -> Parsed:
    out, skipped = [], []
    for lineno, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            out.append(_tsv_line(line, f"{path}:{lineno}"))
        except UserError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
    return Parsed(out, skipped)


# --- plain text -----------------------------------------------------------------------------
def read_text(path: Path, skip_bad: bool = False) -> Parsed:
    out: list[list[Message]] = []
    block: list[str] = []
    for line in [*_lines(path), ""]:  # a final blank line closes the last dialogue
        text = line.strip()
        if text:
            block.append(text)
        elif block:
            out.append(alternate(block))
            block = []
    return Parsed(out, [])


FORMATS = {"chitchat": read_chitchat, "jsonl": read_jsonl, "tsv": read_tsv, "text": read_text}


def _lines(path: Path):
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


def resolve_format(dataset: str, fmt: str | None) -> tuple[str, Path]:
    """(format name, file path) for a dataset name or file path and an optional --format."""
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    if dataset == "chitchat" and fmt in (None, "chitchat"):
        return "chitchat", chitchat_path()
    path = Path(dataset).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such data file (or use the built-in dataset 'chitchat')")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a data file")
    if fmt is None:
        fmt = EXTENSIONS.get(path.suffix.lower())
        if fmt is None:
            raise UserError(f"{path}: unknown format for extension {path.suffix or '(none)'!r}; "
                            f"pass --format ({', '.join(FORMATS)})")
    return fmt, path


def read_conversations(dataset: str, fmt: str | None = None, skip_bad: bool = False) -> Parsed:
    fmt, path = resolve_format(dataset, fmt)
    return FORMATS[fmt](path, skip_bad)
