"""Time to first token of a stateless client (it resends the whole conversation every turn), with
the server's kept prompt caches against without them (`--kv-budget-mb 0` keeps none).

Starts `dialogen serve` twice on a free loopback port (default model unless --model) and plays
the same greedy conversation against each, streamed, through /v1/chat/completions. Prints the
per-turn prompt size, cached tokens and time to first token of both, then the median ratio.

    nice .venv/bin/python bench/stateless_prefix.py [--turns 12] [--max-tokens 32]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from dialogen.serve.launch import ServerProcess

TURNS = ["Hi! How is your day going?", "Can you recommend a good book to read?", "Why do you like it?",
         "What should I cook for dinner tonight?", "Thanks! Any tips for sleeping better?",
         "What is your favourite season?", "Tell me a fun fact.", "Another one, please.",
         "How do plants grow?", "What about trees in winter?", "Summarise what we talked about.", "Goodbye!"]
PERSONA = "You are a friendly, concise assistant."


def play(url: str, turns: int, max_tokens: int) -> list[dict]:
    messages = [{"role": "system", "content": PERSONA}]
    rows = []
    with httpx.Client(base_url=url, timeout=600) as client:
        for i in range(turns):
            messages.append({"role": "user", "content": TURNS[i % len(TURNS)]})
            body = {"messages": messages, "stream": True, "max_tokens": max_tokens, "temperature": 0,
                    "stream_options": {"include_usage": True}}
            t0, first, text, usage = time.perf_counter(), None, "", {}
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    ev = json.loads(line[6:])
                    if ev["choices"] and ev["choices"][0]["delta"].get("content"):
                        first = first or time.perf_counter() - t0
                        text += ev["choices"][0]["delta"]["content"]
                    usage = ev.get("usage") or usage
            messages.append({"role": "assistant", "content": text})
            rows.append({"turn": i + 1, "prompt_tokens": usage.get("prompt_tokens"),
                         "cached_tokens": usage.get("prompt_tokens_details", {}).get("cached_tokens"),
                         "ttft": first, "text": text})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model for the server (default: the embedded default model)")
    ap.add_argument("--turns", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=32, help="reply length limit per turn")
    args = ap.parse_args(argv)
    runs = {}
    for name, extra in (("kept", []), ("none", ["--kv-budget-mb", "0"])):
        with tempfile.TemporaryDirectory() as tmp:
            flags = (["--model", args.model] if args.model else []) + ["--db", str(Path(tmp) / "s.db")] + extra
            with ServerProcess(flags) as srv:
                runs[name] = play(srv.url, args.turns, args.max_tokens)
        print(f"{name}: done", file=sys.stderr)
    print("| turn | prompt tokens | cached (kept) | TTFT kept s | TTFT none s | same reply |")
    print("|---|---|---|---|---|---|")
    for a, b in zip(runs["kept"], runs["none"]):
        print(f"| {a['turn']} | {a['prompt_tokens']} | {a['cached_tokens']} | {a['ttft']:.3f} | {b['ttft']:.3f} | "
              f"{'yes' if a['text'] == b['text'] else 'no'} |")
    later = range(1, args.turns)  # turn 1 has nothing to reuse
    kept = statistics.median(runs["kept"][i]["ttft"] for i in later)
    none = statistics.median(runs["none"][i]["ttft"] for i in later)
    print(f"\nturns 2-{args.turns}: median TTFT {kept:.3f} s kept vs {none:.3f} s without, ratio {none / kept:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
