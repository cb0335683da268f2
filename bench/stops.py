"""What long stop strings cost a request: 4 stop strings of 100k characters each against none.

Starts `dialogen serve` on a free loopback port (default model unless --model) and times the same
greedy chat completion without stops and with 4 long stops that never complete but keep matching:
each is a prefix of the reply (its first few characters) padded with a character ("^") the reply never
has, so the server holds back text while it waits to see whether a stop follows. Prints both
median times and their ratio (the issue's bound: under 2).

    nice .venv/bin/python bench/stops.py [--stop-chars 100000] [--max-tokens 64] [--repeats 3]
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

PROMPT = "Tell me about the sea, in a few sentences."


def timed(client: httpx.Client, max_tokens: int, stop: list[str] | None) -> tuple[float, str]:
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, "temperature": 0}
    if stop:
        body["stop"] = stop
    t0 = time.perf_counter()
    r = client.post("/chat/completions", json=body)
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()["choices"][0]["message"]["content"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--stop-chars", type=int, default=100_000, help="characters in each of the 4 stop strings")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server_args = ["--db", str(Path(tmp) / "bench.db"), "--max-body-bytes", str(8 * args.stop_chars + 100_000)]
        if args.model:
            server_args += ["--model", args.model]
        with ServerProcess(server_args) as srv, httpx.Client(base_url=srv.url + "/v1", timeout=3600) as client:
            _, reply = timed(client, args.max_tokens, None)  # warm up; the reply the stops will shadow
            stops = [(reply[: 2 + 3 * k] + "^" * args.stop_chars)[: args.stop_chars] for k in range(4)]
            plain, long = [], []
            for _ in range(args.repeats):
                t, text = timed(client, args.max_tokens, None)
                plain.append(t)
                t, stopped = timed(client, args.max_tokens, stops)
                long.append(t)
                if stopped != text:
                    print(f"the stops changed the reply: {stopped!r} != {text!r}", file=sys.stderr)
                    return 1
    out = {"stop_strings": 4, "stop_chars_each": args.stop_chars, "max_tokens": args.max_tokens,
           "reply_chars": len(reply), "plain_s": round(statistics.median(plain), 3),
           "with_stops_s": round(statistics.median(long), 3)}
    out["ratio"] = round(out["with_stops_s"] / out["plain_s"], 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
