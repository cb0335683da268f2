"""Every family from its llama.cpp-converted F16 GGUF: dialogen's greedy tokens against llama.cpp's
(llama-cpp-python, in a process of its own) for the first 32 tokens of 8 prompts, and dialogen from
the GGUF against dialogen from the HF directory it was converted from. The files are
bench/make_models.py's `--families` output. A family dialogen refuses to load from GGUF is reported
as refused, with dialogen's one-line reason.

    .venv/bin/python bench/make_models.py --families
    .venv/bin/python bench/family_parity.py --threads 2 [--cache-type f32] [--families gemma2 phi3] [--type F32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PROMPTS = [
    "What is the capital of France?",
    "Tell me a joke about computers.",
    "   indented code:\n\tdef f(x):\n\t\treturn x * 2",
    "Numbers 12345 and 3.14159, dates 2024-01-31.",
    "Ünïcödé, 日本語のテキスト, and emoji 🙂🚀",
    "hey whats up, how was your weekend?",
    "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
]


CACHE_TYPES = {"f16": 1, "f32": 0}  # llama.cpp's KV cache types (ggml type ids); f16 is its default


def peer(path: str, threads: int, n: int, cache: str = "f16") -> None:
    """Runs in the llama.cpp process: prompt ids on stdin (a JSON list of lists), greedy tokens out."""
    import llama_cpp

    kind = CACHE_TYPES[cache]
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=threads, verbose=False, type_k=kind, type_v=kind)
    result = []
    for ids in json.load(sys.stdin):
        out = []
        for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(tok)
            if len(out) == n:
                break
        result.append(out)
    json.dump(result, sys.stdout)


def llamacpp_tokens(path: Path, prompts: list[list[int]], threads: int, n: int, cache: str = "f16") -> list[list[int]] | str:
    run = subprocess.run([sys.executable, __file__, "--peer", str(path), "--threads", str(threads), "--tokens", str(n),
                          "--cache-type", cache],
                         input=json.dumps(prompts), capture_output=True, text=True)
    if run.returncode != 0:
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        return "llama.cpp failed: " + (lines[-1] if lines else f"exit {run.returncode}")
    return json.loads(run.stdout)


def greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after ids through the KV cache, with no stop token (as llama.cpp's side)."""
    import torch

    cache = model.new_cache(1)
    out, logits = [], model.next_logits(torch.tensor([ids]), cache)
    for _ in range(n):
        out.append(int(logits[0].argmax()))
        if len(out) < n:
            logits = model.next_logits(torch.tensor([[out[-1]]]), cache)
    return out


def dialogen_tokens(spec: Path, prompts: list[list[int]], n: int) -> list[list[int]] | str:
    import torch

    from dialogen.errors import UserError
    from dialogen.models.loading import load

    try:
        model = load(str(spec), dtype="float32").model
    except UserError as e:
        return f"refused: {e}"
    with torch.no_grad():
        return [greedy(model, ids, n) for ids in prompts]


def same(a, b) -> str:
    if isinstance(a, str) or isinstance(b, str):
        return "-"
    return f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="make_models' families directory "
                    "(default: <cache>/bench-models/families)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--cache-type", choices=sorted(CACHE_TYPES), default="f16",
                    help="llama.cpp's KV cache type (its --cache-type-k/-v); f16 rounds keys and values")
    ap.add_argument("--families", nargs="*", default=None, help="only these families")
    ap.add_argument("--type", choices=["F16", "F32"], default="F16", help="which of make_models' GGUFs (--family-type)")
    ap.add_argument("--peer", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        return peer(args.peer, args.threads, args.tokens, args.cache_type)
    import torch

    from dialogen.models.loading import resolve
    from dialogen.models.tokenizer import Tokenizer
    from dialogen.paths import cache_dir

    torch.set_num_threads(args.threads)
    where = args.dir or cache_dir() / "bench-models" / "families"
    status = json.loads((where / "status.json").read_text()) if (where / "status.json").exists() else {}
    tok = Tokenizer.from_dir(resolve(None))  # every family carries the default model's vocabulary
    prompts = [tok.encode_template(p) for p in PROMPTS]  # control-token text becomes control ids
    print("| family | GGUF vs llama.cpp | GGUF vs HF dir | dialogen from GGUF |")
    print("|---|---|---|---|")
    for hf_dir in sorted(p for p in where.iterdir() if (p / "config.json").exists()
                         and (args.families is None or p.name in args.families)):
        family, gguf = hf_dir.name, where / f"{hf_dir.name}-{args.type}.gguf"
        if not gguf.exists():
            print(f"| {family} | - | - | no GGUF ({status.get(family, 'not converted')}) |", flush=True)
            continue
        ours = dialogen_tokens(gguf, prompts, args.tokens)
        from_hf = dialogen_tokens(hf_dir, prompts, args.tokens)
        theirs = llamacpp_tokens(gguf, prompts, args.threads, args.tokens, args.cache_type)
        note = ours if isinstance(ours, str) else (theirs if isinstance(theirs, str) else "loaded")
        if isinstance(from_hf, str):
            note += f"; HF dir {from_hf}"
        print(f"| {family} | {same(ours, theirs)} | {same(ours, from_hf)} | {note} |", flush=True)


if __name__ == "__main__":
    main()
