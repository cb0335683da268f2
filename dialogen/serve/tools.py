"""OpenAI tool calling in chat completions: the request's `tools`, `tool_choice` and
`parallel_tool_calls`, and a reply's calls as `tool_calls` (plain, or streamed as
`delta.tool_calls` pieces) with `finish_reason: "tool_calls"`.

With tools, the reply's grammar (`decoding/toolgrammar.py`) allows plain text or calls whose
names and arguments are valid; the calls are read back from the text in the template's own
syntax (`chat/toolformat.py`) and given fresh ids.
"""

from __future__ import annotations

from ..chat.toolformat import STYLES, openai_calls, parse_calls, parse_tools, tool_names
from ..decoding.toolgrammar import tool_grammar
from ..errors import UserError
from .protocol import ApiError


def read_tools(req, template, controls: dict, searches: bool) -> dict | None:
    """{"tools", "choice", "style", "grammar"} for a request that offers tools (None otherwise)."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "'tool_choice' needs 'tools'", "tool_choice")
        return None
    try:
        tools = parse_tools(req.tools, "tools")
    except UserError as e:
        raise ApiError(400, f"'{str(e).split(':')[0]}': {str(e).split(': ', 1)[-1]}", str(e).split(":")[0]) from None
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type", "function") == "function" else None
        choice = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(choice, str):
            raise ApiError(400, "'tool_choice' must be \"none\", \"auto\", \"required\" or "
                                "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
        if choice not in tool_names(tools):
            raise ApiError(400, f"'tool_choice': the function {choice!r} is not among the tools "
                                f"({', '.join(tool_names(tools))})", "tool_choice.function.name")
    choice = choice or "auto"
    if searches:
        raise ApiError(400, "'tools' are answered by one sampled (or greedy) reply, not with 'beam_size' or "
                            "'num_candidates' above 1", "tools")
    if req.response_format is not None and req.response_format.type != "text":
        raise ApiError(400, "'tools' and a JSON 'response_format' both set the reply's grammar: send one",
                       "response_format")
    style = template.tool_style
    grammar = None
    if choice != "none":
        try:
            grammar = tool_grammar(tools, style, choice, req.parallel_tool_calls is not False, controls)
        except UserError as e:
            param = str(e).split(":")[0]
            raise ApiError(400, f"'{param}': {str(e).split(': ', 1)[-1]}", param, code="invalid_json_schema") from None
    return {"tools": tools, "choice": choice, "style": style, "grammar": grammar}


def calls_of(text: str, tools: dict | None) -> list[dict] | None:
    """A reply's calls in OpenAI's shape (arguments as JSON text), or None for a plain reply."""
    if tools is None or tools["choice"] == "none":
        return None
    calls = parse_calls(text, tools["style"])
    return openai_calls(calls, tools["style"]) if calls else None


def stream_pieces(calls: list[dict]) -> list[dict]:
    """OpenAI's streamed `delta.tool_calls` for finished calls: per call, its id, type and name
    with empty arguments, then the arguments."""
    out = []
    for i, c in enumerate(calls):
        out.append({"tool_calls": [{"index": i, "id": c["id"], "type": "function",
                                    "function": {"name": c["function"]["name"], "arguments": ""}}]})
        out.append({"tool_calls": [{"index": i, "function": {"arguments": c["function"]["arguments"]}}]})
    return out


class Holder:
    """Streams a reply's text deltas unless it may be calls: while the text could still begin a
    call (its start is a prefix of the call syntax's opening, or the other way round) the deltas
    are held; a reply that turns out to be text gets them at once, one that is calls never."""

    def __init__(self, tools: dict | None, emit):
        s = STYLES[tools["style"]] if tools is not None and tools["choice"] != "none" else None
        self.prefix = ((s.head + s.open).strip() or "{") if s is not None else None
        self.emit, self.held, self.text, self.plain = emit, [], "", self.prefix is None

    def delta(self, piece: str, extra):
        if self.plain:
            self.emit(piece, extra)
            return
        self.held.append((piece, extra))
        self.text += piece
        start = self.text.lstrip()
        if start and not (start.startswith(self.prefix) or self.prefix.startswith(start)):
            self.plain = True
            for p, x in self.held:
                self.emit(p, x)
            self.held = []
