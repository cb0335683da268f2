"""Decode speed: our engine vs llama.cpp and transformers on the default model, side by side in one process.

Same GGUF file for us and llama.cpp (llama-cpp-python, installed by `make bench-peers`), same weights
for transformers (it reads the file converted to float32), the same prompt token ids, greedy, the same
number of new tokens (no early stop), the same thread count. Runs alternate between the engines so
machine noise hits all of them; medians are reported. Also beam 5 (ours vs transformers) and the
time to first token of turn 1 and turn 20 of a 20-turn chat, where our session keeps its KV cache.
Prints one JSON line; without llama-cpp-python it says so in one line and reports the rest.

    .venv/bin/python bench/decode.py [--threads 2] [--new-tokens 128] [--repeats 3]
"""

import argparse
import json
import statistics
import sys
import time

import torch

from dialogen.chat.session import Engine, Session, load_engine
from dialogen.decoding.generate import Generation
from dialogen.decoding.settings import Sampling
from dialogen.models.loading import resolve

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]


def ours_tok_s(engine: Engine, ids: list[int], n: int) -> float:
    s = Sampling(temperature=0, repetition_penalty=1.0, max_new_tokens=n)
    t = time.perf_counter()
    gen = Generation(engine.model, engine.tokenizer, ids, engine.model.new_cache(1), s, stop_ids=set()).run()
    assert len(gen.tokens) == n
    return n / (time.perf_counter() - t)


def llamacpp_tok_s(llm, ids: list[int], n: int) -> float:
    llm.reset()  # else generate() reuses the KV cache of an identical earlier prompt and skips the prefill
    t = time.perf_counter()
    for i, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)):
        if i + 1 == n:
            break
    return n / (time.perf_counter() - t)


def load_llamacpp(threads: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama.cpp: llama-cpp-python is not installed (make bench-peers); reporting the rest", file=sys.stderr)
        return None
    from dialogen.models.loading import default_model_path

    return Llama(model_path=str(default_model_path()), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                 verbose=False)


def hf_tok_s(model, ids: list[int], n: int) -> float:
    x = torch.tensor([ids])
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    assert out.shape[1] - len(ids) == n
    return n / (time.perf_counter() - t)


def ours_beam_tok_s(engine: Engine, ids: list[int], n: int, beams: int = 5) -> float:
    from dialogen.decoding.beam import BeamSettings, beam_search

    s = BeamSettings(beam_size=beams, max_new_tokens=n, min_new_tokens=n)  # no early stop: n steps
    t = time.perf_counter()
    best = beam_search(engine.model, ids, s, stop_ids=set())[0]
    assert len(best.tokens) == n
    return n / (time.perf_counter() - t)


def hf_beam_tok_s(model, ids: list[int], n: int, beams: int = 5) -> float:
    x = torch.tensor([ids])
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(x, max_new_tokens=n, min_new_tokens=n, num_beams=beams, do_sample=False, pad_token_id=0)
    assert out.shape[1] - len(ids) == n
    return n / (time.perf_counter() - t)


def ttft_by_turn(engine: Engine, turns: int, reply_tokens: int) -> list[float]:
    session = Session(engine, sampling=Sampling(temperature=0, max_new_tokens=reply_tokens))
    out = []
    for i in range(turns):
        t = time.perf_counter()
        gen = session.send(f"Turn {i + 1}: tell me one more fact about the sea, please.")
        for _ in gen:
            out.append(time.perf_counter() - t)
            break
        else:
            out.append(time.perf_counter() - t)
        gen.run()  # finish the reply so it joins the history
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--beam-tokens", type=int, default=32, help="new tokens of the beam-5 runs")
    ap.add_argument("--threads", type=int, default=2, help="threads of every engine (default: %(default)s)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    # auto keeps the file's own Q4_1 blocks (and Q8_0 for the tied head): the same weights llama.cpp runs
    dtypes = {"q4_1": "auto", "int8": "int8", "fp16": "float16", "fp32": "float32"}
    engines = {k: load_engine(None, "auto", dt) for k, dt in dtypes.items()}
    ref = AutoModelForCausalLM.from_pretrained(str(resolve(None)), dtype=torch.float32).eval()
    llm = load_llamacpp(args.threads)
    from dialogen.chat.messages import parse_messages

    fp32 = engines["fp32"]
    ids = fp32.template.render(fp32.tokenizer, parse_messages(PROMPT), add_generation_prompt=True)[0]
    for e in engines.values():  # warm-up
        ours_tok_s(e, ids, 8)
    hf_tok_s(ref, ids, 8)
    if llm is not None:
        llamacpp_tok_s(llm, ids, 8)
    runs = {"transformers_fp32": [], **{f"ours_{k}": [] for k in engines}, **({"llamacpp": []} if llm else {})}
    for r in range(args.repeats):  # alternating, so machine noise hits every engine alike
        runs["transformers_fp32"].append(hf_tok_s(ref, ids, args.new_tokens))
        for k, e in engines.items():
            runs[f"ours_{k}"].append(ours_tok_s(e, ids, args.new_tokens))
        if llm is not None:
            runs["llamacpp"].append(llamacpp_tok_s(llm, ids, args.new_tokens))
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()),
              file=sys.stderr)
    med = {k: statistics.median(v) for k, v in runs.items()}
    best = max(engines, key=lambda k: med[f"ours_{k}"])
    best_tok_s, beam_engine = med[f"ours_{best}"], engines[best]
    beam_runs = {"ours": [], "transformers": []}
    for _ in range(args.repeats):  # beam search, 5 beams as one batch, same dtype choice as greedy
        beam_runs["ours"].append(ours_beam_tok_s(beam_engine, ids, args.beam_tokens))
        beam_runs["transformers"].append(hf_beam_tok_s(ref, ids, args.beam_tokens))
    beam = {k: statistics.median(v) for k, v in beam_runs.items()}
    ttfts = [ttft_by_turn(beam_engine, args.turns, 24) for _ in range(args.repeats)]
    t1 = statistics.median(t[0] for t in ttfts)
    tn = statistics.median(t[-1] for t in ttfts)
    print(json.dumps({
        "model": "SmolLM2-135M-Instruct", "new_tokens": args.new_tokens, "prompt_tokens": len(ids),
        "ours_tok_s": round(best_tok_s, 2), "ours_dtype": best,
        "llamacpp_tok_s": round(med["llamacpp"], 2) if llm else None,
        "ratio_vs_llamacpp": round(best_tok_s / med["llamacpp"], 2) if llm else None,
        # the same ratio within each repeat, then the median: steadier when the machine's speed drifts
        "ratio_vs_llamacpp_paired": round(statistics.median(
            a / b for a, b in zip(runs[f"ours_{best}"], runs["llamacpp"])), 2) if llm else None,
        **{f"ours_{k}_tok_s": round(med[f"ours_{k}"], 2) for k in engines},
        "transformers_tok_s": round(med["transformers_fp32"], 2),
        "ratio": round(best_tok_s / med["transformers_fp32"], 2),
        "ratio_fp32": round(med["ours_fp32"] / med["transformers_fp32"], 2),
        "ttft_turn1_s": round(t1, 4), f"ttft_turn{args.turns}_s": round(tn, 4),
        "ttft_ratio": round(tn / t1, 2), "threads": torch.get_num_threads(),
        "beam5_new_tokens": args.beam_tokens, "ours_beam5_tok_s": round(beam["ours"], 2),
        "transformers_beam5_tok_s": round(beam["transformers"], 2),
        "beam5_ratio": round(beam["ours"] / beam["transformers"], 2),
    }))


if __name__ == "__main__":
    main()
