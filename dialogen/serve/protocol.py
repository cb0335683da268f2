"""The OpenAI chat-completions protocol: reading request bodies, errors, response objects.

A body is read as JSON here (UTF-8, finite numbers, no lone surrogates, bounded nesting), then
parsed by the pydantic models of `schema.py`; every mistake gets one OpenAI-style error naming
the field: `{"error": {"message", "type", "param", "code"}}`. Parsed fields map onto `Sampling`
and `Decoding`. A field the server does not act on is ignored and named in the response header
`x-dialogen-ignored-fields`; a feature that would change the reply and that this server does not
have (a `grammar`, audio, ...) is refused with a 400 naming it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import secrets
import time

from pydantic import BaseModel, ValidationError

from ..chat.messages import Message, parse_messages
from ..decoding.constrain import Grammar
from ..decoding.settings import Sampling, SettingError
from ..errors import UserError
from .schema import ChatRequest, DecodeFields, first_error, kind

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "frequency_penalty", "presence_penalty",
                   "no_repeat_ngram", "seed", "stop")
DECODING_FIELDS = ("num_candidates", "beam_size", "candidates", "scorer", "length_penalty")
# fields that would change the reply, which this server cannot honour: refused rather than ignored
UNSUPPORTED = {"functions": "the legacy 'functions' (use 'tools')", "function_call": "the legacy 'function_call' "
               "(use 'tool_choice')", "audio": "audio output",
               "prediction": "predicted outputs",
               "grammar": "a GBNF 'grammar' (use response_format with a JSON schema)"}
IGNORED_HEADER = "x-dialogen-ignored-fields"


class ApiError(Exception):
    """An error the client caused (4xx) or a server state (503); becomes an OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object; the message is one line of valid text whatever the client sent
    (an echoed model name or session id may hold newlines or lone surrogates)."""
    return {"error": {"message": one_line(message), "type": type, "param": None if param is None else one_line(param),
                      "code": code}}


def one_line(text: str, limit: int = 1000) -> str:
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    text = re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


MAX_DEPTH = 32  # nesting of objects and arrays in a request body (OpenAI's bodies need about 5)


def parse_json_body(raw: bytes) -> dict:
    """The body as plain JSON values: UTF-8, finite numbers, no lone surrogates, bounded nesting."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (bad byte at offset {e.start})",
                       code="invalid_utf8") from None
    if not text.strip():
        raise ApiError(400, "the request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                       code="invalid_json") from None
    except ValueError as e:  # NaN/Infinity, or an integer of thousands of digits
        raise ApiError(400, f"the request body is not valid JSON: {str(e).split(':')[0]}",
                       code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, f"the request body nests objects and arrays deeper than {MAX_DEPTH} levels",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {kind(body)}", code="invalid_json")
    _check_values(body)
    return body


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _check_values(body: dict):
    """Walk the parsed body once, without recursion: depth, finite numbers, strings that encode
    as UTF-8. A path is a linked (parent, key) pair, formatted only for an error."""
    todo = [(body, None, 1)]
    while todo:
        v, at, depth = todo.pop()
        if isinstance(v, (dict, list)):
            if depth > MAX_DEPTH:
                raise ApiError(400, f"the request body nests objects and arrays deeper than {MAX_DEPTH} levels",
                               code="invalid_json")
            for k, x in v.items() if isinstance(v, dict) else enumerate(v):
                if isinstance(k, str) and _surrogate_at(k) is not None:  # before the key is part of a path
                    where = f"a key in '{_path(at)}'" if at else "a key"
                    raise _surrogate_error(where, None, k)
                todo.append((x, (at, k), depth + 1))
        elif isinstance(v, str) and _surrogate_at(v) is not None:
            raise _surrogate_error(f"'{_path(at)}'", _path(at), v)
        elif isinstance(v, str) and "\x00" in v:  # no session store (PostgreSQL's text) can keep it
            raise ApiError(400, f"'{_path(at)}' holds a NUL character (\\u0000) at character {v.index(chr(0))}",
                           _path(at), code="invalid_string")
        elif isinstance(v, float) and not math.isfinite(v):  # 1e400 parses as infinity
            raise ApiError(400, f"'{_path(at)}' is not a finite number", _path(at))


def _path(at) -> str | None:
    """(((None, 'messages'), 0), 'content') -> 'messages[0].content'."""
    parts = []
    while at is not None:
        at, k = at
        parts.append(f"[{k}]" if isinstance(k, int) else f".{k}")
    out = "".join(reversed(parts)).lstrip(".")
    return (out if len(out) <= 80 else out[:77] + "...") or None


def _surrogate_at(s: str) -> int | None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _surrogate_error(where: str, param: str | None, s: str) -> ApiError:
    i = _surrogate_at(s)
    return ApiError(400, f"{where} has a lone surrogate (\\u{ord(s[i]):04x}) at character {i}: not valid Unicode "
                         "text", param, code="invalid_string")


def validate(model: type[BaseModel], body: dict, where: str | None = None):
    """`model` parsed from `body`; the first mistake as a 400 naming the field (under `where`)."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        param, message = first_error(e)
        if where:
            param, message = f"{where}.{param}", f"{where}: {message}"
        raise ApiError(400, message, param) from None


def read_request(svc, model: type[BaseModel], body: dict):
    """(the parsed request, the top-level fields it ignores) of a completions body, for a model
    name `svc` answers."""
    ignored = refuse_unsupported(body, model.model_fields)
    req = validate(model, body)
    if not svc.accepts_model(req.model):
        raise model_not_found(svc.model_names(), req.model)
    return req, ignored


def refuse_unsupported(body: dict, known) -> list[str]:
    """400 for a feature the server lacks; returns the top-level fields it will ignore (those not
    in `known`), for the `x-dialogen-ignored-fields` header."""
    for key, what in UNSUPPORTED.items():
        v = body.get(key)
        if v not in (None, False, [], {}, ""):
            raise ApiError(400, f"'{key}': {what} is not supported by this server", key,
                           code="unsupported_parameter")
    return [k for k in body if k not in known]


def ignored_header(names: list[str]) -> dict:
    """The header naming ignored fields (printable ASCII, bounded), or no header."""
    if not names:
        return {}
    shown = [one_line(n, 60).encode("ascii", "backslashreplace").decode("ascii").replace(",", "\\x2c")
             for n in names[:20]]
    return {IGNORED_HEADER: ", ".join(shown) + (", ..." if len(names) > 20 else "")}


def logit_bias(bias: dict, vocab_size: int) -> dict:
    """OpenAI's {"token id": bias} as {id: bias}; a key that is no token id of the model gets 400."""
    out = {}
    for key, value in bias.items():
        if not key.isascii() or not key.isdigit() or int(key) >= vocab_size:
            raise ApiError(400, f"'logit_bias': {json.dumps(key)[:40]} is not a token id of this model "
                                f"(0..{vocab_size - 1})", "logit_bias")
        out[int(key)] = value
    return out


def sampling_changes(fields: DecodeFields, max_tokens_limit: int, vocab_size: int) -> dict:
    """The decoding fields set in `fields`, as `Sampling` field changes (unset fields left out)."""
    changes = fields.model_dump(include=set(SAMPLING_FIELDS), exclude_none=True)
    if fields.logit_bias is not None:
        changes["logit_bias"] = logit_bias(fields.logit_bias, vocab_size)
    if fields.response_format is not None:
        changes["constraint"] = constraint(fields.response_format)
    key = "max_completion_tokens" if getattr(fields, "max_completion_tokens", None) is not None else "max_tokens"
    mt = getattr(fields, key)
    if mt is not None:
        if mt > max_tokens_limit:
            raise ApiError(400, f"'{key}' must be at most {max_tokens_limit} on this server, got {mt}", key)
        changes["max_new_tokens"] = mt
    return changes


def constraint(fmt):
    """The `Grammar` a response_format asks for (None for text); a schema it cannot use gets 400."""
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Grammar.json_object()
    if fmt.json_schema is None:
        raise ApiError(400, "'response_format': type json_schema needs 'json_schema': {\"name\": ..., \"schema\": {...}}",
                       "response_format.json_schema")
    try:
        return Grammar.json_schema(fmt.json_schema.json_schema)
    except UserError as e:
        raise ApiError(400, f"'response_format.json_schema.schema': {e}", "response_format.json_schema.schema",
                       code="invalid_json_schema") from None


def decoding_changes(fields: DecodeFields, max_candidates: int) -> dict:
    """Search and reranking fields (beam search, sample-and-rank) as `Decoding` field changes."""
    changes = fields.model_dump(include=set(DECODING_FIELDS), exclude_none=True)
    for key in ("num_candidates", "beam_size"):
        if changes.get(key, 1) > max_candidates:
            raise ApiError(400, f"'{key}' must be at most {max_candidates} on this server, got {changes[key]}", key)
    return changes


def logprobs_setting(req, searches: bool) -> int | None:
    """`Sampling.logprobs` for a request's `logprobs` and `top_logprobs` (None: not asked)."""
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if not req.logprobs:
        return None
    if searches:
        raise ApiError(400, "'logprobs' are given for a sampled or greedy reply, not with 'beam_size' or "
                            "'num_candidates' above 1 (each candidate carries its scores instead)", "logprobs")
    return req.top_logprobs or 0


def token_logprobs(tokenizer, tokens: list[int], entries: list) -> list[dict]:
    """OpenAI's `logprobs.content` items for `tokens` and their (logprob, alternatives) entries."""
    def item(tok: int, lp: float) -> dict:
        raw = tokenizer.token_bytes(tok)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: OpenAI spells it as its bytes
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return {"token": text, "logprob": max(lp, -9999.0), "bytes": list(raw)}

    return [{**item(tok, lp), "top_logprobs": [item(t, v) for t, v in alts]}
            for tok, (lp, alts) in zip(tokens, entries)]


def as_field(name: str) -> str:
    return f"'{name}'"


def make_decoding(base, changes: dict):
    try:
        d = base.replace(**changes)
    except SettingError as e:  # the schema covers each field; `Decoding` checks combinations
        raise ApiError(400, e.say(as_field), e.field) from None
    needs = {"mmi": d.mmi_model, "discriminator": d.discriminator}
    if d.searches and d.scorer_name in needs and not needs[d.scorer_name]:
        flag = "--mmi-model" if d.scorer_name == "mmi" else "--discriminator"
        raise ApiError(400, f"'scorer': {d.scorer_name} needs a model this server was not started with ({flag})",
                       "scorer")
    return d


def make_sampling(base: Sampling, changes: dict) -> Sampling:
    try:
        s = base.replace(**changes)
    except SettingError as e:
        raise ApiError(400, e.say(as_field), e.field) from None
    if "constraint" in changes:  # None too: response_format text lifts a session's stored JSON format
        s = dataclasses.replace(s, constraint=changes["constraint"])
    return s


def chat_messages(req: ChatRequest) -> list[Message]:
    """The request's messages; one that ends with the assistant's is a prefill the reply continues."""
    for i, m in enumerate(req.messages):
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise ApiError(400, f"'messages[{i}].content' is required (null only for an assistant's tool calls)",
                           f"messages[{i}].content")
    raw = [{**m.model_dump(exclude_none=True), "role": ROLES.get(m.role, m.role)} for m in req.messages]
    try:
        out = parse_messages(raw, "messages")
    except UserError as e:
        param, _, message = str(e).partition(": ")
        raise ApiError(400, f"'{param}': {message}", param) from None
    if out[-1].role == "assistant" and out[-1].tool_calls:
        raise ApiError(400, "the last message is an assistant's tool calls: send the tools' results "
                            "(role 'tool') after it", f"messages[{len(out) - 1}]")
    if out[-1].role not in ("user", "assistant", "tool"):
        raise ApiError(400, f"the last message must have role 'user' (or 'assistant', to continue it), got "
                            f"'{out[-1].role}'", f"messages[{len(out) - 1}].role")
    return out


def model_not_found(names: list[str], name) -> ApiError:
    """404 for a model name this server does not answer (with --strict-model-names)."""
    listed = ", ".join(f"'{n}'" for n in names)
    return ApiError(404, f"the model '{name}' does not exist; this server serves {listed} (--strict-model-names)",
                    "model", "model_not_found")


def context_error(prompt_tokens: int, max_tokens: int, context: int, param: str = "messages") -> ApiError:
    return ApiError(400, f"this model's context is {context} tokens; the prompt needs {prompt_tokens} and "
                         f"max_tokens is {max_tokens} ({prompt_tokens + max_tokens} in all). Shorten the "
                         f"messages or lower max_tokens.", param, code="context_length_exceeded")


# --- responses ------------------------------------------------------------------------------
def new_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def completion(cid: str, model: str, choices: list[dict], usage: dict, created: int | None = None) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created or int(time.time()), "model": model,
            "choices": choices, "usage": usage, "system_fingerprint": None}


def choice(index: int, text: str | None, finish_reason: str, candidates: list | None = None,
           logprobs: list | None = None, tool_calls: list | None = None) -> dict:
    message = {"role": "assistant", "content": text}
    if tool_calls:
        message.update(content=None, tool_calls=tool_calls)
    out = {"index": index, "message": message, "finish_reason": finish_reason,
           "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None}}
    if candidates is not None:
        out["candidates"] = candidates
    return out


def chunk(cid: str, model: str, created: int, choices: list[dict], usage: dict | None = None) -> dict:
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
           "system_fingerprint": None}
    if usage is not None:
        out["usage"] = usage
    return out


def delta_choice(index: int, delta: dict, finish_reason: str | None = None, logprobs: list | None = None) -> dict:
    return {"index": index, "delta": delta, "finish_reason": finish_reason,
            "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None}}


def usage(prompt: int, completion_tokens: int, cached: int | None = None) -> dict:
    """OpenAI's usage object; `cached`: prompt tokens served from a kept KV cache."""
    out = {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}
    if cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def sse(obj) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
