"""Tool calling through `dialogen serve` on the default model, with real clients: the `openai`
client gets calls plain and streamed (checked against its own types, arguments validated with
jsonschema), a named tool_choice, one call with parallel_tool_calls false, a tool's result
answered, langchain-openai's bind_tools round trip, and 400s that name the field."""

import json
import warnings

import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from dialogen.serve.launch import ServerProcess

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ORDER = {"type": "function", "function": {
    "name": "lookup_order", "description": "Look an order up by its number.",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "integer"}}, "required": ["order_id"],
                   "additionalProperties": False}}}
TOOLS = [WEATHER, ORDER]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    db = tmp_path_factory.mktemp("tools") / "sessions.db"
    with ServerProcess(["--db", str(db), "--temperature", "0"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)


def typed(cls, obj):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return cls.model_validate_json(obj.model_dump_json(exclude_unset=True))


def valid(calls):
    """Each call names a real tool, with arguments that validate against its schema."""
    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in SCHEMAS
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def test_a_call_plain_and_streamed(client):
    r = typed(ChatCompletion, client.chat.completions.create(
        model="default", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=40))
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    valid(msg.tool_calls)
    chunks = [typed(ChatCompletionChunk, c) for c in client.chat.completions.create(
        model="default", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=40, stream=True)]
    calls: dict[int, dict] = {}
    for ch in chunks:
        for d in ch.choices[0].delta.tool_calls or ():
            got = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            got["id"] = d.id or got["id"]
            got["name"] += d.function.name or "" if d.function else ""
            got["arguments"] += d.function.arguments or "" if d.function else ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(ch.choices[0].delta.content for ch in chunks)
    streamed = [c for _, c in sorted(calls.items())]
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls]  # greedy: the same calls


def test_named_choice_single_call_and_a_result_answered(client):
    r = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, max_tokens=40,
                                       tool_choice={"type": "function", "function": {"name": "lookup_order"}})
    calls = r.choices[0].message.tool_calls
    valid(calls)
    assert [c.function.name for c in calls] == ["lookup_order"]
    one = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, max_tokens=40,
                                         tool_choice="required", parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1
    follow = ASK + [one.choices[0].message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": one.choices[0].message.tool_calls[0].id,
                     "content": "{\"temperature\": 21, \"sky\": \"clear\"}"}]
    answer = client.chat.completions.create(model="default", messages=follow, tools=TOOLS, tool_choice="none",
                                            max_tokens=12)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_langchain_bind_tools_round_trip(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage

    llm = langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="default",
                                      temperature=0, max_tokens=40, max_retries=0, timeout=600)
    bound = llm.bind_tools([WEATHER], tool_choice="required")
    first = bound.invoke([HumanMessage("What's the weather in Paris?")])
    assert first.tool_calls and first.tool_calls[0]["name"] == "get_weather"
    jsonschema.validate(first.tool_calls[0]["args"], SCHEMAS["get_weather"])
    result = ToolMessage(content="21 degrees and clear", tool_call_id=first.tool_calls[0]["id"])
    second = llm.bind_tools([WEATHER], tool_choice="none").invoke(
        [HumanMessage("What's the weather in Paris?"), first, result])
    assert isinstance(second.content, str) and second.content and not second.tool_calls


BAD = [
    ("a tool message answering no call", {"messages": ASK + [{"role": "tool", "tool_call_id": "call_x",
                                                               "content": "hi"}], "tools": TOOLS},
     "messages[1].tool_call_id"),
    ("a schema the engine cannot use", {"messages": ASK, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "strange"}}}}}]},
     "tools[0].function.parameters"),
    ("a named tool_choice not among the tools", {"messages": ASK, "tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ("tools with beam_size", {"messages": ASK, "tools": TOOLS, "beam_size": 2}, "tools"),
    ("tools with num_candidates", {"messages": ASK, "tools": TOOLS, "num_candidates": 2}, "tools"),
    ("a tool without a name", {"messages": ASK, "tools": [{"type": "function", "function": {}}]},
     "tools[0].function.name"),
    ("tool_choice without tools", {"messages": ASK, "tool_choice": "required"}, "tool_choice"),
]


@pytest.mark.parametrize("why,body,param", BAD, ids=[b[0] for b in BAD])
def test_bad_tool_requests_name_the_field(client, why, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", max_tokens=4, messages=body["messages"],
                                       extra_body={k: v for k, v in body.items() if k != "messages"})
    assert e.value.body["param"] == param, e.value.body
