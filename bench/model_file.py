"""Any GGUF file, dialogen against llama.cpp, each engine in a process of its own.

torch's and llama.cpp's OpenMP pools slow each other down in one process, so every run here is a
fresh process (`--engine ours|llamacpp` runs one and prints one JSON line): it loads the file, feeds
the same seeded prompt ids, then decodes greedily for a fixed number of tokens (no early stop).
The parent alternates the two engines `--repeats` times and prints the medians and ratios:
load time, prompt tok/s, decode tok/s, and RSS after the reply (current and peak), with dialogen's
memory budget: the file's size plus its KV cache plus MEMORY_SLACK_MB.

    .venv/bin/python bench/model_file.py --model FILE [--prompt-tokens 512] [--new-tokens 64]

llama.cpp is llama-cpp-python (`make bench-peers`) with the same thread count for prompt and decode.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    """Ordinary-token ids (the default vocabulary's specials lie below 100; its size is 49152)."""
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(n)]


MEMORY_SLACK_MB = 300


def rss_mb() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out["rss_mb" if line.startswith("VmRSS") else "peak_rss_mb"] = int(line.split()[1]) / 1024
    return out


def run_ours(path: str, ids: list[int], n: int, threads: int, dtype: str) -> dict:
    import torch

    from dialogen.decoding.generate import Generation
    from dialogen.decoding.settings import Sampling
    from dialogen.models.loading import load

    torch.set_num_threads(threads)
    t = time.perf_counter()
    loaded = load(path, dtype)
    load_s = time.perf_counter() - t
    s = Sampling(temperature=0, repetition_penalty=1.0, max_new_tokens=n)
    with torch.inference_mode():
        t = time.perf_counter()
        cache = loaded.model.new_cache(1)
        gen = Generation(loaded.model, loaded.tokenizer, ids, cache, s, stop_ids=set())
        it = iter(gen)
        first = None
        for _ in it:
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
    tokens = len(gen.tokens)
    assert tokens == n, f"{tokens} tokens of {n}"
    # the memory goal: RSS after the reply within the file, the KV cache and MEMORY_SLACK_MB
    budget = (os.path.getsize(path) + cache.nbytes()) / 2**20 + MEMORY_SLACK_MB
    return {"load_s": load_s, "first_s": first - t, "decode_tok_s": (n - 1) / (end - first), **rss_mb(),
            "kv_mb": round(cache.nbytes() / 2**20, 1), "budget_mb": round(budget, 1)}


def run_llamacpp(path: str, ids: list[int], n: int, threads: int) -> dict:
    from llama_cpp import Llama

    t = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=len(ids) + n + 16, n_batch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    first = None
    for i, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)):
        if first is None:
            first = time.perf_counter()
        if i + 1 == n:
            break
    end = time.perf_counter()
    return {"load_s": load_s, "first_s": first - t, "decode_tok_s": (n - 1) / (end - first), **rss_mb()}


def child(args) -> dict:
    ids = prompt_ids(args.prompt_tokens)
    if args.engine == "ours":
        return run_ours(args.model, ids, args.new_tokens, args.threads, args.dtype)
    return run_llamacpp(args.model, ids, args.new_tokens, args.threads)


def spawn(args, engine: str) -> dict:
    cmd = [sys.executable, __file__, "--engine", engine, "--model", args.model, "--threads", str(args.threads),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--dtype", args.dtype]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{engine} failed:\n{res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a GGUF file")
    ap.add_argument("--engine", choices=["ours", "llamacpp"], help="run one engine here and print one JSON line")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto", help="dialogen's --dtype (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.engine:
        print(json.dumps(child(args)))
        return
    runs = {"ours": [], "llamacpp": []}
    for r in range(args.repeats):
        for engine in runs:
            runs[engine].append(spawn(args, engine))
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{e} decode {v[-1]['decode_tok_s']:.1f} tok/s" for e, v in runs.items()), file=sys.stderr)

    def med(engine, key):
        return statistics.median(x[key] for x in runs[engine])

    out = {"model": args.model, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
           "new_tokens": args.new_tokens, "dtype": args.dtype}
    for key in ("load_s", "first_s", "decode_tok_s", "rss_mb", "peak_rss_mb"):
        for engine in runs:
            out[f"{engine}_{key}"] = round(med(engine, key), 3)
    out["prompt_tok_s_ours"] = round(args.prompt_tokens / out["ours_first_s"], 1)
    out["prompt_tok_s_llamacpp"] = round(args.prompt_tokens / out["llamacpp_first_s"], 1)
    out["decode_ratio"] = round(out["ours_decode_tok_s"] / out["llamacpp_decode_tok_s"], 3)
    out["decode_ratio_paired"] = round(statistics.median(
        a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(runs["ours"], runs["llamacpp"])), 3)
    out["prompt_ratio"] = round(out["llamacpp_first_s"] / out["ours_first_s"], 3)
    out["ours_budget_mb"] = runs["ours"][0]["budget_mb"]
    out["ours_within_budget"] = out["ours_rss_mb"] <= out["ours_budget_mb"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
