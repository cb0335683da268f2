"""Does llama.cpp run what `dialogen export --gguf` writes? The default model (or --model) is exported
as f16, Q8_0 and Q4_0; each file is loaded in llama-cpp-python (`make bench-peers`) and in dialogen,
and both decode the same chat prompts greedily. Printed per file: prompts whose greedy tokens are
identical, the mean length of the common prefix, and whether llama.cpp's own rendering of the
file's chat template gives our prompt tokens.

    .venv/bin/python bench/gguf_llamacpp.py --threads 2 --tokens 64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "What is the capital of France?",
    "Tell me a joke about computers.",
    "How do I boil an egg?",
    "Write a haiku about the sea.",
    "What are three tips for staying focused?",
    "Explain photosynthesis to a child.",
    "hey whats up, how was your weekend?",
    "Can you recommend a good book?",
]


def ours_greedy(model, ids: list[int], n: int) -> list[int]:
    from dialogen.decoding.generate import Generation
    from dialogen.decoding.settings import Sampling

    eng = model.engine
    s = Sampling(temperature=0, repetition_penalty=1.0, max_new_tokens=n)
    gen = Generation(eng.model, eng.tokenizer, ids, eng.model.new_cache(1), s, eng.template.stop_ids(eng.tokenizer))
    return gen.run().tokens


def llamacpp_greedy(llm, ids: list[int], n: int, stops: set[int]) -> list[int]:
    out = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if tok in stops or tok == llm.token_eos() or len(out) == n:
            break
        out.append(tok)
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(path: Path, dtype: str, args) -> dict:
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    import dialogen
    from dialogen.api import as_messages

    ours = dialogen.load(str(path), dtype=dtype)
    eng = ours.engine
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=args.threads, verbose=False)
    meta = llm.metadata
    tokens = [llm.detokenize([i], special=True).decode("utf-8", "replace") for i in (llm.token_bos(), llm.token_eos())]
    formatter = Jinja2ChatFormatter(meta["tokenizer.chat_template"], eos_token=tokens[1], bos_token=tokens[0])
    stops = eng.template.stop_ids(eng.tokenizer)
    same, prefixes, prompts_equal, lengths = 0, [], 0, []
    for text in PROMPTS[: args.prompts]:
        msgs = as_messages(text)
        ids = eng.template.render(eng.tokenizer, msgs, add_generation_prompt=True)[0]
        theirs_prompt = formatter(messages=[m.to_dict() for m in msgs]).prompt
        prompts_equal += llm.tokenize(theirs_prompt.encode(), add_bos=False, special=True) == ids
        a, b = ours_greedy(ours, ids, args.tokens), llamacpp_greedy(llm, ids, args.tokens, stops)
        same += a == b
        prefixes.append(common_prefix(a, b))
        lengths.append(max(len(a), len(b)))
        if args.verbose:
            print(f"  {text!r}\n    ours: {eng.tokenizer.decode(a)!r}\n    llama.cpp: {eng.tokenizer.decode(b)!r}",
                  file=sys.stderr)
    chat = llm.create_chat_completion(messages=[{"role": "user", "content": PROMPTS[0]}], temperature=0,
                                      max_tokens=32)["choices"][0]["message"]["content"]
    return {"identical": f"{same}/{len(prefixes)}", "common_prefix_mean": sum(prefixes) / len(prefixes),
            "reply_tokens_mean": sum(lengths) / len(lengths), "template_prompts_equal": f"{prompts_equal}/{len(prefixes)}",
            "llama_cpp_chat": chat}


def gpt2_check(args):
    """A tiny random GPT-2 on a scratch byte-level BPE, exported and run in llama.cpp: its logits against
    transformers' on the checkpoint (the default model is a llama; this covers the gpt2 family)."""
    import numpy as np
    import torch
    import transformers
    import llama_cpp

    from dialogen.chat.messages import Message
    from dialogen.export import export_gguf
    from dialogen.training.scratch import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        texts = [[Message("user", p), Message("assistant", p[::-1])] for p in PROMPTS * 4]
        tok = train_tokenizer(texts, 400, "dialogpt")
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=tok.vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=128)
        hf = transformers.GPT2LMHeadModel(config).eval()
        with torch.no_grad():
            for p in hf.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.2)  # logits wide enough for differences to show
        hf.save_pretrained(Path(tmp) / "g")
        tok.save(Path(tmp) / "g")
        ids = tok.encode_text(PROMPTS[0]) + [tok.eos_id] + tok.encode_text(PROMPTS[1])
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0].numpy()
        for kind in ("f32", "f16", "q8_0"):
            path = Path(tmp) / f"gpt2-{kind}.gguf"
            export_gguf(str(Path(tmp) / "g"), path, kind, "dialogpt")
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=args.threads, verbose=False,
                                  logits_all=True)
            llm.eval(ids)
            got = np.array(llm.scores[: len(ids)])
            print(json.dumps({"gpt2": kind, "max_logit_diff_vs_transformers": round(float(np.abs(got - want).max()), 4),
                              "logit_scale": round(float(np.abs(want).max()), 2),
                              "same_argmax": f"{int((got.argmax(1) == want.argmax(1)).sum())}/{len(ids)}",
                              "same_tokens": llm.tokenize(PROMPTS[0].encode(), add_bos=False)
                              == tok.encode_text(PROMPTS[0])}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="the model to export (default: the embedded model)")
    ap.add_argument("--types", default="gpt2,shipped,f16,q8_0,q4_0",
                    help="comma-separated: f32, f16, q8_0, q4_0, gpt2 (a tiny GPT-2's exports against transformers), "
                         "and shipped (the default model's own Q4_1 file, not "
                         "exported: how far the two engines agree on a file neither wrote)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--verbose", action="store_true", help="print both replies of every prompt")
    args = ap.parse_args()
    import torch

    from dialogen.export import export_gguf

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.types.split(","):
            if kind == "gpt2":
                gpt2_check(args)
                continue
            if kind == "shipped":
                from dialogen.models.loading import default_model_path

                print(json.dumps({"type": "shipped Q4_1", "dialogen_dtype": "auto",
                                  **compare(default_model_path(), "auto", args)}, ensure_ascii=False), flush=True)
                continue
            path = Path(tmp) / f"export-{kind}.gguf"
            t = time.time()
            export_gguf(args.model, path, kind)
            took = time.time() - t
            # f16 weights are read as float32 (exact); block types stay blocks in both engines
            dtype = "float32" if kind == "f16" else "auto"
            result = {"type": kind, "dialogen_dtype": dtype, "export_s": round(took, 1), **compare(path, dtype, args)}
            print(json.dumps(result, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
