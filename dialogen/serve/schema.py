"""Request bodies as pydantic models, after OpenAI's chat-completions schema.

`protocol.parse_json_body` has already turned the bytes into plain JSON values (no NaN, no
lone surrogates, bounded nesting); these models check types and ranges in strict mode (no
"9" for 9, no 1 for true, no 1.0 for an integer) and `validate` turns the first failure into
one OpenAI error naming the field: `'messages[0].role' should be ...`. Fields with limits set
by the server's flags (max_tokens, n, num_candidates) are checked after parsing, in protocol.py.
Unknown fields are ignored, as OpenAI does (the routes name them in a response header), except in
session settings, which are stored.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from ..decoding.settings import (CANDIDATE_SOURCES, MAX_STOP_CHARS, MAX_TOP_LOGPROBS, SCORER_NAMES, SEED_MAX,
                                 SEED_MIN)

INT64_MAX = 2**63 - 1
MAX_PERSONA = 20_000


def kind(v) -> str:
    """What a JSON value is, for messages: 'a string', 'an array', ..."""
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def _joined_text_parts(v):
    """A message content: a string, or OpenAI's list of text parts joined into one."""
    if isinstance(v, list) and all(isinstance(p, dict) for p in v):
        other = next((p.get("type") for p in v if p.get("type") != "text"), None)
        if other is not None:
            raise PydanticCustomError("content_type", "only text content is supported, got a part of type {t}",
                                      {"t": json.dumps(other)[:40]})
        if all(isinstance(p.get("text"), str) for p in v):
            return "".join(p["text"] for p in v)
    if not isinstance(v, str):
        raise PydanticCustomError("content_type", "must be a string (or a list of text parts), got {kind}",
                                  {"kind": kind(v)})
    return v


def _not_blank(v: str) -> str:
    if not v.strip():
        raise PydanticCustomError("empty", "is empty")
    return v


def _stop_list(v):
    return [v] if isinstance(v, str) else v


def _stop_total(v: list[str]) -> list[str]:
    total = sum(len(s) for s in v)
    if total > MAX_STOP_CHARS:
        raise PydanticCustomError("stop_too_long", "is {total} characters in all; the limit is {limit}",
                                  {"total": total, "limit": MAX_STOP_CHARS})
    return v


Content = Annotated[str, BeforeValidator(_joined_text_parts), AfterValidator(_not_blank)]
Stop = Annotated[list[Annotated[str, Field(min_length=1)]], BeforeValidator(_stop_list), Field(max_length=4),
                 AfterValidator(_stop_total)]
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]
Positive = Annotated[int, Field(ge=1, le=INT64_MAX)]


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


def _schema_value(v):
    if not isinstance(v, (dict, bool)):
        raise PydanticCustomError("content_type", "must be a JSON schema (an object), got {kind}", {"kind": kind(v)})
    return v


class JsonSchemaFormat(Body):
    name: str | None = Field(None, max_length=64)
    description: str | None = None
    json_schema: Annotated[Any, AfterValidator(_schema_value)] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(Body):
    """OpenAI's `response_format`: free text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class DecodeFields(Body):
    """The decoding fields a request (or a session's settings) may set; None: the server's default."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: Count | None = None
    repetition_penalty: float | None = Field(None, gt=0, le=1e6)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    no_repeat_ngram: Count | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: Stop | None = None
    max_tokens: Positive | None = None
    num_candidates: Positive | None = None
    beam_size: Positive | None = None
    candidates: Literal[CANDIDATE_SOURCES] | None = None
    scorer: Literal[SCORER_NAMES] | None = None
    length_penalty: float | None = Field(None, ge=0, le=10)
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=1024)


class Settings(DecodeFields):
    """A session's stored decoding settings: an unknown key is a mistake, not a field to ignore."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=200)  # the served model (a LoRA adapter's name) of its turns


SETTINGS_KEYS = tuple(Settings.model_fields)


class SessionCreate(Body):
    model: str | None = Field(None, max_length=200)
    persona: str | None = Field(None, max_length=MAX_PERSONA)
    title: str | None = None
    settings: Settings | None = None


class SessionTurn(DecodeFields):
    model: str | None = Field(None, max_length=200)
    content: Content
    stream: bool | None = None


MAX_COMMENT = 4000


class Rating(Body):
    """POST /v1/sessions/{id}/messages/{n}/feedback; `variant`: which reply of the message (default:
    the one shown)."""

    rating: Literal["up", "down"]
    comment: str | None = Field(None, max_length=MAX_COMMENT)
    variant: Count | None = None


class Regenerate(DecodeFields):
    """POST /v1/sessions/{id}/messages/{n}/regenerate: the decoding fields of a turn."""

    stream: bool | None = None


class Pick(Body):
    """POST /v1/sessions/{id}/messages/{n}/preference: two variants of the message."""

    chosen: Count
    rejected: Count


class ChatMessage(Body):
    """A message; an assistant's may carry `tool_calls` (its content then possibly null), and a
    `tool` message answers one by `tool_call_id` (checked by `chat.messages.parse_messages`)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content | None = Field(None, validate_default=False)
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class StreamOptions(Body):
    include_usage: bool | None = None


def _tool_choice(v):
    if v is None or v in ("none", "auto", "required") or isinstance(v, dict):
        return v
    raise PydanticCustomError("content_type", 'must be "none", "auto", "required" or {{"type": "function", '
                                              '"function": {{"name": ...}}}}, got {v}', {"v": json.dumps(v)[:40]})


class ChatRequest(DecodeFields):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict] | None = Field(None, max_length=128)
    tool_choice: Annotated[Any, BeforeValidator(_tool_choice)] = None
    parallel_tool_calls: bool | None = None
    n: Positive | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_completion_tokens: Positive | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None


def _prompt_list(v):
    """A completion prompt: a string, or a list of them (one choice group each)."""
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not all(isinstance(p, str) for p in v):
        raise PydanticCustomError("content_type", "must be a string or a list of strings, got {kind}",
                                  {"kind": kind(v)})
    return v


Prompts = Annotated[list[Annotated[str, AfterValidator(_not_blank)]], BeforeValidator(_prompt_list),
                    Field(min_length=1, max_length=16)]


class CompletionRequest(DecodeFields):
    """POST /v1/completions: OpenAI's legacy text completion (a plain prompt, no chat template)."""

    model: str | None = None
    prompt: Prompts
    n: Positive | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None  # the legacy API's limit
    echo: bool | None = None
    suffix: str | None = None
    best_of: Positive | None = None


def param_name(loc) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'; a stop string's error names 'stop'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
        if part == "stop":
            break
    return out


_SUBJECT = re.compile(r"^(Input|String|List|Value|Dictionary|Object|Tuple) ")


def describe(err: dict) -> str:
    """One pydantic error as one line: `'top_p' should be greater than 0, got 0`."""
    param = param_name(err["loc"])
    if err["type"] == "missing":
        return f"'{param}' is required"
    if err["type"] == "extra_forbidden":
        return f"'{param}' is not a decoding setting; known: {', '.join(SETTINGS_KEYS)}"
    msg = re.sub(r"valid dictionary( or instance of \w+)?", "JSON object", _SUBJECT.sub("", err["msg"]))
    msg = msg[:1].lower() + msg[1:]
    if err["type"] in ("content_type", "empty", "stop_too_long"):
        return f"'{param}' {msg}"
    shown = json.dumps(err.get("input"), ensure_ascii=False)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return f"'{param}' {msg}, got {shown}"


def first_error(e: ValidationError) -> tuple[str, str]:
    """(param, message) of the first error pydantic found."""
    err = e.errors(include_url=False)[0]
    return param_name(err["loc"]), describe(err)
