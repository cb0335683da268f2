"""Text from files and stdin, checked where it enters: UTF-8 only, and no lone surrogates.

Bytes are decoded strictly (not with the surrogate escapes a C locale gives stdin), and JSON's
`\\ud800`-style escapes of half a character pair are refused too: neither can be tokenized.
Errors are `UserError`s naming `file:line` (and column).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from .errors import UserError

_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")  # a JSON escape of a surrogate code unit


class EncodingError(UserError):
    """Text that is not valid Unicode: never skipped as a bad record, the file is wrong."""


def decode(raw: bytes, where: str, first_line: int = 1) -> str:
    """`raw` as text; `first_line`: the line of the file it starts at, for errors."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + first_line
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise EncodingError(f"{where}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {column}: "
                            f"{e.reason})") from None


def read_file(path: str | Path, where: str | None = None) -> str:
    where = where or str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{where}: cannot read ({e.strerror})") from None
    return decode(raw, where)


def read_stdin() -> str:
    return decode(sys.stdin.buffer.read(), "<stdin>")


def lone_surrogate(s: str) -> int | None:
    """The index of the first lone surrogate in s, or None."""
    m = _SURROGATE.search(s)
    return None if m is None else m.start()


def check_line(line: str, where: str):
    """A line read as text (stdin in a C locale turns undecodable bytes into surrogates)."""
    i = lone_surrogate(line)
    if i is not None:
        raise EncodingError(f"{where}: not valid UTF-8 or a lone surrogate at column {i + 1}")


def load_json(text: str, where: str, line: int | None = None):
    """Parse JSON text (all of a file, or its line `line`); errors name `where:line`."""
    value = parse_json(lambda: json.loads(text), where, line, line)
    check_json_strings(value, where, text, line)
    return value


def parse_json(parse, where: str, line: int | None = None, near: int | None = None):
    """`parse()` with its JSON errors as one-line `UserError`s: at `where:line` (`line`: the file's
    line the parsed text is) or the error's own line; `near`: the line named for errors without one."""
    at = f"{where}:{near}" if near is not None else where
    try:
        return parse()
    except json.JSONDecodeError as e:
        raise UserError(f"{where}:{line or e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise UserError(f"{at}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # an integer of thousands of digits
        raise UserError(f"{at}: not valid JSON ({str(e).split(':')[0]})") from None


def check_json_strings(value, where: str, text: str, line: int | None = None):
    """Refuse a parsed JSON value holding a lone surrogate (from an escape such as "\\ud800");
    `text` is the JSON it came from, to name the line (or `line`, when it is one line of a file)."""
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, dict):
            todo.extend(v.keys())
            todo.extend(v.values())
        elif isinstance(v, list):
            todo.extend(v)
        elif isinstance(v, str) and lone_surrogate(v) is not None:
            raise EncodingError(f"{where}:{line or _escape_line(text)}: a lone surrogate (half of a UTF-16 pair, "
                                "e.g. \\ud800) is not valid Unicode text")


def _escape_line(text: str) -> int:
    """The line of the first surrogate escape not followed by its other half (1 if none is found)."""
    for m in _ESCAPE.finditer(text):
        high = m.group()[2].lower() == "d" and m.group()[3].lower() in "89ab"
        after = text[m.end():m.end() + 6]
        pairs = high and _ESCAPE.fullmatch(after) and after[3].lower() in "cdef"
        before = text[max(0, m.start() - 6):m.start()]
        paired_low = not high and _ESCAPE.fullmatch(before) and before[3].lower() in "89ab"
        if not pairs and not paired_low:
            return text.count("\n", 0, m.start()) + 1
    return 1
