"""`dialogen train --dpo`: direct preference optimisation of a LoRA adapter.

Each record's prompt + chosen and prompt + rejected are rendered by the chat template; the
assistant masks of the replies (only theirs, not the prompt's earlier assistant turns) select the
tokens whose log-probabilities sum to a reply's log-probability. The reference model is the base
without the adapter (the adapter's hooks switched off), so no second copy of the model exists.
Loss (the sigmoid form of Rafailov et al., as TRL's DPOTrainer computes it):
    z = (log pi(c) - log pi(r)) - (log ref(c) - log ref(r));   loss = -log sigmoid(beta z)
Rewards are beta (log pi - log ref) of each reply; held-out records (every tenth) report the
share whose chosen reward beats the rejected one (reward accuracy) and the mean margin.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..chat.templates import get_template
from ..data.batches import collate
from ..data.dataset import IGNORE_INDEX, Example, to_example
from ..data.preferences import Preference, read_preferences
from ..errors import UserError
from ..models import heap
from . import checkpoint as ckpt
from .options import TrainOptions
from .setup import build_lora, lora_order, make_optimizer, undo_on_failure


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """(mean loss, chosen rewards, rejected rewards) of per-pair sequence log-probabilities (B,)."""
    z = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    loss = -F.logsigmoid(beta * z).mean()
    return loss, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def sequence_logps(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) over each row's labelled tokens: (B,)."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # (B, T-1)
    h = model.hidden(ids[:, :-1])
    logp = torch.log_softmax(model.head(h[keep]).float(), dim=-1)  # (N, V): the family's scale and cap included
    picked = logp.gather(1, targets[keep][:, None])[:, 0]
    rows = torch.arange(ids.shape[0])[:, None].expand_as(keep)[keep]
    return torch.zeros(ids.shape[0], dtype=picked.dtype).index_add(0, rows, picked)


def encode(pref: Preference, template, tokenizer, max_len: int) -> tuple[Example, Example]:
    """The chosen and rejected conversations as examples whose labels are the reply's tokens only."""
    pair = []
    for reply in (pref.chosen, pref.rejected):
        msgs = pref.prompt + reply
        flags = [i >= len(pref.prompt) for i in range(len(msgs))]
        ids, mask = template.render(tokenizer, msgs, trained=flags)
        if len(ids) > max_len:
            raise UserError(f"{pref.where}: {len(ids)} tokens, more than --max-len {max_len}")
        pair.append(to_example(ids, mask))
    return pair[0], pair[1]


def _logps(model, adapter, examples: list[Example], pad_id: int, policy: bool) -> torch.Tensor:
    ids, labels = collate(examples, pad_id)
    adapter.enabled = policy
    try:
        return sequence_logps(model, ids, labels)
    finally:
        adapter.enabled = True


def pair_batch(model, adapter, pairs, pad_id: int, beta: float):
    """(loss, chosen rewards, rejected rewards) of a batch of (chosen, rejected) examples."""
    flat = [ex for pair in pairs for ex in pair]  # chosen and rejected alternate
    with torch.no_grad():
        ref = _logps(model, adapter, flat, pad_id, policy=False)
    pol = _logps(model, adapter, flat, pad_id, policy=True)
    return dpo_loss(pol[0::2], pol[1::2], ref[0::2], ref[1::2], beta)


def evaluate(model, adapter, pairs, pad_id: int, beta: float, batch_size: int) -> dict:
    if not pairs:
        return {}
    was = model.training
    model.eval()
    losses, chosen, rejected = [], [], []
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            loss, c, r = pair_batch(model, adapter, pairs[i:i + batch_size], pad_id, beta)
            losses.append(float(loss) * len(c))
            chosen.append(c)
            rejected.append(r)
    model.train(was)
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {"val_loss": sum(losses) / len(c), "val_reward_accuracy": float((c > r).float().mean()),
            "val_reward_margin": float((c - r).mean()), "val_pairs": len(c)}


def pair_order(n: int, batch_size: int, seed: int, total: int) -> list[list[int]]:
    """The training pairs of steps 1..total: each pass over the `n` pairs is shuffled by (seed,
    step), and a step's batch may run across two passes. A pure function, so a resumed run takes
    the batches the uninterrupted one would."""
    order, steps = [], []
    for step in range(1, total + 1):
        if len(order) < batch_size:
            idx = list(range(n))
            random.Random(seed * 1000003 + step).shuffle(idx)
            order += idx
        steps.append(order[:batch_size])
        order = order[batch_size:]
    return steps


def train_dpo(opts: TrainOptions, on_step=None) -> dict:
    """Run (or, with `opts.resume`, continue) a DPO run; returns a summary. `on_step(step, record,
    model)` is called after every optimizer step."""
    with heap.training():
        return _train_dpo(opts, on_step)


def _train_dpo(opts: TrainOptions, on_step) -> dict:
    out = Path(opts.out)
    with undo_on_failure(out):
        ckpt.check_output_dir(out, opts.resume)
        run = _prepare(opts)
    model, tok, adapter, held, train_pairs, total = run.model, run.tok, run.adapter, run.held, run.train, run.total
    step, metrics = run.step, ckpt.Metrics(out / "metrics.jsonl", run.step if opts.resume else None)
    evaluate_now = lambda: evaluate(model, adapter, held, tok.pad_id, opts.dpo_beta, opts.batch_size)  # noqa: E731
    if step == 0 and held:
        metrics.log({"step": 0, **evaluate_now()})
    batches, record = pair_order(len(train_pairs), opts.batch_size, opts.seed, total), {}
    while step < total:
        step += 1
        record = _step(run, [train_pairs[i] for i in batches[step - 1]], opts, step)
        if on_step is not None:
            on_step(step, record, model)
        metrics.log(record)
        if opts.eval_every and step % opts.eval_every == 0 and step < total and held:
            metrics.log({"step": step, **evaluate_now()})
        if opts.save_every and step % opts.save_every == 0 and step < total:
            _save_last(run, out, step)
    final = evaluate_now() if held else {}
    if final:
        metrics.log({"step": total, **final})
    _save_last(run, out, total)
    return {"steps": total, "loss": record.get("loss"), **final, "out": str(out)}


@dataclass
class Run:
    """A DPO run's model, data and optimizer state, as `_prepare` makes them."""

    model: torch.nn.Module
    tok: object
    adapter: torch.nn.Module  # what trains (models/lora.py), hooked into the model
    held: list  # held-out (chosen, rejected) example pairs
    train: list
    total: int
    optimizer: torch.optim.Optimizer
    scheduler: object
    order: dict  # what the batches and updates depend on; a resumed run must match it
    meta: dict  # dialogen.json of the checkpoints
    step: int  # the step the run continues from (0 for a new run)


def _prepare(opts: TrainOptions) -> Run:
    """Everything before the first step, every check included; on --resume, the state restored."""
    prefs = read_preferences(opts.data)
    model, tok, tname, state, adapter = build_lora(opts)
    template = get_template(tname, tok)
    pairs = [encode(p, template, tok, opts.max_len) for p in prefs]
    held = [p for i, p in enumerate(pairs) if len(pairs) >= 10 and i % 10 == 9]
    train_pairs = [p for i, p in enumerate(pairs) if not (len(pairs) >= 10 and i % 10 == 9)]
    total = opts.max_steps or max(1, math.ceil(opts.epochs * math.ceil(len(train_pairs) / opts.batch_size)))
    model.train()
    model.checkpointing = opts.gradient_checkpointing
    optimizer, scheduler = make_optimizer(adapter, opts, total)
    order = {"objective": "dpo", "dpo_beta": opts.dpo_beta, "seed": opts.seed, "batch_size": opts.batch_size,
             "pairs": len(train_pairs), "held_out": len(held), "total_steps": total,
             "lora": lora_order(opts, adapter)}
    step = ckpt.restore(state, order, optimizer, scheduler)[0] if state is not None else 0
    tok.chat_template = template.source
    meta = {"template": tname, **template.stop_meta(tok), "train": {"dpo": True, "beta": opts.dpo_beta,
                                                                       "pairs": len(train_pairs), "held_out": len(held)}}
    return Run(model, tok, adapter, held, train_pairs, total, optimizer, scheduler, order, meta, step)


def _step(run: Run, batch, opts: TrainOptions, step: int) -> dict:
    t0 = time.time()
    loss, c, r = pair_batch(run.model, run.adapter, batch, run.tok.pad_id, opts.dpo_beta)
    loss.backward()
    params = [p for p in run.adapter.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, opts.clip if opts.clip > 0 else float("inf")).item()
    if not math.isfinite(loss.item()) or not math.isfinite(norm):
        raise UserError(f"step {step}: the DPO loss or its gradient is not finite; try a lower --lr")
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {"step": step, "loss": loss.item(), "reward_accuracy": float((c > r).float().mean()),
            "reward_margin": float((c - r).mean()), "grad_norm": norm, "elapsed": round(time.time() - t0, 3)}


def _save_last(run: Run, out: Path, step: int):
    """last/: the adapter, and the state a resume continues from (step, optimizer, schedule, generators)."""
    state = {"step": step, "order": run.order}
    torch_state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                   "rng": ckpt.rng_state()}
    ckpt.save(out / "last", run.model, run.tok, {**run.meta, "step": step}, state, torch_state, run.adapter)
