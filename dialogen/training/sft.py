"""The training loop: role-masked fine-tuning and from-scratch pre-training, DDP-aware.

`train(opts)` reads top to bottom: check the run directory, load the data split, build or load
the model, render the examples, then a plain `for step in ...` loop. Each step takes this
rank's micro-batches of the global batch, sums their token losses and divides by the trained
tokens of the whole global batch (all ranks, all micro-batches), so the gradient does not depend
on how the batch is split over processes or accumulation steps. Then clip, AdamW, schedule.

The data order is a pure function of (seed, epoch): step k always uses micro-batches
k*G .. k*G+G-1 of the endless epoch-by-epoch stream (G = grad_accum x world size), so a resumed
run continues exactly where the checkpoint left off.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..chat.templates import get_template
from ..data import load_split
from ..data.batches import bucket_batches, collate, collate_segments, pack
from ..data.dataset import IGNORE_INDEX, build_examples
from ..decoding.reverse import REVERSE_CONTEXT_TURNS
from ..errors import UserError
from ..eval.perplexity import examples_perplexity
from ..models import heap
from ..models.transformer import Transformer
from . import checkpoint as ckpt
from .distributed import Dist, setup, teardown
from .loss import LossModel
from .options import TrainOptions
from .setup import build_model, lora_order, make_optimizer, undo_on_failure


@dataclass
class Plan:
    """Which examples form micro-batch g of the stream."""

    lengths: list[int]
    batch_size: int
    seed: int
    _epoch: int = -1
    _batches: list | None = None

    @property
    def per_epoch(self) -> int:
        return len(bucket_batches(self.lengths, self.batch_size, self.seed, 0))

    def batch(self, g: int) -> list[int]:
        epoch, i = divmod(g, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, bucket_batches(self.lengths, self.batch_size, self.seed, epoch)
        return self._batches[i]


class DivergedError(UserError):
    """The loss or gradient stopped being a finite number."""


def train(opts: TrainOptions, on_step=None) -> dict:
    """Run (or resume) training; returns a summary. `on_step(step, record, model)` is called
    after every optimizer step, with the gradients of that step still on the parameters."""
    began = time.time()  # --max-minutes counts from here: data and model preparation included
    d = setup()
    try:
        with heap.training():
            return _train(opts, d, on_step, began)
    finally:
        teardown(d)


def _train(opts: TrainOptions, d: Dist, on_step, began: float) -> dict:
    out = Path(opts.out)
    with undo_on_failure(out, d.main):  # a run that fails its checks leaves --out as it found it
        ckpt.check_output_dir(out, opts.resume)
        loop, step = _prepare(opts, d, out, began)
    return loop.run(step, on_step)


def _prepare(opts: TrainOptions, d: Dist, out: Path, began: float):
    """Everything before the first step, every check included: (the loop, the step it starts at)."""
    train_convs = load_split(opts.data, "train", opts.format, opts.split_seed, opts.skip_bad)
    valid_convs = load_split(opts.data, "valid", opts.format, opts.split_seed, opts.skip_bad)[: opts.val_conversations]
    if not train_convs:
        raise UserError(f"{opts.data}: the training split is empty (too few conversations)")
    model, tokenizer, tname, state, adapter = build_model(opts, d, train_convs)
    template = get_template(tname, tokenizer)
    examples, stats = build_examples(train_convs, tokenizer, template, opts.max_len, opts.train_on, opts.reverse)
    check_trainable(opts, stats)
    if opts.pack:
        if not isinstance(model, Transformer):
            raise UserError("--pack joins examples for transformer models (an encoder-decoder takes them one by one)")
        examples = pack(examples, opts.max_len, opts.seed)
    valid, _ = build_examples(valid_convs, tokenizer, template, opts.max_len, "assistant", opts.reverse)
    plan = Plan([len(ex.ids) for ex in examples], opts.batch_size, opts.seed)
    G = opts.grad_accum * d.world
    total = opts.max_steps or max(1, math.ceil(opts.epochs * plan.per_epoch / G))
    order = {"seed": opts.seed, "batch_size": opts.batch_size, "global_micro_batches": G, "pack": opts.pack,
             "examples": len(examples), "tokens": sum(len(ex.ids) for ex in examples), "total_steps": total}
    if adapter is not None:
        order["lora"] = lora_order(opts, adapter)
        adapter.to(d.device)
    model.to(d.device).train()
    if opts.gradient_checkpointing:
        if not isinstance(model, Transformer):
            raise UserError("--gradient-checkpointing applies to transformer models")
        model.checkpointing = True
    optimizer, scheduler = make_optimizer(adapter or model, opts, total)
    step, best = 0, math.inf
    if state is not None:
        step, best = ckpt.restore(state, order, optimizer, scheduler)
    tokenizer.chat_template = template.source  # checkpoints carry the template they were trained with
    meta = {"template": tname, **template.stop_meta(tokenizer), "train": {**_public(opts), "data_stats": stats.to_dict()}}
    if opts.reverse:
        meta["reverse"] = {"context_turns": REVERSE_CONTEXT_TURNS}
    loop = Loop(opts, d, model, tokenizer, meta, optimizer, scheduler, plan, examples, valid, order, total, best, began,
                adapter)
    if d.main:
        print(f"dialogen: {stats.conversations} conversations -> {len(examples)} examples, "
              f"{stats.trained_tokens} trained tokens of {stats.tokens}; {total} steps of {G} x {opts.batch_size}",
              flush=True)
    return loop, step


def check_trainable(opts: TrainOptions, stats):
    """Refuse a training split that would train nothing, or only turns cut short."""
    if stats.trained_tokens == 0:
        hint = "" if opts.train_on == "both" else " (no assistant turns? try --train-on both)"
        if stats.trained_turns:  # there were turns to train: none survived the windows
            hint = f" (--max-len {opts.max_len} is too small for one turn)"
        raise UserError(f"{opts.data}: no trainable tokens in the training split{hint}")
    if stats.truncated == stats.windows:
        raise UserError(f"--max-len {opts.max_len} is too small for one turn: all {stats.windows} examples of the "
                        "training split are cut inside a turn, so no reply would be learnt to its end")


def _public(opts: TrainOptions) -> dict:
    return {k: v for k, v in asdict(opts).items() if k not in ("resume", "progress")}


@dataclass
class Loop:
    opts: TrainOptions
    d: Dist
    model: torch.nn.Module
    tokenizer: object
    meta: dict  # dialogen.json of the checkpoints
    optimizer: torch.optim.Optimizer
    scheduler: object
    plan: Plan
    examples: list
    valid: list
    order: dict  # what the data order depends on; a resumed run must match it
    total: int
    best: float = math.inf
    began: float = 0.0
    adapter: torch.nn.Module | None = None  # with --lora-r: what trains and what checkpoints hold

    def __post_init__(self):
        self.out = Path(self.opts.out)
        self.loss_model = LossModel(self.model, self.adapter)
        if self.d.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.d.device] if self.d.device.type == "cuda" else None
            self.loss_model = DistributedDataParallel(self.loss_model, device_ids=ids)
        self.params = [p for p in (self.adapter or self.model).parameters() if p.requires_grad]

    def run(self, step: int, on_step) -> dict:
        opts, d = self.opts, self.d
        metrics = ckpt.Metrics(self.out / "metrics.jsonl", step if opts.resume else None) if d.main else None
        if step == 0 and opts.eval_every and d.main:
            self.validate(0, metrics)
        bar = _progress(self.total, step, d.main and opts.progress)
        start, last_saved, stopped = time.time(), step, "steps"
        record = {}
        while step < self.total:
            record = self.step(step)
            step += 1
            record.update(step=step, elapsed=round(time.time() - start, 3))
            if on_step is not None:
                on_step(step, record, self.model)
            self.optimizer.zero_grad(set_to_none=True)
            if d.main:
                metrics.log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tok_s']:.0f}")
                if opts.eval_every and step % opts.eval_every == 0:
                    self.validate(step, metrics)
            if opts.max_minutes and self.out_of_time():
                stopped = "time budget"
                break
            if opts.save_every and step % opts.save_every == 0 and step < self.total:
                self.save_last(step)
                last_saved = step
        bar.close()
        if opts.eval_every and d.main and step % opts.eval_every:  # the end, when not just validated
            self.validate(step, metrics)
        if step != last_saved or step == self.total:
            self.save_last(step)
        if d.main and not ckpt.plot(metrics.read(), self.out / "metrics.png"):
            print("dialogen: no metrics.png without matplotlib: pip install 'dialogen[train]'", file=sys.stderr)
        return {"steps": step, "stopped_by": stopped, "loss": record.get("loss"), "best_val_ppl": self.best,
                "out": str(self.out), "rank": d.rank}

    def out_of_time(self) -> bool:
        over = time.time() - self.began > self.opts.max_minutes * 60
        return self.d.sum(torch.tensor(float(over))).item() > 0  # every rank stops at the same step

    def step(self, step: int) -> dict:
        """One optimizer step over this rank's micro-batches; the loss is the global mean."""
        opts, d = self.opts, self.d
        G = opts.grad_accum * d.world
        rows = [[self.examples[i] for i in self.plan.batch(step * G + j * d.world + d.rank)] for j in range(opts.grad_accum)]
        micro = [(*collate(r, self.tokenizer.pad_id), collate_segments(r)) for r in rows]
        local = sum(int((labels[:, 1:] != IGNORE_INDEX).sum()) for _, labels, _ in micro)
        trained = self.d.sum(torch.tensor(float(local), dtype=torch.float64)).item()
        t0 = time.time()
        loss_sum = torch.zeros((), dtype=torch.float64)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda" else nullcontext()
        for j, (ids, labels, segments) in enumerate(micro):
            sync = nullcontext() if d.world == 1 or j == len(micro) - 1 else self.loss_model.no_sync()
            with sync, amp:
                nll, _ = self.loss_model(ids.to(d.device), labels.to(d.device),
                                         None if segments is None else segments.to(d.device))
                (nll * d.world / max(trained, 1)).backward()
            loss_sum += nll.detach().double().cpu()
        loss = (self.d.sum(loss_sum) / max(trained, 1)).item()
        if not math.isfinite(loss):
            self._diverged(step + 1, f"loss is {loss}")
        norm = torch.nn.utils.clip_grad_norm_(self.params, opts.clip if opts.clip > 0 else float("inf")).item()
        if not math.isfinite(norm):
            self._diverged(step + 1, f"gradient norm is {norm}")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        tokens = sum(int(ids.numel()) for ids, _, _ in micro) * d.world  # incl. padding: work done
        dt = max(time.time() - t0, 1e-9)
        return {"loss": loss, "lr": lr, "grad_norm": norm, "trained_tokens": int(trained), "tok_s": tokens / dt}

    def _diverged(self, step: int, what: str):
        last = self.out / "last"
        kept = f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint was written"
        raise DivergedError(f"step {step}: {what}; training stopped ({kept}); try a lower --lr")

    def validate(self, step: int, metrics):
        if not self.valid:
            return
        r = examples_perplexity(self.model, self.valid, self.tokenizer.pad_id, batch_size=self.opts.batch_size)
        metrics.log({"step": step, "val_ppl": r["ppl"], "val_nll": r["nll"], "val_tokens": r["tokens"]})
        if step > 0 and r["ppl"] < self.best:
            self.best = r["ppl"]
            meta = {**self.meta, "step": step, "val_ppl": r["ppl"]}
            ckpt.save(self.out / "best", self.model, self.tokenizer, meta, adapter=self.adapter)

    def save_last(self, step: int):
        if not ckpt.finite_weights(self.adapter or self.model):  # every rank holds the same weights: all stop
            self._diverged(step, "the weights are not finite")
        if not self.d.main:
            return
        state = {"step": step, "order": self.order, "best_val_ppl": self.best}
        torch_state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                       "rng": ckpt.rng_state()}
        meta = {**self.meta, "step": step}
        ckpt.save(self.out / "last", self.model, self.tokenizer, meta, state, torch_state, self.adapter)


def _progress(total: int, initial: int, enabled: bool):
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, smoothing=0.1)
