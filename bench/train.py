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

`--labels chat` trains the assistant tokens only (what `dialogen train` does), `all` every token.
"""

from __future__ import annotations

import argparse
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="timed steps of each (plus 2 warm-up)")
    ap.add_argument("--labels", choices=["chat", "all"], default="chat")
    ap.add_argument("--lr", type=float, default=1e-5)
    args = ap.parse_args()

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
