"""Structured output on the embedded default model, through the official `openai` client: 50
seeded samples at temperature 1 for `json_object` and 50 for `json_schema`, sent at once so
they are decoded together in the server's batched step; every one parses, and validates."""

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from dialogen.serve.launch import ServerProcess

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["intent", "city", "people"],
          "properties": {"intent": {"enum": ["book_table", "cancel", "ask_hours"]},
                         "city": {"type": "string", "maxLength": 30},
                         "people": {"type": "integer", "minimum": 1, "maximum": 20}}}
ASK = [{"role": "system", "content": "You turn a customer's message into JSON."},
       {"role": "user", "content": "Hi, I'd like a table for four in Lisbon tonight, please."}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    db = tmp_path_factory.mktemp("serve_json") / "sessions.db"
    with ServerProcess(["--db", str(db), "--max-n", "10"]) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _samples(client, response_format, max_tokens):
    """50 choices: 5 requests of n=10 with seeds 0, 10, ..., 40 (choice i samples with seed + i)."""
    def one(seed):
        return client.chat.completions.create(model="gpt-4o-mini", messages=ASK, temperature=1.0, seed=seed, n=10,
                                              max_tokens=max_tokens, response_format=response_format)
    with ThreadPoolExecutor(5) as pool:
        replies = list(pool.map(one, range(0, 50, 10)))
    return [c for r in replies for c in r.choices]


def test_json_object_always_parses(client):
    choices = _samples(client, {"type": "json_object"}, 48)
    assert len(choices) == 50
    values = [json.loads(c.message.content) for c in choices]  # raises on the first that does not parse
    assert all(isinstance(v, dict) for v in values) and all(c.finish_reason == "stop" for c in choices)
    assert sum(len(v) >= 1 for v in values) > 25  # objects with keys, not only {} closed at once
    assert len({c.message.content for c in choices}) > 25  # samples, not one reply repeated


def test_json_schema_always_validates(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "booking", "schema": SCHEMA, "strict": True}}
    choices = _samples(client, fmt, 40)
    for c in choices:
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
        assert c.finish_reason == "stop"
    assert len({c.message.content for c in choices}) > 10


@pytest.mark.parametrize("fmt,param", [
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "response_format.json_schema.schema"),
])
def test_bad_response_formats(client, fmt, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=ASK, response_format=fmt, max_tokens=5)
    assert e.value.body["param"] == param and "\n" not in e.value.body["message"]
