"""Data files -> conversations (lists of `Message` with roles system/user/assistant).

Formats (`FORMATS`, picked by name or by the file's extension):

- `chitchat`: the chitchat-dataset package (real human chats), no file needed. Consecutive
  messages of one sender form one turn (joined by a space); the first speaker is `user`, the
  other `assistant`, alternating.
- `jsonl` (`.jsonl`): one conversation per line, in OpenAI's chat fine-tuning shape
  `{"messages": [{"role", "content", "weight"?}, ...]}` (`"weight": 0` on an assistant message:
  never trained) or ShareGPT's `{"conversations": [{"from", "value"}, ...]}`; the first line
  decides which (see `records`). `openai` and `sharegpt` name one shape each.
- `json` (`.json`): one JSON array of such records (or of bare message lists).
- `parquet` (`.parquet`), `csv` (`.csv`): a row per conversation, with a `messages` or a
  `conversations` column (see `tables`; needs pyarrow).
- `tsv` (`.tsv`), DialoGPT's format: `turn EOS turn EOS ... <TAB> response`. Turns alternate
  backwards from the response, which is always `assistant`. Read as DialoGPT's `prepro.py`
  reads it: a turn whose first word is a number (`0.0 hi`, `1 hello`) has it as its weight, any
  other turn weight 1.0; weight 0 is never trained, and a response of weight 0 is dropped. So a
  turn that starts with a number (`20 years old .`) loses it, as in DialoGPT.
- `text` (`.txt`): one turn per line, a blank line between dialogues; user first, alternating.
  A file of another kind (a `.csv`, JSON records, a header with a `messages` column) is refused.

Errors name `file:line: reason` (a table's row, a JSON array's element and line). With
`skip_bad`, a bad line (or dialogue) is skipped and counted instead, and the reasons are returned.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from ..chat.messages import Message
from ..errors import UserError
from ..textio import load_json, read_file
from .records import Parsed, Turn, lines, read_json_array, read_jsonl, read_openai, read_sharegpt
from .tables import read_csv, read_parquet

EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".txt": "text"}


def alternate(texts: list[str], last_role: str | None = None) -> list[Message]:
    """Two speakers taking turns: user first, or ending on `last_role` when given."""
    roles = ("user", "assistant")
    if last_role is None:
        return [Message(roles[i % 2], t) for i, t in enumerate(texts)]
    flip = len(texts) % 2 if last_role == "assistant" else (len(texts) - 1) % 2
    return [Message(roles[(i + flip) % 2], t) for i, t in enumerate(texts)]


# --- chitchat -------------------------------------------------------------------------------
def chitchat_path() -> Path:
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


# --- DialoGPT TSV ---------------------------------------------------------------------------
def dialogpt_turn(text: str, where: str) -> tuple[float, str]:
    """(weight, text) of one turn, as DialoGPT's `prepro.py` reads it: the first word is the
    weight when Python's float() takes it (`1`, `0.0`, `1e0`), else the weight is 1.0 and the
    word stays; words are joined by single spaces."""
    words = text.split()
    if not words:
        raise UserError(f"{where}: an empty turn (check the ' EOS ' separators and the response)")
    try:
        weight = float(words[0])
    except ValueError:
        return 1.0, " ".join(words)
    if not math.isfinite(weight) or weight < 0:
        raise UserError(f"{where}: weight {words[0]!r} is not a finite number >= 0 (a turn's first word is read "
                        "as its weight when it is a number, as DialoGPT does)")
    if len(words) == 1:
        raise UserError(f"{where}: a weighted turn has no text (weight {words[0]!r})")
    return weight, " ".join(words[1:])


def _tsv_line(line: str, where: str) -> list[Message]:
    cols = line.strip().split("\t")
    if len(cols) != 2:
        raise UserError(f"{where}: expected 'context EOS context ... <TAB> response' "
                        f"(2 tab-separated columns), got {len(cols)}")
    turns = [dialogpt_turn(t, where) for t in cols[0].split(" EOS ")] + [dialogpt_turn(cols[1], where)]
    msgs = alternate([t for _, t in turns], last_role="assistant")
    out = [Turn(m.role, m.content, w) for m, (w, _) in zip(msgs, turns)]
    return out[:-1] if turns[-1][0] == 0 else out  # DialoGPT drops a response of weight 0


def read_tsv(path: Path, skip_bad: bool = False) -> Parsed:
    out, skipped = [], []
    for lineno, line in enumerate(lines(path), 1):
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
STRUCTURED = {".csv", ".tsv", ".json", ".jsonl", ".parquet"}


def read_text(path: Path, skip_bad: bool = False) -> Parsed:
    if path.suffix.lower() in STRUCTURED:
        fmt = EXTENSIONS[path.suffix.lower()]
        raise UserError(f"{path}: --format text reads each line as a turn; a {path.suffix} file is read with "
                        f"--format {fmt} (rename it if it really is plain text)")
    out: list[list[Message]] = []
    block: list[str] = []
    for lineno, line in enumerate([*lines(path), ""], 1):  # a final blank line closes the last dialogue
        text = line.strip()
        if text and not out and not block:
            _not_records(text, f"{path}:{lineno}")
        if text:
            block.append(text)
        elif block:
            out.append(alternate(block))
            block = []
    return Parsed(out, [])


def _not_records(first: str, where: str):
    """Refuse a first line that shows the file is JSON records or a table, not turns."""
    if first[0] in "[{":
        try:
            value = json.loads(first)
        except (ValueError, RecursionError):  # not JSON, or nested too deeply to tell: read as text
            value = None
        if isinstance(value, (dict, list)):
            raise UserError(f"{where}: expected plain text (a turn per line) for --format text; this line is JSON: "
                            "use --format jsonl (a conversation per line) or json (one array)")
    header = [c.strip().strip('"').lower() for c in first.split(",")]
    if len(header) > 1 and ("messages" in header or "conversations" in header):
        raise UserError(f"{where}: expected plain text (a turn per line) for --format text; this line is a CSV "
                        "header with a messages/conversations column: use --format csv")


FORMATS = {"chitchat": read_chitchat, "jsonl": read_jsonl, "openai": read_openai, "sharegpt": read_sharegpt,
           "json": read_json_array, "parquet": read_parquet, "csv": read_csv, "tsv": read_tsv, "text": read_text}


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
