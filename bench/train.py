"""Training throughput: our training step against transformers' own, side by side.

Both start from the same weights (the default SmolLM2-135M-Instruct: ours through our loader,
transformers' from the same converted directory), take the same batch (B x T tokens of chitchat
conversations, rendered with the model's template) and the same optimizer (AdamW, fused, as the
transformers Trainer's default), with gradient clipping. A step = forward, loss, backward, clip,
optimizer step. Steps alternate between the two so machine noise hits both alike; the first
steps are warm-up and not timed. Prints JSON: median and best (fastest step) tokens/s of each,
and ours / theirs for both; on a machine shared with other jobs the best step is the steadier
estimate, as other jobs can only add time to a step.

    python bench/train.py [--batch 2] [--seq 256] [--steps 10] [--labels chat|all]
    python bench/train.py --lora [--model PATH] [--rank 16] [--targets q_proj,...] [--batch 2] [--seq 256]
    python bench/train.py --lora --model FILE.Q4_0.gguf --base-dtype auto   # our base as the file's blocks
    python bench/train.py --lora --model FILE.Q4_0.gguf --base-dtype auto --compute-dtype bfloat16

`--labels chat` trains the assistant tokens only (what `dialogen train` does), `all` every token.
`--lora`: a LoRA step on a frozen base, ours (`models/lora.py`) against peft + transformers, on the same
base, batch, rank, alpha and targets. Each side runs in its own process (peak RSS is per process), one
after the other; prints each side's median and best step time, peak RSS (VmHWM) and the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch

from dialogen.chat.session import load_engine
from dialogen.data import load_split
from dialogen.data.dataset import IGNORE_INDEX, build_examples
from dialogen.models.loading import resolve
from dialogen.training.loss import LossModel


def batch(engine, B: int, T: int, labels: str):
    """B chitchat test examples of at least T tokens, cut to T: ids and labels (B, T)."""
    convs = load_split("chitchat", "test")
    examples, _ = build_examples(convs, engine.tokenizer, engine.template, T)
    long = [ex for ex in examples if len(ex.ids) >= T][:B]
    if len(long) < B:
        sys.exit(f"only {len(long)} examples of {T} tokens; lower --seq or --batch")
    ids = torch.tensor([ex.ids[:T] for ex in long])
    lab = ids.clone() if labels == "all" else torch.tensor([ex.labels[:T] for ex in long])
    return ids, lab


def ours_step(model, loss_model, opt, ids, labels):
    nll, n = loss_model(ids, labels)
    loss = nll / n
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def theirs_step(model, opt, ids, labels):
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


_held = contextlib.ExitStack()  # what stays in force until this process ends


def lora_side(side: str, model: str | None, data: str, rank: int, alpha: float, targets: list[str], steps: int,
              lr: float, base_dtype: str = "float32", peft_model_dir: str | None = None, checkpointing=False,
              compute_dtype: str = "float32", autocast: bool = False) -> dict:
    """Timed LoRA steps of one side in this process: {"times": [...], "rss_mb": ..., "first_loss": ...}."""
    ids, labels = torch.load(data)
    if side == "ours":
        from dialogen.models import heap

        _held.enter_context(heap.training())  # as `dialogen train` does, for the rest of this process
        from dialogen.models.loading import load
        from dialogen.models.lora import Adapter, LoraSettings

        base = load(model, base_dtype).model
        if base_dtype == "float32":
            base.materialize()
        else:  # the base keeps its blocks (`dialogen train --base-dtype`): no float32 copy
            from dialogen.models.quantized import set_compute_dtype

            base.frozen_blocks = True
            set_compute_dtype(base, getattr(torch, compute_dtype))
        base.requires_grad_(False).train()
        base.checkpointing = checkpointing
        adapter = Adapter(base.cfg, LoraSettings(rank, alpha, 0.0, tuple(targets))).init(0).attach(base)
        loss_model, params = LossModel(base, adapter), list(adapter.parameters())

        def loss_of():
            nll, n = loss_model(ids, labels)
            return nll / n
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(peft_model_dir or resolve(model)), dtype=torch.float32)
        if checkpointing:  # the input's gradient keeps the checkpointed blocks in the graph of a frozen base
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            hf.enable_input_require_grads()
        peft_model = get_peft_model(hf, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets))
        peft_model.train()
        params = [p for p in peft_model.parameters() if p.requires_grad]

        def loss_of():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return peft_model(input_ids=ids, labels=labels).loss
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), fused=True)
    times, first = [], None
    for i in range(steps + 2):
        t0 = time.perf_counter()
        loss = loss_of()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
        first = loss.item() if first is None else first
        print(f"step {i} {side}: {time.perf_counter() - t0:.2f}s loss {loss.item():.4f}", file=sys.stderr, flush=True)
    return {"times": times, "rss_mb": peak_rss_mb(), "first_loss": first}


def peak_rss_mb() -> float:
    """This process's peak RSS since its exec (VmHWM; ru_maxrss would carry the parent's over the fork)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def lora_main(args):
    import subprocess
    import tempfile

    engine = load_engine(args.model, "auto", torch.float32)
    ids, labels = batch(engine, args.batch, args.seq, args.labels)
    del engine
    data = tempfile.NamedTemporaryFile(suffix=".pt", delete=False).name
    torch.save((ids, labels), data)
    out = {}
    for side in ("ours", "peft"):
        cmd = [sys.executable, __file__, "--lora-side", side, "--data", data, "--rank", str(args.rank),
               "--alpha", str(args.alpha), "--targets", args.targets, "--steps", str(args.steps), "--lr", str(args.lr),
               "--base-dtype", args.base_dtype, "--compute-dtype", args.compute_dtype]
        if args.model:
            cmd += ["--model", args.model]
        if args.peft_model:
            cmd += ["--peft-model", args.peft_model]
        if args.gradient_checkpointing:
            cmd += ["--gradient-checkpointing"]
        if args.peft_autocast:
            cmd += ["--peft-autocast"]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        out[side] = json.loads(r.stdout.strip().splitlines()[-1])
    med = {k: statistics.median(v["times"]) for k, v in out.items()}
    best = {k: min(v["times"]) for k, v in out.items()}
    print(json.dumps({
        "model": args.model or "SmolLM2-135M-Instruct", "base_dtype": args.base_dtype,
        "compute_dtype": args.compute_dtype, "peft_autocast": args.peft_autocast,
        "gradient_checkpointing": args.gradient_checkpointing, "batch": args.batch,
        "seq": args.seq, "rank": args.rank,
        "alpha": args.alpha, "targets": args.targets, "threads": torch.get_num_threads(),
        "first_step_loss": {k: round(v["first_loss"], 5) for k, v in out.items()},
        "step_s_median": {k: round(v, 3) for k, v in med.items()}, "step_s_best": {k: round(v, 3) for k, v in best.items()},
        "speedup_median": round(med["peft"] / med["ours"], 3), "speedup_best": round(best["peft"] / best["ours"], 3),
        "peak_rss_mb": {k: round(v["rss_mb"], 1) for k, v in out.items()},
        "rss_ratio": round(out["ours"]["rss_mb"] / out["peft"]["rss_mb"], 3),
    }))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="timed steps of each (plus 2 warm-up)")
    ap.add_argument("--labels", choices=["chat", "all"], default="chat")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--lora", action="store_true", help="LoRA steps, ours against peft + transformers")
    ap.add_argument("--model", default=None, help="--lora: the base (default: the embedded model)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--base-dtype", default="float32", choices=["float32", "auto", "int8", "int4"],
                    help="--lora: our frozen base's weights (auto: a GGUF file's own blocks); peft's stays float32")
    ap.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="--lora with a blocked base: our products' dtype (`dialogen train --compute-dtype`)")
    ap.add_argument("--peft-autocast", action="store_true",
                    help="--lora: peft's step under torch.autocast to bfloat16 (the Trainer's bf16=True on a CPU)")
    ap.add_argument("--peft-model", help="--lora: a Hugging Face directory of the same shape for peft's side, for a "
                                         "GGUF file that has none (default: the --model file converted)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="--lora: both sides recompute each block's activations in the backward pass")
    ap.add_argument("--lora-side", choices=["ours", "peft"], help=argparse.SUPPRESS)  # one side's process
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.lora_side:
        print(json.dumps(lora_side(args.lora_side, args.model, args.data, args.rank, args.alpha,
                                   args.targets.split(","), args.steps, args.lr, args.base_dtype,
                                   args.peft_model, args.gradient_checkpointing, args.compute_dtype,
                                   args.peft_autocast)))
        return
    if args.lora:
        lora_main(args)
        return

    from transformers import AutoModelForCausalLM

    engine = load_engine(None, "auto", torch.float32)
    ours = engine.model.train()
    theirs = AutoModelForCausalLM.from_pretrained(str(resolve(None)), dtype=torch.float32).train()
    ids, labels = batch(engine, args.batch, args.seq, args.labels)
    loss_model = LossModel(ours)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=args.lr, betas=(0.9, 0.95), fused=True)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=args.lr, betas=(0.9, 0.95), fused=True)

    tokens = ids.numel()
    times = {"ours": [], "transformers": []}
    first = {}
    for i in range(args.steps + 2):
        for name in ("ours", "transformers"):
            t0 = time.perf_counter()
            if name == "ours":
                loss = ours_step(ours, loss_model, opt_ours, ids, labels)
            else:
                loss = theirs_step(theirs, opt_theirs, ids, labels)
            dt = time.perf_counter() - t0
            first.setdefault(name, loss)
            if i >= 2:
                times[name].append(dt)
            print(f"step {i} {name}: {dt:.2f}s loss {loss:.4f}", file=sys.stderr, flush=True)
    med = {k: tokens / statistics.median(v) for k, v in times.items()}
    best = {k: tokens / min(v) for k, v in times.items()}
    print(json.dumps({
        "model": "SmolLM2-135M-Instruct fp32", "batch": args.batch, "seq": args.seq, "labels": args.labels,
        "trained_tokens_per_step": int((labels[:, 1:] != IGNORE_INDEX).sum()), "threads": torch.get_num_threads(),
        "first_step_loss": {k: round(v, 5) for k, v in first.items()},
        "ours_tok_s_median": round(med["ours"], 1), "transformers_tok_s_median": round(med["transformers"], 1),
        "ratio": round(med["ours"] / med["transformers"], 3),
        "ours_tok_s_best": round(best["ours"], 1), "transformers_tok_s_best": round(best["transformers"], 1),
        "ratio_best": round(best["ours"] / best["transformers"], 3),
    }))


if __name__ == "__main__":
    main()
