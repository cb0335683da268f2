"""What structured output costs per token: JSON-schema constrained decoding against unconstrained.

Loads the model in process (default model unless --model) and decodes the same chat prompt, with
sampling at temperature 1 and a seed per run, three ways:
  free       no constraint (never stops early: no stop token, so every run has --max-tokens tokens)
  schema     a JSON schema (a customer-service intent with slots), a budget far above the reply,
             so only the mask is paid (the closing path is followed only in the last 128 tokens)
  tight      the same schema with a budget of 48 tokens: the closing path is checked at every step
For each, the median over runs of CPU seconds per generated token (process time, so other work on
a shared machine does not count; the prompt's prefill left out), and the ratio to `free`. Also the time of the mask work
alone (matcher.allowed + fit) per token,
measured around those calls.

    .venv/bin/python bench/constrained.py [--runs 5] [--max-tokens 96] [--threads 1]
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

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["intent", "city", "people", "note"],
          "properties": {"intent": {"enum": ["book_table", "cancel", "ask_hours"]},
                         "city": {"type": "string"}, "people": {"type": "integer"},
                         "note": {"type": "string"}}}
MESSAGES = [Message("system", "You turn a customer's message into JSON."),
            Message("user", "Hi, I'd like a table for four in Lisbon tonight, please, by the window.")]


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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = load_engine(args.model)
    ids = engine.template.render(engine.tokenizer, MESSAGES, add_generation_prompt=True)[0]
    stops = engine.template.stop_ids(engine.tokenizer)
    grammar = Grammar.json_schema(SCHEMA)
    base = Sampling(temperature=1.0, max_new_tokens=args.max_tokens)
    ways = {"free": (base, set()), "schema": (base.replace(max_new_tokens=400, constraint=grammar), stops),
            "tight": (base.replace(max_new_tokens=48, constraint=grammar), stops)}
    run(engine, ids, base.replace(seed=0, max_new_tokens=8, constraint=grammar), stops)  # warm up (tokenizer tables)
    per_token = {}
    for name, (s, stop_ids) in ways.items():
        times, masks, counts = [], [], []
        for seed in range(args.runs):
            with MaskClock() as clock:
                seconds, n, text = run(engine, ids, s.replace(seed=seed), stop_ids)
            times.append(seconds / max(n, 1))
            masks.append(clock.seconds / max(n, 1))
            counts.append(n)
        per_token[name] = statistics.median(times)
        print(f"{name:7s} median {1000 * per_token[name]:.2f} ms/token over {args.runs} runs "
              f"(tokens per run {min(counts)}-{max(counts)}; mask work {1000 * statistics.median(masks):.3f} ms/token)"
              f"; last reply: {text[:80]!r}")
    for name in ("schema", "tight"):
        print(f"{name} / free: {per_token[name] / per_token['free']:.3f}x per token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
