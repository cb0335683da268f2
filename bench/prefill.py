"""Prompt speed (prefill): the default model's blocks against its float32 weights, and llama.cpp.

A prompt of T token ids is fed into a fresh cache and the next-token logits are taken, in three
engines in one process with the same threads, runs alternating, medians:
- dialogen `--dtype auto`: the GGUF file's Q4_1/Q8_0 blocks multiply the prompt (integer products);
- dialogen `--dtype float32`: the same values as float32 weights (torch's float32 GEMM);
- llama.cpp on the same file (llama-cpp-python, `make bench-peers`), when installed.
Prints one JSON line: tokens per second per prompt length, and the ratios.

    .venv/bin/python bench/prefill.py [--threads 2] [--lengths 8 22 64 256] [--repeats 5]
"""

import argparse
import json
import statistics
import time

import torch

from decode import load_llamacpp  # this directory: the same llama.cpp set-up as the decode bench
from dialogen.models.loading import load


def ours_s(model, ids: list[int]) -> float:
    t = time.perf_counter()
    model.next_logits(torch.tensor([ids]), model.new_cache(1))
    return time.perf_counter() - t


def llamacpp_s(llm, ids: list[int]) -> float:
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8, 22, 64, 256])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    engines = {"blocks": load(None, "auto").model, "float32": load(None, "float32").model}
    llm = load_llamacpp(args.threads)
    vocab = engines["blocks"].cfg.vocab_size
    out = {"threads": args.threads, "tok_s": {}}
    with torch.inference_mode():
        for T in args.lengths:
            ids = torch.randint(100, vocab - 100, (T,), generator=torch.Generator().manual_seed(T)).tolist()
            times = {name: [] for name in [*engines, *(["llamacpp"] if llm else [])]}
            for r in range(args.repeats + 1):  # the first round warms up and is dropped
                for name, model in engines.items():
                    t = ours_s(model, ids)
                    if r:
                        times[name].append(t)
                if llm:
                    t = llamacpp_s(llm, ids)
                    if r:
                        times["llamacpp"].append(t)
            rates = {name: round(T / statistics.median(ts), 1) for name, ts in times.items()}
            rates["blocks_vs_float32"] = round(rates["blocks"] / rates["float32"], 2)
            if llm:
                rates["blocks_vs_llamacpp"] = round(rates["blocks"] / rates["llamacpp"], 2)
            out["tok_s"][str(T)] = rates
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
