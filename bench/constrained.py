"""What structured output costs per token: JSON-schema constrained decoding against unconstrained.

Loads the model in process (default model unless --model) and decodes the same chat prompt, with
sampling at temperature 1 and a seed per run, three ways:
  free       no constraint (never stops early: no stop token, so every run has --max-tokens tokens)
  schema     a JSON schema (a customer-service intent with slots), a budget far above the reply,
             so only the mask is paid (the closing path is followed only in the last 128 tokens)
  tight      the same schema with a budget of 48 tokens: the closing path is checked at every step
  tools      three tools offered (one with nested objects and an enum), tool_choice auto: the grammar
             of text or valid calls (`decoding/toolgrammar.py`), a budget far above the reply
  tools-req  the same tools with tool_choice required and a budget of 96 tokens (closing path followed)
For each, the median over runs of CPU seconds per generated token (process time, so other work on
a shared machine does not count; the prompt's prefill left out), and the ratio to `free`. Also the time of the mask work
alone (matcher.allowed + fit) per token,
measured around those calls.

    .venv/bin/python bench/constrained.py [--runs 5] [--max-tokens 96] [--threads 1] [--ways tools,tools-req]
"""

import argparse
import statistics
import time

import torch

from dialogen.chat.messages import Message
from dialogen.chat.session import load_engine
from dialogen.decoding import constrain
from dialogen.decoding.constrain import Grammar
from dialogen.decoding.generate import Generation
from dialogen.decoding.settings import Sampling
from dialogen.decoding.toolgrammar import tool_grammar

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["intent", "city", "people", "note"],
          "properties": {"intent": {"enum": ["book_table", "cancel", "ask_hours"]},
                         "city": {"type": "string"}, "people": {"type": "integer"},
                         "note": {"type": "string"}}}
MESSAGES = [Message("system", "You turn a customer's message into JSON."),
            Message("user", "Hi, I'd like a table for four in Lisbon tonight, please, by the window.")]
TOOLS = [
    {"type": "function", "function": {"name": "book_table", "description": "Book a table.", "parameters": SCHEMA}},
    {"type": "function", "function": {"name": "ship", "description": "Ship items to an address.", "parameters": {
        "type": "object", "required": ["address", "items"], "additionalProperties": False, "properties": {
            "address": {"type": "object", "required": ["street", "city"], "additionalProperties": False,
                        "properties": {"street": {"type": "string"}, "city": {"type": "string"}}},
            "items": {"type": "array", "items": {"type": "object", "required": ["sku", "quantity"],
                                                 "properties": {"sku": {"type": "string"},
                                                                "quantity": {"type": "integer"}}}},
            "speed": {"enum": ["standard", "express"]}}}}},
    {"type": "function", "function": {"name": "lookup_order", "description": "An order's status.", "parameters": {
        "type": "object", "properties": {"order_id": {"type": "integer"}}, "required": ["order_id"]}}},
]


class MaskClock:
    """Wraps Matcher.allowed and Matcher.fit to add up the time spent in them."""

    def __init__(self):
        self.seconds = 0.0
        self._saved = constrain.Matcher.allowed, constrain.Matcher.fit

    def _timed(self, fn):
        def wrapped(*a, **k):
            t0 = CLOCK()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += CLOCK() - t0
        return wrapped

    def __enter__(self):
        constrain.Matcher.allowed, constrain.Matcher.fit = (self._timed(f) for f in self._saved)
        return self

    def __exit__(self, *exc):
        constrain.Matcher.allowed, constrain.Matcher.fit = self._saved


CLOCK = time.process_time  # CPU seconds of this process: steadier than wall time on a shared machine


class FirstCallClock:
    """The model, timing its first call (the prompt's prefill), which is not a per-token cost."""

    def __init__(self, model):
        self.model, self.first = model, None

    def __call__(self, *a, **k):
        t0 = CLOCK()
        out = self.model(*a, **k)
        if self.first is None:
            self.first = CLOCK() - t0
        return out

    def __getattr__(self, name):
        return getattr(self.model, name)


def run(engine, ids, sampling, stops) -> tuple[float, int, str]:
    """(seconds of the reply after the prefill, tokens, text)."""
    model = FirstCallClock(engine.model)
    t0 = CLOCK()
    gen = Generation(model, engine.tokenizer, ids, engine.model.new_cache(1), sampling, stops).run()
    return CLOCK() - t0 - model.first, len(gen.tokens), gen.text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=96, help="tokens of the free runs")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is then the work done)")
    ap.add_argument("--ways", default="free,schema,tight,tools,tools-req", help="which runs (comma-separated)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = load_engine(args.model)
    ids = engine.template.render(engine.tokenizer, MESSAGES, add_generation_prompt=True)[0]
    stops = engine.template.stop_ids(engine.tokenizer)
    tool_ids = engine.template.render(engine.tokenizer, MESSAGES, add_generation_prompt=True, tools=TOOLS)[0]
    grammar = Grammar.json_schema(SCHEMA)
    style, controls = engine.template.tool_style, engine.tokenizer.control_ids
    base = Sampling(temperature=1.0, max_new_tokens=args.max_tokens)
    ways = {"free": (base, set(), ids), "schema": (base.replace(max_new_tokens=400, constraint=grammar), stops, ids),
            "tight": (base.replace(max_new_tokens=48, constraint=grammar), stops, ids),
            "tools": (base.replace(max_new_tokens=400, constraint=tool_grammar(TOOLS, style, "auto", True, controls)),
                      stops, tool_ids),
            "tools-req": (base.replace(max_new_tokens=96, constraint=tool_grammar(TOOLS, style, "required", True,
                                                                                  controls)), stops, tool_ids)}
    ways = {k: v for k, v in ways.items() if k in args.ways.split(",") or k == "free"}
    run(engine, ids, base.replace(seed=0, max_new_tokens=8, constraint=grammar), stops)  # warm up (tokenizer tables)
    per_token = {}
    for name, (s, stop_ids, prompt) in ways.items():
        times, masks, counts = [], [], []
        for seed in range(args.runs):
            with MaskClock() as clock:
                seconds, n, text = run(engine, prompt, s.replace(seed=seed), stop_ids)
            times.append(seconds / max(n, 1))
            masks.append(clock.seconds / max(n, 1))
            counts.append(n)
        per_token[name] = statistics.median(times)
        print(f"{name:7s} median {1000 * per_token[name]:.2f} ms/token over {args.runs} runs "
              f"(tokens per run {min(counts)}-{max(counts)}; mask work {1000 * statistics.median(masks):.3f} ms/token)"
              f"; last reply: {text[:80]!r}")
    for name in (n for n in ways if n != "free"):
        print(f"{name} / free: {per_token[name] / per_token['free']:.3f}x per token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
