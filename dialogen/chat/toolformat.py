"""Tools a model may call: their schemas, how a model family writes calls, and reading calls back.

A tool is OpenAI's `{"type": "function", "function": {"name", "description", "parameters"}}`,
`parameters` being a JSON schema of the arguments object.

Each family writes calls its own way; `style_of` tells them apart by the chat template's text:
  hermes   `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call
           (Qwen2.5, Hermes-2-Pro)
  llama3   a bare JSON object `{"name": ..., "parameters": {...}}` (Llama-3.1/3.2), calls joined by "; "
  mistral  `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` (Mistral v0.3)
  generic  for templates that know no tools (SmolLM2's): the tools' schemas go at the end of the
           system message (`tools_prompt`), each call is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
           on a line of its own in the assistant's content, and a tool's result is a user message
           `<tool_response>\\n...\\n</tool_response>`.
A reply is either plain text or calls only; `parse_calls` reads the calls out of a reply.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass

from ..errors import UserError

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def parse_tools(data, where: str = "tools") -> list[dict]:
    """OpenAI's `tools` list -> tools in the same shape, with `parameters` always set; errors name
    the element and field. A bare `{"name", "parameters"}` is taken as its function."""
    if not isinstance(data, list):
        raise UserError(f"{where}: expected a list of tools")
    out, seen = [], set()
    for i, t in enumerate(data):
        at = f"{where}[{i}]"
        if not isinstance(t, dict):
            raise UserError(f"{at}: expected {{\"type\": \"function\", \"function\": {{\"name\", \"parameters\"}}}}")
        if t.get("type", "function") != "function":
            raise UserError(f"{at}.type: only \"function\" tools are supported, got {t.get('type')!r}")
        fn = t.get("function", t if "name" in t else None)
        if not isinstance(fn, dict):
            raise UserError(f"{at}.function: expected an object with 'name' and 'parameters'")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise UserError(f"{at}.function.name: must be 1 to 64 letters, digits, '_' or '-', got {name!r}")
        if name in seen:
            raise UserError(f"{at}.function.name: {name!r} is offered twice")
        seen.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise UserError(f"{at}.function.parameters: must be a JSON schema (an object)")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise UserError(f"{at}.function.description: must be a string")
        f = {"name": name, **({"description": desc} if desc is not None else {}), "parameters": params}
        out.append({"type": "function", "function": f})
    return out


def tool_names(tools: list[dict]) -> list[str]:
    return [t["function"]["name"] for t in tools]


# --- how each family writes calls -----------------------------------------------------------
@dataclass(frozen=True)
class CallSyntax:
    """Calls as text: `head` + call (`sep` call)* + `tail`, each call `open` + JSON + `close`,
    the JSON being {"name": ..., args_key: {...}}."""

    head: str
    tail: str
    open: str
    close: str
    sep: str
    args_key: str = "arguments"


STYLES = {
    "hermes": CallSyntax("", "", "<tool_call>\n", "\n</tool_call>", "\n"),
    "llama3": CallSyntax("", "", "", "", "; ", "parameters"),
    "mistral": CallSyntax("[TOOL_CALLS] [", "]", "", "", ", "),
    "generic": CallSyntax("", "", "<tool_call>", "</tool_call>", "\n"),
}


def style_of(template_source: str) -> str:
    """The call style of a chat template: generic when the template does not use `tools`."""
    if "tools" not in template_source:
        return "generic"
    if "[TOOL_CALLS]" in template_source:
        return "mistral"
    if "<tool_call>" in template_source:
        return "hermes"
    if '"parameters"' in template_source or "<|python_tag|>" in template_source:
        return "llama3"
    return "generic"


def call_lead(style: str) -> str:
    """What a reply of calls in `style` starts with (after spaces), and text may not: Mistral's marker
    alone (a token of its own, which models follow with the list with or without a space)."""
    if style == "mistral":
        return "[TOOL_CALLS]"
    s = STYLES[style]
    return (s.head + s.open).strip() or "{"


def call_json(name: str, arguments: dict, args_key: str = "arguments") -> str:
    return json.dumps({"name": name, args_key: arguments}, ensure_ascii=False)


def calls_text(calls: list[dict], style: str = "generic") -> str:
    """An assistant's `tool_calls` written in `style`."""
    s = STYLES[style]
    body = s.sep.join(s.open + call_json(c["function"]["name"], c["function"]["arguments"], s.args_key) + s.close
                      for c in calls)
    return s.head + body + s.tail


# --- the generic format ---------------------------------------------------------------------
def tools_prompt(tools: list[dict]) -> str:
    """What the generic format adds to the system message: the tools and how to call them."""
    lines = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return ("You can call these tools (each one's arguments are described by a JSON schema):\n<tools>\n"
            f"{lines}\n</tools>\nTo call tools, reply with one line per call, and nothing else: "
            '<tool_call>{"name": "<tool name>", "arguments": {<arguments>}}</tool_call>\n'
            "Each result comes back as <tool_response>...</tool_response>.")


def response_text(content: str) -> str:
    """A tool's result as the generic format shows it (in a user message)."""
    return f"<tool_response>\n{content}\n</tool_response>"


# --- reading calls back ---------------------------------------------------------------------
def parse_calls(text: str, style: str) -> list[dict] | None:
    """The calls a reply makes, as [{"name", "arguments": dict}], or None when it is plain text
    (or not calls written in `style`)."""
    body = text.strip()
    if style == "llama3":
        body = body.removeprefix("<|python_tag|>").strip()
    lead = call_lead(style)
    if not body.startswith(lead):
        return None
    if style == "mistral":
        items = _json_value(body[len(lead):].strip())
        items = items if isinstance(items, list) else None
    elif style == "llama3":
        items = _json_sequence(body)
    else:
        items = _tagged_json(body, "<tool_call>", "</tool_call>")
    if not items or any(not isinstance(c, dict) or not isinstance(c.get("name"), str) for c in items):
        return None
    out = []
    for c in items:
        args = c.get("arguments", c.get("parameters", {}))
        if isinstance(args, str):
            args = _json_value(args)
        if not isinstance(args, dict):
            return None
        out.append({"name": c["name"], "arguments": args})
    return out


def call_id(style: str) -> str:
    """A fresh call id: Mistral's templates take 9 letters and digits, others OpenAI's `call_` form."""
    if style == "mistral":
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return "call_" + secrets.token_hex(12)


def openai_calls(calls: list[dict], style: str) -> list[dict]:
    """Parsed calls as OpenAI's `tool_calls` (arguments as JSON text), each with a fresh id."""
    return [{"id": call_id(style), "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


def _json_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _tagged_json(text: str, open_tag: str, close_tag: str) -> list | None:
    """The JSON values of `open_tag` JSON `close_tag` blocks one after another (whitespace between;
    text after the last block is left). Each value is read as JSON, so a string holding the close
    tag does not end its block."""
    dec, pos, out = json.JSONDecoder(), 0, []
    while text.startswith(open_tag, pos):
        pos = _skip_space(text, pos + len(open_tag))
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        pos = _skip_space(text, pos)
        if not text.startswith(close_tag, pos):
            return None
        out.append(obj)
        pos = _skip_space(text, pos + len(close_tag))
    return out


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _json_sequence(text: str) -> list | None:
    """JSON objects one after another, joined by ';' or whitespace."""
    dec, pos, out = json.JSONDecoder(), 0, []
    while pos < len(text):
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        out.append(obj)
        while pos < len(text) and text[pos] in "; \n\t":
            pos += 1
    return out


# --- a client's strings in a rendered text -----------------------------------------------------
def json_strings(x):
    """Every string in a JSON value, keys included."""
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield k
            yield from json_strings(v)
    elif isinstance(x, list):
        for v in x:
            yield from json_strings(v)


def data_spans(text: str, calls: list, tools, controls) -> list[tuple[int, int]]:
    """Where the strings of tool calls and tool schemas (a client's data, which a template writes
    as JSON) that hold a control token appear in `text`: like contents, no control token may come
    from them (`Tokenizer.encode_chat`)."""
    values = set(json_strings(calls)) | set(json_strings(tools or []))
    out = []
    for v in (v for v in values if any(c in v for c in controls)):
        for form in {v, json.dumps(v, ensure_ascii=False)[1:-1]}:
            at = text.find(form)
            while at >= 0:
                out.append((at, at + len(form)))
                at = text.find(form, at + 1)
    return out


def merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Character spans sorted, overlapping ones joined."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
