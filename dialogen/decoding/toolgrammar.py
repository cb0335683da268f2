"""The grammar of a reply when tools are offered: plain text, or calls that are valid by construction.

A call's name is one of the tools' names and its arguments match that tool's JSON schema (each
compiled by llguidance as in `constrain.py`, with the same fixed separators), written in the
model's own call syntax (`chat.toolformat.STYLES`). Plain text may not begin like a call, so a
reply is either text or calls, never a malformed call. `tool_choice`:
  auto      text or calls        required  calls only
  none      no grammar (text)    a name    exactly one call of that tool
`parallel`: several calls in one reply (else one).
"""

from __future__ import annotations

import json

from ..chat.toolformat import STYLES, call_lead, tool_names
from ..errors import UserError
from .constrain import JSON_OPTIONS, Grammar

CHOICES = ("none", "auto", "required")


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in ".^$*+?()[]{}|\\/-" else c for c in text)


def _literal(text: str, controls: dict) -> str:
    """`text` as Lark items: quoted strings, and `<[id]>` for each control token in it (a model
    writes those as one token, never as their characters)."""
    items, pos = [], 0
    while pos < len(text):
        hit = min(((text.find(c, pos), c) for c in controls if text.find(c, pos) >= 0), default=None)
        if hit is None:
            items.append(json.dumps(text[pos:]))
            break
        at, tok = hit
        if at > pos:
            items.append(json.dumps(text[pos:at]))
        items.append(f"<[{controls[tok]}]>")
        pos = at + len(tok)
    return " ".join(items) or '""'


def tool_grammar(tools: list[dict], style: str, choice="auto", parallel: bool = True, controls=None) -> Grammar:
    """The Lark grammar of a reply to `tools` (OpenAI's shape) in `style`; `choice` is "auto",
    "required" or a tool's name. A schema llguidance cannot use is a UserError naming the tool."""
    controls = {t: i for t, i in (controls or {}).items() if len(t) > 1}
    s = STYLES[style]
    names = tool_names(tools)
    if choice not in ("auto", "required") and choice not in names:
        raise UserError(f"tool_choice: {choice!r} is not one of the tools ({', '.join(names)})")
    rules = []
    for k, t in enumerate(tools):
        schema = t["function"]["parameters"]
        try:
            Grammar.json_schema(schema)
        except UserError as e:
            raise UserError(f"tools[{k}].function.parameters: {e}") from None
        head = json.dumps(f'{{"name": "{t["function"]["name"]}", "{s.args_key}": ')
        body = json.dumps({"x-guidance": JSON_OPTIONS, **schema}, ensure_ascii=False)
        rules.append(f"call_{k}: {_literal(s.open, controls)} {head} args_{k} \"}}\" {_literal(s.close, controls)}")
        rules.append(f"args_{k}: %json {body}")
    picked = [names.index(choice)] if choice in names else range(len(tools))
    rules.append("call: " + " | ".join(f"call_{k}" for k in picked))
    more = f" ({_literal(s.sep, controls)} call)*" if parallel and choice in ("auto", "required") else ""
    rules.append(f"calls: {_literal(s.head, controls)} call{more} {_literal(s.tail, controls)}")
    if choice == "auto":
        prefix = call_lead(style)
        rules.append(f"TEXT: /(.|\\n)+/ & ~/\\s*{_regex_escape(prefix)}(.|\\n)*/")
        rules.insert(0, "start: TEXT | calls")
    else:
        rules.insert(0, "start: calls")
    g = Grammar("\n".join(rules), lark=True)
    g.check()
    return g
