"""Tools in `dialogen chat --tools FILE`: the tools offered and what runs them.

FILE is a JSON list of tools (OpenAI's shape; the user types each call's result at a `result>`
prompt), or a Python file whose public functions are the tools (their schemas from type hints
and docstrings, `chat/functions.py`), run when the model calls them. After a reply that calls
tools, their results go back to the model, which replies again (at most `MAX_STEPS` times).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
from pathlib import Path

from ..decoding.toolgrammar import tool_grammar
from ..errors import UserError
from ..textio import load_json, read_file
from .functions import call_function, function_tool
from .messages import Message
from .session import Session
from .toolformat import openai_calls, parse_calls, parse_tools

MAX_STEPS = 4


def load_tools_file(path: str) -> tuple[list[dict], dict]:
    """(tools, {name: Python function}) from a .py or a JSON file."""
    if path.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(path).stem, path)
        if spec is None or not Path(path).is_file():
            raise UserError(f"--tools {path}: no such file")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise UserError(f"--tools {path}: the file fails to run: {type(e).__name__}: {e}") from None
        functions = {n: f for n, f in vars(module).items()
                     if inspect.isfunction(f) and not n.startswith("_") and f.__module__ == module.__name__}
        if not functions:
            raise UserError(f"--tools {path}: the file defines no public function")
        tools = parse_tools([function_tool(f) for f in functions.values()], f"--tools {path}")
        return tools, functions
    return parse_tools(load_json(read_file(path), path), f"--tools {path}"), {}


def offer_tools(session: Session, tools: list[dict], functions: dict, choice: str = "auto"):
    """Offer `tools` in the session's replies: shown by the template, calls constrained to them.
    `choice` ("auto", "required" or "none") is the grammar's `tool_choice`; under "none" the tools
    are shown, the reply is unconstrained and read as text."""
    if session.sampling.constraint is not None:
        raise UserError("--tools cannot be combined with --json or --json-schema")
    session.tools, session.tool_functions, session.tool_choice = tools, functions, choice
    if choice == "none":
        return
    tok = session.engine.tokenizer
    grammar = tool_grammar(tools, session.engine.template.tool_style, choice, True, tok.control_ids)
    session.sampling = session.sampling.replace(constraint=grammar)


def reply_with_tools(session: Session, text: str, out, ask=input) -> None:
    """Send `text`; while the reply calls tools, show the calls, run them (or `ask` for each
    result) and let the model go on."""
    style = session.engine.template.tool_style
    gen = session.send(text)
    for step in range(MAX_STEPS):
        reply = gen.run().text
        last = step == MAX_STEPS - 1  # decoded without the grammar: read as text, whatever it holds
        calls = parse_calls(reply, style) if session.tool_choice != "none" and not last else None
        if not calls:
            out.write(reply + "\n")
            return
        made = openai_calls(calls, style)
        session.messages[-1] = Message("assistant", "", tool_calls=[
            {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}} for c in made])
        for c in made:
            name, args = c["function"]["name"], c["function"]["arguments"]
            out.write(f"[calls {name}({args})]\n")
            out.flush()
            fn = session.tool_functions.get(name)
            result = call_function(fn, json.loads(args)) if fn is not None else ask(f"result of {name}> ")
            if fn is not None:
                out.write(f"[{name} returns] {result}\n")
            session.messages.append(Message("tool", result, tool_call_id=c["id"], name=name))
        gen = _answer(session) if step == MAX_STEPS - 2 else session.respond()  # the last reply is in words


def _answer(session: Session):
    """A reply without the tools' grammar (the last step of a turn)."""
    kept = session.sampling
    session.sampling = dataclasses.replace(kept, constraint=None)
    try:
        return session.respond()
    finally:
        session.sampling = kept
