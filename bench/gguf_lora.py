"""Does llama.cpp run what `dialogen export --gguf-lora` writes? The default model (or --model) is
exported as f16 GGUF, the base; a LoRA adapter on it (--adapter DIR, or a seeded random one on every
projection) is written as a GGUF LoRA, and merged into the base (`export --merge DIR`, then
`export --gguf`). The same chat prompts (dialogen's rendering) are decoded greedily by:

  dialogen     the f16 base with the PEFT adapter directory
  lora         llama-server -m base.gguf --lora adapter.gguf
  merged       llama-server -m merged.gguf

Printed: for each llama.cpp run, the prompts whose greedy tokens equal dialogen's and the mean
common prefix; and how many prompts the adapter changes (dialogen without it), so the agreement
is about the adapter. A tiny random GPT-2 with a random adapter is also run in llama-cpp-python
(base + GGUF LoRA) and its logits compared with dialogen's (`--gpt2-only`: just that). With
--converter, llama.cpp's own convert_lora_to_gguf.py also converts the adapter (against the base as
a Hugging Face directory) and its tensors are compared with ours.

    .venv/bin/python bench/gguf_lora.py --threads 2 --tokens 48      # after `make bench-peers`
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from gguf_llamacpp import PROMPTS, common_prefix, ours_greedy

BIN = Path(sys.executable).parent


def random_adapter(base: Path, out: Path, r: int, scale: float, seed: int) -> Path:
    """A PEFT adapter on `base`, every projection adapted, A as PEFT initialises it and B ~ N(0, scale)."""
    import torch

    from dialogen.models.loading import model_config
    from dialogen.models.lora import Adapter, LoraSettings, default_targets

    cfg = model_config(str(base))
    adapter = Adapter(cfg, LoraSettings(r, 2.0 * r, 0.0, default_targets(cfg)), str(base.resolve())).init(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for part in adapter.parts.values():
            part.B.copy_(torch.randn(part.B.shape, generator=g) * scale)
    out.mkdir()
    adapter.write(out)
    return out


def on_base(adapter: Path, base: Path, out: Path) -> Path:
    """A copy of the adapter directory that names `base` as its base (the f16 export of the model it
    was trained on)."""
    shutil.copytree(adapter, out)
    conf = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**conf, "base_model_name_or_path": str(base.resolve())}))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server_greedy(args, model: Path, lora: Path | None, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy tokens of llama-server (its own process) for each prompt, given as token ids."""
    port = _free_port()
    cmd = [args.llama_server, "-m", str(model), "-t", str(args.threads), "-tb", str(args.threads), "-c", "2048",
           "-np", "1", "--host", "127.0.0.1", "--port", str(port), *(["--lora", str(lora)] if lora else [])]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError("llama-server did not start:\n" + log.read().decode(errors="replace")[-3000:])
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        outs = []
        for ids in prompts:
            body = {"prompt": ids, "n_predict": args.tokens, "temperature": 0, "top_k": 1, "repeat_penalty": 1.0,
                    "cache_prompt": False, "return_tokens": True}
            req = urllib.request.Request(url + "/completion", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as r:
                outs.append(json.loads(r.read())["tokens"])
        return outs
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def agreement(ours: list[list[int]], theirs: list[list[int]], stops: set[int]) -> dict:
    """Prompts with equal greedy tokens (llama.cpp's end-of-generation token is left out) and the mean
    common prefix."""
    theirs = [[t for t in b if t not in stops] for b in theirs]
    same = sum(a == b for a, b in zip(ours, theirs))
    prefix = [common_prefix(a, b) for a, b in zip(ours, theirs)]
    return {"identical": f"{same}/{len(ours)}", "common_prefix_mean": round(sum(prefix) / len(prefix), 1)}


def converter_check(args, base_gguf: Path, adapter: Path, ours: Path, tmp: Path) -> dict:
    """llama.cpp's convert_lora_to_gguf.py on the same adapter (the base as a Hugging Face directory,
    which names the same tensors): the largest difference between its tensors and ours."""
    import gguf
    import numpy as np

    from dialogen.models.loading import resolve

    theirs = tmp / "converter.gguf"
    cmd = [args.converter_python, args.converter, "--base", str(resolve(str(base_gguf))), "--outtype", "f32",
           "--outfile", str(theirs), str(adapter)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        return {"converter": "failed", "stderr": run.stderr[-800:]}
    a, b = gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(theirs))
    ta, tb = {t.name: t.data for t in a.tensors}, {t.name: t.data for t in b.tensors}
    diff = max(float(np.abs(np.asarray(ta[n], np.float64) - np.asarray(tb[n], np.float64)).max()) for n in ta if n in tb)
    alpha = [r.fields["adapter.lora.alpha"].contents() for r in (a, b)]
    return {"converter_same_names": sorted(ta) == sorted(tb), "converter_max_diff": diff,
            "converter_alpha": alpha}


def gpt2_check(args) -> dict:
    """A tiny random GPT-2 (scratch byte-level BPE) with a random adapter on its fused c_attn and its
    other projections, in llama-cpp-python (base f32 + the GGUF LoRA f32): logits against dialogen's
    with the PEFT directory, beside the two engines' difference on the base alone (the default model
    is a llama; this covers the gpt2 layout)."""
    import llama_cpp
    import numpy as np
    import torch
    import transformers

    from dialogen.chat.messages import Message
    from dialogen.export import export_gguf, export_gguf_lora
    from dialogen.models.loading import load
    from dialogen.training.scratch import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = train_tokenizer([[Message("user", p), Message("assistant", p[::-1])] for p in PROMPTS * 4], 400, "dialogpt")
        torch.manual_seed(0)
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=tok.vocab_size, n_embd=64, n_layer=2,
                                                                  n_head=4, n_positions=128))
        with torch.no_grad():
            for p in hf.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.2)  # logits wide enough for differences to show
        hf.save_pretrained(tmp / "g")
        tok.save(tmp / "g")
        export_gguf(str(tmp / "g"), tmp / "g.gguf", "f32", "dialogpt")
        adapter = random_adapter(tmp / "g.gguf", tmp / "adapter", 4, 0.2, args.seed)
        export_gguf_lora(str(tmp / "g.gguf"), tmp / "lora.gguf", str(adapter), "f32")
        ids = tok.encode_text(PROMPTS[0]) + [tok.eos_id] + tok.encode_text(PROMPTS[1])
        with torch.no_grad():
            want = load(str(tmp / "g.gguf"), "float32", adapter=str(adapter)).model(torch.tensor([ids]))[0].numpy()
            plain = load(str(tmp / "g.gguf"), "float32").model(torch.tensor([ids]))[0].numpy()
        scores = []
        for lora in (None, tmp / "lora.gguf"):
            llm = llama_cpp.Llama(model_path=str(tmp / "g.gguf"), lora_path=lora and str(lora), n_ctx=128,
                                  n_threads=args.threads, verbose=False, logits_all=True)
            llm.eval(ids)
            scores.append(np.array(llm.scores[: len(ids)]))
            del llm
        base, got = scores
        return {"gpt2_lora_max_logit_diff": round(float(np.abs(got - want).max()), 5),
                "gpt2_base_max_logit_diff": round(float(np.abs(base - plain).max()), 5),
                "gpt2_adapter_effect": round(float(np.abs(plain - want).max()), 3),
                "gpt2_same_argmax": f"{int((got.argmax(1) == want.argmax(1)).sum())}/{len(ids)}"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="the base (default: the embedded model), exported as f16")
    ap.add_argument("--adapter", default=None, help="a LoRA adapter of that model (default: a seeded random one)")
    ap.add_argument("--r", type=int, default=8, help="the random adapter's rank")
    ap.add_argument("--scale", type=float, default=0.03, help="the random adapter's B: N(0, scale)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora-type", default="f16", choices=("f32", "f16"), help="how the GGUF LoRA stores A and B")
    ap.add_argument("--dtype", default="float32", help="dialogen's weights for the f16 base (float32: exact)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=48, help="greedy tokens per prompt")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--llama-server", default=str(BIN / "llama-server"))
    ap.add_argument("--converter", default=None, help="llama.cpp's convert_lora_to_gguf.py, to compare with")
    ap.add_argument("--converter-python", default=str(BIN.parent.parent / ".venv-convert/bin/python"))
    ap.add_argument("--verbose", action="store_true", help="print the replies")
    ap.add_argument("--gpt2-only", action="store_true", help="only the tiny GPT-2's logits in llama-cpp-python")
    args = ap.parse_args()
    if args.gpt2_only:
        print(json.dumps(gpt2_check(args)), flush=True)
        return
    import torch

    import dialogen
    from dialogen.api import as_messages
    from dialogen.export import export_gguf, export_gguf_lora, export_merged

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = tmp / "base-f16.gguf"
        export_gguf(args.model, base, "f16")
        adapter = on_base(Path(args.adapter), base, tmp / "adapter") if args.adapter else \
            random_adapter(base, tmp / "adapter", args.r, args.scale, args.seed)
        lora = tmp / "adapter.gguf"
        t = time.time()
        info = export_gguf_lora(str(base), lora, str(adapter), args.lora_type)
        lora_s = time.time() - t
        export_merged(str(base), tmp / "merged", str(adapter))
        merged = tmp / "merged-f16.gguf"
        export_gguf(str(tmp / "merged"), merged, "f16")

        chat = dialogen.load(str(base), dtype=args.dtype, adapter=str(adapter))
        plain = dialogen.load(str(base), dtype=args.dtype)
        eng = chat.engine
        stops = eng.template.stop_ids(eng.tokenizer)
        prompts = [eng.template.render(eng.tokenizer, as_messages(p), add_generation_prompt=True)[0]
                   for p in PROMPTS[: args.prompts]]
        ours = [ours_greedy(chat, ids, args.tokens) for ids in prompts]
        without = [ours_greedy(plain, ids, args.tokens) for ids in prompts]
        del chat, plain
        eos = stops | {eng.tokenizer.eos_id}
        runs = {"lora": llama_server_greedy(args, base, lora, prompts),
                "merged": llama_server_greedy(args, merged, None, prompts)}
        result = {"base": "f16 export of " + (args.model or "the default model"),
                  "adapter": args.adapter or f"random r={args.r} B~N(0,{args.scale}) seed {args.seed}",
                  "lora_file": {k: info[k] for k in ("type", "r", "alpha", "tensors", "bytes")},
                  "lora_export_s": round(lora_s, 2), "dialogen_dtype": args.dtype, "tokens": args.tokens,
                  "adapter_changes_prompts": f"{sum(a != b for a, b in zip(ours, without))}/{len(ours)}",
                  **{f"{k}_vs_dialogen": agreement(ours, v, eos) for k, v in runs.items()},
                  "lora_vs_merged": agreement(runs["merged"], runs["lora"], set())}
        result.update(gpt2_check(args))
        if args.converter:
            export_gguf_lora(str(base), tmp / "adapter-f32.gguf", str(adapter), "f32")
            result.update(converter_check(args, base, adapter, tmp / "adapter-f32.gguf", tmp))
        if args.verbose:
            for p, a, b, c in zip(PROMPTS, ours, runs["lora"], runs["merged"]):
                print(json.dumps({"prompt": p, "dialogen": eng.tokenizer.decode(a),
                                  "llama.cpp lora": eng.tokenizer.decode([t for t in b if t not in eos]),
                                  "llama.cpp merged": eng.tokenizer.decode([t for t in c if t not in eos])}),
                      file=sys.stderr)
        print(json.dumps(result, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
