"""Python functions as tools: a schema from the type hints and the docstring, and calling one.

    def lookup_order(order_id: int, detail: Literal["status", "items"] = "status") -> str:
        '''An order's status or items.

        Args:
            order_id: The order's number.
        '''

becomes `{"type": "function", "function": {"name": "lookup_order", "description": "An order's
status or items.", "parameters": {"type": "object", "properties": {"order_id": {"type":
"integer", "description": "The order's number."}, "detail": {"type": "string", "enum": [...],
"default": "status"}}, "required": ["order_id"], "additionalProperties": false}}}`.

Types: str, int, float, bool, None, Literal, Enum, list/tuple/set, dict[str, X], Optional and
Union, TypedDict and dataclasses (nested objects), Annotated[X, "description"]. A parameter
without a type hint, or `*args`/`**kwargs`, is a UserError naming it. Argument descriptions come
from a Google-style `Args:` section or Sphinx-style `:param name:` lines.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import re
import types
import typing

from ..errors import UserError

SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def function_tool(fn) -> dict:
    """The tool (OpenAI's shape) of a Python function."""
    name = getattr(fn, "__name__", None)
    if not callable(fn) or not name or not re.match(r"^[A-Za-z0-9_-]{1,64}$", name):
        raise UserError(f"tools: {fn!r} is not a named function")
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception as e:
        raise UserError(f"tools: {name}: its type hints cannot be read ({e})") from None
    description, arg_docs = _docstring(inspect.getdoc(fn) or "")
    props, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise UserError(f"tools: {name}: *{p.name} cannot be described to a model; name each parameter")
        if p.name not in hints:
            raise UserError(f"tools: {name}: the parameter {p.name!r} needs a type hint")
        schema = json_schema(hints[p.name], f"{name}.{p.name}")
        if p.name in arg_docs:
            schema.setdefault("description", arg_docs[p.name])
        if p.default is p.empty:
            required.append(p.name)
        elif _plain(p.default):
            schema["default"] = p.default.value if isinstance(p.default, enum.Enum) else p.default
        props[p.name] = schema
    f = {"name": name, **({"description": description} if description else {}),
         "parameters": {"type": "object", "properties": props, "required": required, "additionalProperties": False}}
    return {"type": "function", "function": f}


def _plain(value) -> bool:
    try:
        json.dumps(value.value if isinstance(value, enum.Enum) else value)
        return True
    except (TypeError, ValueError):
        return False


def json_schema(tp, where: str) -> dict:
    """The JSON schema of a Python type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        out = json_schema(args[0], where)
        notes = [a for a in args[1:] if isinstance(a, str)]
        return {**out, "description": notes[0]} if notes else out
    if tp in SIMPLE:
        return {"type": SIMPLE[tp]}
    if tp is typing.Any:
        return {}
    if origin is typing.Literal:
        kinds = {SIMPLE[type(a)] for a in args if type(a) in SIMPLE}
        return {**({"type": kinds.pop()} if len(kinds) == 1 else {}), "enum": list(args)}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [m.value for m in tp]}
    if origin in (typing.Union, types.UnionType):
        options = [json_schema(a, where) for a in args]
        return options[0] if len(options) == 1 else {"anyOf": options}
    if tp in (list, tuple, set, frozenset) or origin in (list, tuple, set, frozenset):
        item = args[0] if args and args[0] is not Ellipsis else typing.Any
        return {"type": "array", "items": json_schema(item, where)}
    if tp is dict or origin is dict:
        return {"type": "object", **({"additionalProperties": json_schema(args[1], where)} if args else {})}
    if typing.is_typeddict(tp):
        hints = typing.get_type_hints(tp, include_extras=True)
        return {"type": "object", "properties": {k: json_schema(v, f"{where}.{k}") for k, v in hints.items()},
                "required": sorted(tp.__required_keys__), "additionalProperties": False}
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp, include_extras=True)
        fields = dataclasses.fields(tp)
        return {"type": "object", "properties": {f.name: json_schema(hints[f.name], f"{where}.{f.name}") for f in fields},
                "required": [f.name for f in fields if f.default is dataclasses.MISSING
                             and f.default_factory is dataclasses.MISSING],
                "additionalProperties": False}
    raise UserError(f"tools: {where}: the type {tp!r} has no JSON schema here (use str, int, float, bool, "
                    "Literal, an Enum, list, dict, a TypedDict or a dataclass)")


def _docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(the description: the docstring's first paragraph, {argument: its description})."""
    description = doc.split("\n\n", 1)[0].strip().replace("\n", " ") if doc else ""
    if description.lower().startswith(("args:", "arguments:", "parameters:", ":param")):
        description = ""
    args, current, in_args = {}, None, False
    for line in doc.splitlines():
        sphinx = re.match(r"\s*:param\s+(?:\S+\s+)?(\w+):\s*(.*)", line)
        if sphinx:
            args[sphinx[1]] = sphinx[2].strip()
            continue
        if re.match(r"^\s*(Args|Arguments|Parameters):\s*$", line):
            in_args, current = True, None
            continue
        if in_args:
            m = re.match(r"^\s+(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", line)
            if m:
                current = m[1]
                args[current] = m[2].strip()
            elif line.strip() and current and line.startswith((" ", "\t")):
                args[current] = f"{args[current]} {line.strip()}".strip()
            elif line.strip() and not line.startswith((" ", "\t")):
                in_args = False
    return description, args


def call_function(fn, arguments: dict) -> str:
    """Run a tool's function with the model's arguments; its result as text (JSON unless a string).
    An exception is the result too (`error: ...`), so the model can read it and recover."""
    try:
        hints = typing.get_type_hints(fn)
        kwargs = {k: hints[k](v) if isinstance(hints.get(k), type) and issubclass(hints[k], enum.Enum) else v
                  for k, v in arguments.items()}
        result = fn(**kwargs)
    except Exception as e:  # the model's call failed: it gets to see why
        return f"error: {type(e).__name__}: {e}"
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(result)
