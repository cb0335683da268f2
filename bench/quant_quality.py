"""The quality cost of the decode weights: perplexity of each --dtype, and llama.cpp's, on the same tokens.

The default model, the chitchat test split (split seed 0), its first --conversations conversations,
the assistant tokens the README's training table scores (`dialogen perplexity --max-len 512`). Each
dtype's decode copy of the weights is used for every product here (normally only decode steps use
it; prefill stays float32), so the figure is what a reply sees. float32 is the file's own Q4_1
values in float32 arithmetic; "q4_1" keeps the shipped blocks (int4 with a scale and a minimum per
32 weights; the tied head is Q8_0), as llama.cpp runs them. llama.cpp's perplexity (llama-cpp-python,
`logits_all`) is over the same token ids. Prints a table, then one JSON line.

`--model FILE` scores a GGUF of the default model in another type (bench/make_models.py
`--default-types`: Q4_K_M, Q5_K_M, Q6_K, IQ4_NL ...) on the same examples, tokenized by the default
model (the vocabulary is the same): "fp32" is the file's values dequantized, in float32 arithmetic
(the reference path); "ours" multiplies the file's own blocks in every product (`--dtype auto`);
llama.cpp runs the same file. `ours_vs_llamacpp` is ours / llama.cpp's perplexity - 1.

    .venv/bin/python bench/quant_quality.py [--conversations 50] [--threads 2]
    .venv/bin/python bench/quant_quality.py --model ~/.cache/dialogen/bench-models/default-Q4_K_M.gguf
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dialogen.chat.session import load_engine
from dialogen.data import load_split
from dialogen.data.dataset import IGNORE_INDEX, build_examples
from dialogen.eval.perplexity import examples_perplexity
from dialogen.models.loading import default_model_path, load
from dialogen.models.native import HalfLinear

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "int8", "q4_1": "auto"}
FILE_DTYPES = {"fp32": "float32", "ours": "auto"}  # --model: the reference, and the file's own blocks


def ours(path, dtype: str, examples, vocab_size: int, pad_id: int) -> dict:
    model = load(str(path), dtype).model
    if model.cfg.vocab_size != vocab_size:
        raise SystemExit(f"quant_quality: {path}: a vocabulary of {model.cfg.vocab_size} ids, not the default "
                         f"model's {vocab_size}")
    for m in model.modules():
        if isinstance(m, HalfLinear):  # blocks serve every product already
            m.everywhere = True
    return examples_perplexity(model, examples, pad_id, batch_size=4)


def llamacpp(path, examples, threads: int) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama.cpp: llama-cpp-python is not installed (make bench-peers); reporting the rest", file=sys.stderr)
        return None
    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=1024, n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False)
    total, count = 0.0, 0
    for ex in examples:
        llm.reset()
        llm.eval(ex.ids)
        logits = np.asarray(llm.scores[: len(ex.ids)], dtype=np.float64)  # (T, V): row t predicts token t + 1
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for t in range(1, len(ex.ids)):
            if ex.labels[t] != IGNORE_INDEX:
                total -= logp[t - 1, ex.labels[t]]
                count += 1
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None,
                    help="a GGUF of the default model in another type (default: the default model's own file)")
    ap.add_argument("--conversations", type=int, default=50)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = (args.model or default_model_path()).expanduser()
    if not path.is_file():
        raise SystemExit(f"quant_quality: {path}: no such file")
    engine = load_engine(None, "auto", "float32")  # the default model's tokenizer and template
    convs = load_split("chitchat", "test", None, 0, False)[: args.conversations]
    examples, _ = build_examples(convs, engine.tokenizer, engine.template, args.max_len, train_on="assistant")
    rows = {}
    for name, dtype in (FILE_DTYPES if args.model else DTYPES).items():
        t = time.perf_counter()
        rows[name] = ours(path, dtype, examples, engine.model.cfg.vocab_size, engine.tokenizer.pad_id)
        print(f"{name:6s} ppl {rows[name]['ppl']:.3f} over {rows[name]['tokens']} tokens "
              f"({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    t = time.perf_counter()
    peer = llamacpp(path, examples, args.threads)
    if peer is not None:
        print(f"llama.cpp ppl {peer['ppl']:.3f} over {peer['tokens']} tokens ({time.perf_counter() - t:.0f} s)",
              file=sys.stderr)
    base = rows["fp32"]["ppl"]
    native = "ours" if args.model else "q4_1"  # the row of the file's own blocks
    out = {"model": path.stem, "split": "chitchat test", "conversations": len(convs),
           "tokens": rows["fp32"]["tokens"], **{f"ppl_{k}": round(v["ppl"], 3) for k, v in rows.items()},
           **{f"vs_fp32_{k}": round(v["ppl"] / base - 1, 4) for k, v in rows.items() if k != "fp32"},
           "ppl_llamacpp": round(peer["ppl"], 3) if peer else None,
           "llamacpp_tokens": peer["tokens"] if peer else None,
           f"{native}_vs_llamacpp": round(rows[native]["ppl"] / peer["ppl"] - 1, 4) if peer else None}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
