"""Tools from Python on the default model: schemas from type hints and docstrings, calls that are
valid by construction at temperature 1 (every call names a real tool; its arguments validate with
jsonschema), the agent loop, the customer-service example and `dialogen chat --tools`.

bench/tools_validity.py runs the validity check on 50 seeded requests per mode; here a few."""

import dataclasses
import enum
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Literal, TypedDict

import jsonschema
import pytest

from dialogen.api import ChatModel
from dialogen.chat.functions import function_tool
from dialogen.chat.messages import Message
from dialogen.chat.session import Session
from dialogen.chat.toolformat import parse_calls, parse_tools
from dialogen.decoding.settings import Sampling
from dialogen.decoding.toolgrammar import tool_grammar
from dialogen.errors import UserError

ROOT = Path(__file__).parent.parent


class Unit(enum.Enum):
    C = "celsius"
    F = "fahrenheit"


class Address(TypedDict):
    street: str
    city: str


@dataclasses.dataclass
class Item:
    sku: str
    quantity: int = 1


def set_alarm(time: str, days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]],
              label: str | None = None) -> str:
    """Set an alarm.

    Args:
        time: The time, as HH:MM.
        days: The days it rings on.
    """
    return f"alarm set for {time}"


def ship(address: Address, items: list[Item], unit: Unit = Unit.C,
         note: Annotated[str, "A note for the courier."] = "") -> dict:
    """Ship items to an address.

    :param address: Where to.
    """
    return {"shipped": len(items)}


def test_schemas_from_type_hints_and_docstrings():
    alarm = function_tool(set_alarm)["function"]
    assert alarm["description"] == "Set an alarm."
    assert alarm["parameters"] == {
        "type": "object", "additionalProperties": False, "required": ["time", "days"],
        "properties": {"time": {"type": "string", "description": "The time, as HH:MM."},
                       "days": {"type": "array", "description": "The days it rings on.", "items": {
                           "type": "string", "enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]}},
                       "label": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}}}
    shipping = function_tool(ship)["function"]["parameters"]
    assert shipping["properties"]["address"] == {
        "type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
        "required": ["city", "street"], "additionalProperties": False, "description": "Where to."}
    assert shipping["properties"]["items"]["items"]["required"] == ["sku"]
    assert shipping["properties"]["unit"] == {"enum": ["celsius", "fahrenheit"], "default": "celsius"}
    assert shipping["properties"]["note"]["description"] == "A note for the courier."
    for fn in (set_alarm, ship):
        jsonschema.Draft202012Validator.check_schema(function_tool(fn)["function"]["parameters"])
    def untyped(x):
        return x

    with pytest.raises(UserError, match="'x' needs a type hint"):
        function_tool(untyped)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SUPPORT_TOOLS = parse_tools([function_tool(set_alarm), function_tool(ship), WEATHER])
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in SUPPORT_TOOLS}


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_calls_are_valid_by_construction(default_engine, choice):
    """Seeded samples at temperature 1 with 3 tools (one with nested objects and an enum): every
    call names a real tool and its arguments validate against its schema."""
    eng = default_engine
    grammar = tool_grammar(SUPPORT_TOOLS, eng.template.tool_style, choice, True, eng.tokenizer.control_ids)
    called = 0
    for seed in range(2):
        s = Session(eng, sampling=Sampling(temperature=1.0, top_k=0, top_p=1.0, seed=seed, max_new_tokens=96,
                                           constraint=grammar))
        s.tools = SUPPORT_TOOLS
        text = s.send("Ship two boxes of sku A1 to 5 Main St, Lisbon, and set an alarm for 07:00 on monday.").run().text
        calls = parse_calls(text, eng.template.tool_style)
        if choice == "required":
            assert calls, text
        for c in calls or ():
            assert c["name"] in SCHEMAS
            jsonschema.validate(c["arguments"], SCHEMAS[c["name"]])
            called += 1
    assert choice == "auto" or called >= 2


def test_chat_with_functions_and_the_agent_loop(default_engine):
    model = ChatModel(default_engine)
    seen = []

    def lookup_order(order_id: int) -> dict:
        """Look up an order's status by its number."""
        seen.append(order_id)
        return {"order_id": order_id, "status": "shipped"}

    reply = model.chat("Where is my order 1182?", tools=[lookup_order], tool_choice="lookup_order", temperature=0,
                       max_new_tokens=48)
    assert reply["content"] is None and [c["function"]["name"] for c in reply["tool_calls"]] == ["lookup_order"]
    assert isinstance(json.loads(reply["tool_calls"][0]["function"]["arguments"])["order_id"], int)
    conv = model.run("Where is my order 1182?", tools=[lookup_order], max_steps=2, tool_choice="required",
                     temperature=0, max_new_tokens=48)
    assert [m["role"] for m in conv[:2]] == ["user", "assistant"] and conv[1]["tool_calls"]
    results = [m for m in conv if m["role"] == "tool"]
    assert len(results) == len(conv[1]["tool_calls"]) == len(seen)
    assert json.loads(results[0]["content"]) == {"order_id": seen[0], "status": "shipped"}
    assert conv[-1]["role"] == "assistant" and conv[-1]["content"] and "tool_calls" not in conv[-1]


def test_the_customer_service_example(default_engine):
    spec = importlib.util.spec_from_file_location("customer_service", ROOT / "examples" / "customer_service.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    db = example.open_db()
    conv = example.serve_customer(ChatModel(default_engine), "Order 1190 arrived broken. Please refund it.", db,
                                  max_new_tokens=64)
    lookup, refund = example.make_tools(example.open_db())  # the same tools on a fresh copy, to replay the calls
    tools = {"lookup_order": lookup, "refund_order": refund}
    calls = conv[2]["tool_calls"]
    assert calls and all(c["function"]["name"] in tools for c in calls)
    for call, result in zip(calls, conv[3:3 + len(calls)]):
        want = tools[call["function"]["name"]](**json.loads(call["function"]["arguments"]))
        assert json.loads(result["content"]) == want  # the tool's result is the database's answer
    refunded = {json.loads(c["function"]["arguments"])["order_id"] for c in calls
                if c["function"]["name"] == "refund_order"}
    assert {r[0] for r in db.execute("SELECT id FROM orders WHERE refunded = 1")} == refunded & {o[0] for o in
                                                                                                 example.ORDERS}
    assert conv[-1]["role"] == "assistant" and conv[-1]["content"]


def _dialogen(*args, stdin="", timeout=600):
    return subprocess.run([sys.executable, "-m", "dialogen", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_chat_cli_runs_python_tools(tmp_path):
    """`--tool-choice required`: each reply but the turn's last calls the tool, the function runs,
    its result is shown and goes back to the model; the last reply is read as text."""
    from dialogen.chat.toolchat import MAX_STEPS

    tools = tmp_path / "tools.py"
    tools.write_text('def lookup_order(order_id: int) -> dict:\n    "Look an order up."\n'
                     '    return {"order_id": order_id, "status": "delivered"}\n')
    out = _dialogen("chat", "--tools", str(tools), "--tool-choice", "required", "--temperature", "0",
                    "--max-new-tokens", "48", stdin="Where is order 7?\n")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("[calls lookup_order("), out.stdout
    calls = 0
    for line, after in zip(lines, lines[1:]):  # each call, then its result from the function
        if line.startswith("[calls "):
            args = json.loads(line.removeprefix("[calls lookup_order(").removesuffix(")]"))
            assert after == f'[lookup_order returns] {{"order_id": {args["order_id"]}, "status": "delivered"}}'
            calls += 1
    assert calls >= MAX_STEPS - 1 and sum(line.startswith("[lookup_order returns] ") for line in lines) == calls
    assert lines[-1].strip() and not lines[-1].startswith("["), out.stdout  # the answer, read as text
    bad = _dialogen("chat", "--tools", str(tmp_path / "none.json"), timeout=120)
    assert bad.returncode == 2 and "none.json" in bad.stderr
    bad = _dialogen("chat", "--tool-choice", "required", timeout=120)
    assert bad.returncode == 2 and "--tool-choice needs --tools" in bad.stderr


def test_generate_prints_the_calls_of_a_messages_file_with_tools(tmp_path):
    schema = {"type": "object", "properties": {"order_id": {"type": "integer"}}, "required": ["order_id"]}
    conv = tmp_path / "conv.json"
    alarm = {"type": "object", "properties": {"time": {"type": "string"}}, "required": ["time"]}
    conv.write_text(json.dumps({"messages": [{"role": "user", "content": "Where is order 7?"}], "tools": [
        {"type": "function", "function": {"name": "lookup_order", "description": "Look an order up.",
                                          "parameters": schema}},
        {"type": "function", "function": {"name": "set_alarm", "description": "Set an alarm.", "parameters": alarm}}]}))
    out = _dialogen("generate", str(conv), "--tool-choice", "required", "--temperature", "0", "--max-new-tokens", "48")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["reply"] is None and shown["tool_calls"] and shown["finish_reason"] == "tool_calls", shown
    for c in shown["tool_calls"]:
        assert c["type"] == "function" and c["id"].startswith("call_") and c["function"]["name"] == "lookup_order"
        jsonschema.validate(json.loads(c["function"]["arguments"]), schema)
    out = _dialogen("generate", str(conv), "--tool-choice", "set_alarm", "--temperature", "0", "--max-new-tokens", "48")
    shown = json.loads(out.stdout)  # a tool named: its calls only, even where another one fits the request
    assert shown["tool_calls"] and all(c["function"]["name"] == "set_alarm" for c in shown["tool_calls"]), shown
    for c in shown["tool_calls"]:
        jsonschema.validate(json.loads(c["function"]["arguments"]), alarm)
    bad = _dialogen("generate", str(conv), "--tool-choice", "lookup", timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--tool-choice 'lookup'" in bad.stderr
    assert "(lookup_order, set_alarm)" in bad.stderr
    out = _dialogen("generate", str(conv), "--tool-choice", "none", "--temperature", "0", "--max-new-tokens", "16")
    shown = json.loads(out.stdout)
    assert isinstance(shown["reply"], str) and "tool_calls" not in shown and shown["tokens"] <= 16
    bad = _dialogen("generate", "--tool-choice", "required", stdin='[{"role": "user", "content": "hi"}]', timeout=120)
    assert bad.returncode == 2 and "<stdin>: --tool-choice needs tools" in bad.stderr


def test_session_messages_round_trip_tool_calls():
    m = Message("assistant", "", tool_calls=[{"id": "call_1", "type": "function",
                                              "function": {"name": "f", "arguments": {"a": 1}}}])
    assert m.to_dict() == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]}
