"""What the training loop starts from: options, the model (scratch, pretrained or resumed),
frozen parts, and AdamW with a warmup + cosine schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ..chat.templates import TEMPLATES, default_template_name
from ..data.dataset import TRAIN_ON
from ..errors import UserError
from ..models.loading import atomic_dir, load
from ..models.tokenizer import Tokenizer
from ..models.transformer import Transformer
from . import checkpoint as ckpt
from .scratch import gpt2_config, train_tokenizer


@dataclass
class TrainOptions:
    out: str
    data: str = "chitchat"
    format: str | None = None
    skip_bad: bool = False
    split_seed: int = 0
    init: str = "default"  # "scratch", "default" or a model path
    template: str = "auto"
    train_on: str = "assistant"
    reverse: bool = False
    max_len: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    pack: bool = False
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    clip: float = 1.0
    max_steps: int = 0  # 0: from --epochs
    epochs: float = 1.0
    max_minutes: float = 0.0  # 0: no time budget
    eval_every: int = 100
    save_every: int = 100
    val_conversations: int = 200
    seed: int = 0
    freeze_embeddings: bool = False
    freeze_layers: int = 0
    resume: bool = False
    progress: bool = True
    # --init scratch: a GPT-2-style model and its BPE vocabulary
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    vocab_size: int = 8000
    # --arch rnn: an encoder-decoder with attention (flags in training/rnn_train.py)
    arch: str = "transformer"
    rnn_cell: str = "gru"
    rnn_attention: str = "general"
    rnn_emb_dim: int = 256
    rnn_hidden: int = 256
    rnn_layers: int = 1
    rnn_dropout: float = 0.1
    rnn_bidirectional: bool = True
    rnn_input_feeding: bool = True
    context_turns: int = 3

    def __post_init__(self):
        positive = ("max_len", "batch_size", "grad_accum", "n_layer", "n_head", "d_model")
        for f in fields(self):
            v = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if f.name in positive and v < 1:
                raise UserError(f"{flag} must be >= 1, got {v}")
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                raise UserError(f"{flag} must be >= 0, got {v}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        if self.train_on not in TRAIN_ON:
            raise UserError(f"--train-on must be one of {', '.join(TRAIN_ON)}, got {self.train_on!r}")
        if self.template != "auto" and self.template not in TEMPLATES:
            raise UserError(f"unknown --template {self.template!r}; known: auto, {', '.join(TEMPLATES)}")
        if self.vocab_size < 300:
            raise UserError(f"--vocab-size must be >= 300 (256 bytes + merges), got {self.vocab_size}")
        if not self.min_lr_ratio <= 1:
            raise UserError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")


def build_model(opts: TrainOptions, d, train_convs):
    """(model, tokenizer, template name, saved training state or None)."""
    from .rnn_train import build_rnn, wants_rnn

    if wants_rnn(opts):
        return build_rnn(opts, d, train_convs)
    state = None
    if opts.resume:
        last = Path(opts.out) / "last"
        loaded = load(str(last), torch.float32)
        model, tok, tname = loaded.model, loaded.tokenizer, loaded.meta.get("template", "chatml")
        state = ckpt.load_state(last)
    elif opts.init == "scratch":
        tname = "dialogpt" if opts.template == "auto" else opts.template
        tok = scratch_tokenizer(opts, d, train_convs, tname)
        cfg = gpt2_config(tok.vocab_size, opts.n_layer, opts.n_head, opts.d_model, opts.max_len)
        model = Transformer(cfg)
        model.init_weights(opts.seed)
    else:
        loaded = load(None if opts.init == "default" else opts.init, torch.float32)
        model, tok = loaded.model, loaded.tokenizer
        if not isinstance(model, Transformer):
            raise UserError(f"{opts.init}: dialogen train fine-tunes transformer models (llama, gpt2 families)")
        tname = opts.template
        if tname == "auto":
            tname = default_template_name(loaded.meta, tok, model.cfg.arch)
    if opts.max_len > model.cfg.max_seq_len:
        raise UserError(f"--max-len {opts.max_len} exceeds the model's context of {model.cfg.max_seq_len} tokens")
    freeze(model, opts.freeze_embeddings, opts.freeze_layers)
    return model, tok, tname, state


def scratch_tokenizer(opts: TrainOptions, d, train_convs, tname: str) -> Tokenizer:
    """Rank 0 trains the BPE vocabulary and writes it to the run dir; every rank reads it."""
    where = Path(opts.out) / "tokenizer"
    if d.main:
        tok = train_tokenizer(train_convs, opts.vocab_size, tname)
        atomic_dir(where, tok.save)
    d.barrier()
    return Tokenizer.from_dir(where)


def freeze(model: Transformer, embeddings: bool, layers: int):
    """Stop gradients to the embeddings (and a head tied to them) and the first `layers` blocks."""
    if layers > model.cfg.n_layer:
        raise UserError(f"--freeze-layers {layers} exceeds the model's {model.cfg.n_layer} layers")
    if embeddings:
        model.embed.weight.requires_grad_(False)
        if hasattr(model, "pos_embed"):
            model.pos_embed.weight.requires_grad_(False)
    for block in list(model.blocks)[:layers]:
        block.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("everything is frozen: nothing would train (lower --freeze-layers)")


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate after `step` optimizer steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: Transformer, opts: TrainOptions, total: int):
    """AdamW (weight decay on matrices only) and its LambdaLR schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": opts.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=opts.lr, betas=(0.9, 0.95), fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, opts.warmup_steps, total, opts.min_lr_ratio))
    return optimizer, scheduler
