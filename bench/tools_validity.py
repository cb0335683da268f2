"""Tool calls valid by construction: seeded requests at temperature 1 on the default model (or
--model) with three tools, one with nested object arguments and an enum, under tool_choice auto and
required. Every call must name a real tool and its arguments must validate against the tool's
schema (jsonschema); prints how many replies called a tool and how many calls were checked.

    .venv/bin/python bench/tools_validity.py [--requests 50] [--max-tokens 128]
"""

import argparse
import time

import jsonschema

from dialogen.chat.session import Session, load_engine
from dialogen.chat.toolformat import parse_calls, parse_tools
from dialogen.decoding.settings import Sampling
from dialogen.decoding.toolgrammar import tool_grammar

TOOLS = parse_tools([
    {"type": "function", "function": {"name": "set_alarm", "description": "Set an alarm.", "parameters": {
        "type": "object", "required": ["time"], "properties": {"time": {"type": "string"}, "label": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "ship", "description": "Ship items to an address.", "parameters": {
        "type": "object", "required": ["address", "items", "speed"], "additionalProperties": False, "properties": {
            "address": {"type": "object", "required": ["street", "city"], "additionalProperties": False,
                        "properties": {"street": {"type": "string"}, "city": {"type": "string"}}},
            "items": {"type": "array", "items": {"type": "object", "required": ["sku", "quantity"],
                                                 "properties": {"sku": {"type": "string"},
                                                                "quantity": {"type": "integer", "minimum": 1}}}},
            "speed": {"enum": ["standard", "express"]}}}}},
    {"type": "function", "function": {"name": "lookup_order", "description": "An order's status.", "parameters": {
        "type": "object", "properties": {"order_id": {"type": "integer"}}, "required": ["order_id"]}}},
])
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASKS = ["Can you set an alarm for 7 AM tomorrow?", "Where is my order 1182?",
        "Please ship two mugs (sku M-2) to 5 Main St, Lisbon, express.", "Hi! How are you today?"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    engine = load_engine(args.model)
    style = engine.template.tool_style
    for choice in ("auto", "required"):
        grammar = tool_grammar(TOOLS, style, choice, True, engine.tokenizer.control_ids)
        called = checked = cut = 0
        t0 = time.monotonic()
        for seed in range(args.requests):
            s = Session(engine, sampling=Sampling(temperature=1.0, top_k=0, top_p=1.0, seed=seed,
                                                  max_new_tokens=args.max_tokens, constraint=grammar))
            s.tools = TOOLS
            gen = s.send(ASKS[seed % len(ASKS)]).run()
            calls = parse_calls(gen.text, style)
            cut += gen.finish_reason == "length"
            if calls:
                called += 1
                for c in calls:
                    assert c["name"] in SCHEMAS, c
                    jsonschema.validate(c["arguments"], SCHEMAS[c["name"]])
                    checked += 1
            elif choice == "required":
                raise AssertionError(f"seed {seed}: no call under required: {gen.text!r}")
        print(f"{choice:8s}: {called}/{args.requests} replies called a tool, {checked} calls, all valid "
              f"({cut} replies at the token limit; {time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
