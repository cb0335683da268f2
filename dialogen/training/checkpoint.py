"""Run directories: checkpoints with the exact training state, written atomically.

A run directory holds
    last/            the latest checkpoint: a loadable model directory (config.json,
                     model.safetensors, tokenizer files, dialogen.json) plus
                     trainer_state.json (step, data order, options) and
                     trainer_state.pt (optimizer, scheduler, random generators)
    best/            the checkpoint with the lowest validation perplexity (model files only)
    metrics.jsonl    one JSON object per logged step and per validation
    metrics.png      loss and validation perplexity
Each checkpoint is written into a temporary directory beside its target and renamed over it,
so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from pathlib import Path

import torch

from ..errors import UserError
from ..models.loading import save_checkpoint
from ..paths import atomic_dir, atomic_file, write_text

STATE_JSON, STATE_PT = "trainer_state.json", "trainer_state.pt"


def check_output_dir(out: Path, resume: bool):
    """Fail before training if the run directory is unusable: not writable, or (without
    --resume) already holding a run, or (with --resume) holding none."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{out}: output directory is not writable ({e.strerror})") from None
    has_run = (out / "last" / STATE_JSON).exists()
    if resume and not has_run:
        raise UserError(f"{out}: nothing to resume (no last/{STATE_JSON}); drop --resume to start a new run")
    if not resume and has_run:
        raise UserError(f"{out}: already holds a run; pass --resume to continue it, or choose another --out")


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save(directory: Path, model, tokenizer, meta: dict, state: dict | None = None, torch_state: dict | None = None,
         adapter=None):
    """A model directory, with the training state beside the weights when given. With a LoRA
    `adapter`, the directory holds the adapter in PEFT's files instead of the model's weights
    (plus the tokenizer and dialogen.json), and names its base."""

    def write_state(tmp: Path):
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=1))
        torch.save(torch_state, tmp / STATE_PT)

    if adapter is None:
        save_checkpoint(Path(directory), model, tokenizer, meta, None if state is None else write_state)
        return

    def write_adapter(tmp: Path):
        adapter.write(tmp)
        tokenizer.save(tmp)
        (tmp / "dialogen.json").write_text(json.dumps(meta, indent=1))
        if state is not None:
            write_state(tmp)

    atomic_dir(Path(directory), write_adapter)


def load_state(directory: Path) -> tuple[dict, dict]:
    try:
        state = json.loads((directory / STATE_JSON).read_text())
        torch_state = torch.load(directory / STATE_PT, map_location="cpu", weights_only=False)
    except (OSError, json.JSONDecodeError, RuntimeError, EOFError) as e:
        raise UserError(f"{directory}: cannot read the training state ({e})") from None
    return state, torch_state


def restore(state: tuple[dict, dict], order: dict, optimizer, scheduler) -> tuple[int, float]:
    """Put a run's saved state (`load_state`) back: (its step, its best validation perplexity). Every
    value of `order` (what the data order and updates depend on) must equal the saved one."""
    saved, torch_state = state
    for key, value in order.items():
        if saved["order"].get(key) != value:
            raise UserError(f"cannot resume: {key} was {saved['order'].get(key)!r}, now {value!r} "
                            "(resume with the options of the original run)")
    optimizer.load_state_dict(torch_state["optimizer"])
    scheduler.load_state_dict(torch_state["scheduler"])
    set_rng_state(torch_state["rng"])
    return saved["step"], saved.get("best_val_ppl", math.inf)


def finite_weights(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class Metrics:
    """metrics.jsonl, appended line by line; on resume the lines after the resumed step go."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.exists():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            write_text(path, "".join(line + "\n" for line in keep))
        elif resume_step is None and path.exists():
            path.unlink()

    def log(self, record: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot(records: list[dict], path: Path) -> bool:
    """Loss per step and validation perplexity, as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_ppl"]) for r in records if "val_ppl" in r]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    if train:
        top.plot(*zip(*train), color="tab:blue", linewidth=1)
    top.set_ylabel("train loss (nats/token)")
    if val:
        bottom.plot(*zip(*val), "o-", color="tab:orange")
        bottom.set_yscale("log")
    bottom.set_ylabel("validation perplexity")
    bottom.set_xlabel("step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)
    return True
