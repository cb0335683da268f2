"""The OpenAI chat-completions protocol: request checking and response objects.

Request bodies are read and checked here by hand, not by a schema library, so that every
mistake gets one OpenAI-style error naming the field: `{"error": {"message", "type", "param",
"code"}}`. Checked fields map onto `Sampling`; unknown fields are ignored, as OpenAI does,
except features this server does not have (tools, logprobs, ...), which are refused.
"""

from __future__ import annotations

import json
import math
import secrets
import time

from ..chat.messages import Message
from ..decoding.settings import CANDIDATE_SOURCES, Sampling
from ..errors import UserError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logprobs", "top_logprobs", "audio",
               "prediction", "logit_bias")


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
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def parse_json_body(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (bad byte at offset {e.start})",
                       code="invalid_utf8") from None
    if not text.strip():
        raise ApiError(400, "the request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_kind(body)}", code="invalid_json")
    return body


def _kind(v) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


# --- fields ---------------------------------------------------------------------------------
def number(body: dict, key: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           integer: bool = False):
    """body[key] as a number within [lo, hi] (or (lo, hi] with lo_open); None when absent or null."""
    v = body.get(key)
    if v is None:
        return None
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or (isinstance(v, float) and not math.isfinite(v)):
        raise ApiError(400, f"'{key}' must be {'an integer' if integer else 'a number'}, got {_kind(v)}", key)
    below = lo is not None and (v <= lo if lo_open else v < lo)
    if below or (hi is not None and v > hi):
        left = "(" if lo_open else "["
        raise ApiError(400, f"'{key}' must be in {left}{lo if lo is not None else '-inf'}, "
                            f"{hi if hi is not None else 'inf'}], got {v}", key)
    return v


def boolean(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"'{key}' must be true or false, got {_kind(v)}", key)
    return v


def stop_list(body: dict, key: str = "stop") -> list[str] | None:
    v = body.get(key)
    if v is None:
        return None
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or len(items) > 4 or not all(isinstance(s, str) and s for s in items):
        raise ApiError(400, f"'{key}' must be a non-empty string or a list of up to 4 non-empty strings", key)
    return list(items)


def refuse_unsupported(body: dict):
    for key in UNSUPPORTED:
        v = body.get(key)
        if v not in (None, False, [], {}):
            raise ApiError(400, f"'{key}' is not supported by this server", key, code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise ApiError(400, "'response_format' other than {\"type\": \"text\"} is not supported",
                       "response_format", code="unsupported_parameter")


def sampling_changes(body: dict, max_tokens_limit: int) -> dict:
    """The decoding fields present in `body`, as `Sampling` field changes (absent fields left out)."""
    changes = {
        "temperature": number(body, "temperature", 0, 2),
        "top_p": number(body, "top_p", 0, 1, lo_open=True),
        "top_k": number(body, "top_k", 0, None, integer=True),
        "repetition_penalty": number(body, "repetition_penalty", 0, None, lo_open=True),
        "frequency_penalty": number(body, "frequency_penalty", 0, 2),
        "presence_penalty": number(body, "presence_penalty", 0, 2),
        "no_repeat_ngram": number(body, "no_repeat_ngram", 0, None, integer=True),
        "seed": number(body, "seed", integer=True),
        "stop": stop_list(body),
    }
    mt = number(body, "max_completion_tokens", integer=True)
    mt = number(body, "max_tokens", integer=True) if mt is None else mt
    if mt is not None:
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        if mt <= 0:
            raise ApiError(400, f"'{key}' must be at least 1, got {mt}", key)
        if mt > max_tokens_limit:
            raise ApiError(400, f"'{key}' must be at most {max_tokens_limit} on this server, got {mt}", key)
        changes["max_new_tokens"] = mt
    return {k: v for k, v in changes.items() if v is not None}


def decoding_changes(body: dict, max_candidates: int) -> dict:
    """Search and reranking fields (beam search, sample-and-rank) as `Decoding` field changes."""
    from ..decoding.rerank import SCORERS

    changes = {"num_candidates": number(body, "num_candidates", 1, max_candidates, integer=True),
               "beam_size": number(body, "beam_size", 1, max_candidates, integer=True),
               "length_penalty": number(body, "length_penalty", 0, 10)}
    for key, allowed in (("candidates", CANDIDATE_SOURCES), ("scorer", tuple(SCORERS))):
        v = body.get(key)
        if v is not None and v not in allowed:
            raise ApiError(400, f"'{key}' must be one of: {', '.join(allowed)}", key)
        changes[key] = v
    return {k: v for k, v in changes.items() if v is not None}


def make_decoding(base, changes: dict):
    candidates, beam = changes.get("candidates", base.candidates), changes.get("beam_size", base.beam_size)
    if candidates == "sample" and beam > 1:
        raise ApiError(400, "'candidates': \"sample\" draws samples; it does not combine with 'beam_size' > 1",
                       "candidates")
    try:
        d = base.replace(**changes)
    except UserError as e:
        raise ApiError(400, str(e)) from None
    needs = {"mmi": d.mmi_model, "discriminator": d.discriminator}
    if d.searches and d.scorer_name in needs and not needs[d.scorer_name]:
        flag = "--mmi-model" if d.scorer_name == "mmi" else "--discriminator"
        raise ApiError(400, f"'scorer': {d.scorer_name} needs a model this server was not started with ({flag})",
                       "scorer")
    return d


def make_sampling(base: Sampling, changes: dict) -> Sampling:
    try:
        return base.replace(**changes)
    except UserError as e:  # the range checks above cover the fields; this catches combinations
        raise ApiError(400, str(e)) from None


def content_text(v, where: str) -> str:
    """A message content: a string, or a list of text parts; never empty."""
    if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in v):
        v = "".join(p["text"] for p in v)
    if not isinstance(v, str):
        raise ApiError(400, f"'{where}' must be a string (or a list of text parts), got {_kind(v)}", where)
    if not v.strip():
        raise ApiError(400, f"'{where}' is empty", where)
    return v


def parse_chat_messages(body: dict) -> list[Message]:
    if "messages" not in body:
        raise ApiError(400, "'messages' is required", "messages")
    msgs = body["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty array of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{at}' must be an object with 'role' and 'content'", at)
        role = m.get("role")
        if role not in ROLES:
            shown = json.dumps(role, ensure_ascii=False)[:40]
            raise ApiError(400, f"'{at}.role' is {shown}; expected one of: {', '.join(ROLES)}", f"{at}.role")
        if "content" not in m:
            raise ApiError(400, f"'{at}.content' is required", f"{at}.content")
        out.append(Message(ROLES[role], content_text(m["content"], f"{at}.content")))
    if out[-1].role != "user":
        raise ApiError(400, f"the last message must have role 'user', got '{out[-1].role}'", f"messages[{len(out) - 1}].role")
    return out


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


def choice(index: int, text: str, finish_reason: str, candidates: list | None = None) -> dict:
    out = {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
           "logprobs": None}
    if candidates is not None:
        out["candidates"] = candidates
    return out


def chunk(cid: str, model: str, created: int, choices: list[dict], usage: dict | None = None) -> dict:
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
           "system_fingerprint": None}
    if usage is not None:
        out["usage"] = usage
    return out


def delta_choice(index: int, delta: dict, finish_reason: str | None = None) -> dict:
    return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}


def usage(prompt: int, completion_tokens: int, cached: int | None = None) -> dict:
    """OpenAI's usage object; `cached`: prompt tokens served from a kept KV cache."""
    out = {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}
    if cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def sse(obj) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode("utf-8")
