"""The options of `dialogen train`, validated (errors name the flag). Torch-free, so that
building the command line (`dialogen --help`) does not load torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ..chat.templates import TEMPLATES
from ..data.dataset import TRAIN_ON
from ..data.options import MAX_LEN
from ..decoding.settings import SEED_MAX
from ..errors import UserError


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
    max_len: int = MAX_LEN
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
    # --lora-r R: low-rank adapters on a frozen base (models/lora.py)
    lora_r: int = 0  # 0: every weight trains
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = ""  # comma-separated module names; empty: every projection of the blocks
    base_dtype: str = "float32"  # --lora-r: the frozen base's weights: float32, or blocks (auto, int8, int4)
    compute_dtype: str = "float32"  # a blocked base's training products: float32 (native forward) or bfloat16
    gradient_checkpointing: bool = False
    dpo: bool = False  # --data holds preference records; the adapter trains by DPO (training/dpo.py)
    dpo_beta: float = 0.1
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
        for name in ("seed", "split_seed"):
            if getattr(self, name) > SEED_MAX:
                raise UserError(f"--{name.replace('_', '-')} must be at most 2**63 - 1, got {getattr(self, name)}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        if self.train_on not in TRAIN_ON:
            raise UserError(f"--train-on must be one of {', '.join(TRAIN_ON)}, got {self.train_on!r}")
        if self.template != "auto" and self.template not in TEMPLATES:
            raise UserError(f"unknown --template {self.template!r}; known: auto, {', '.join(TEMPLATES)}")
        if self.vocab_size < 300:
            raise UserError(f"--vocab-size must be >= 300 (256 bytes + merges), got {self.vocab_size}")
        if self.lora_r:
            if not self.lora_dropout < 1:
                raise UserError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
            if self.init == "scratch":
                raise UserError("--lora-r adapts a pretrained base: give --init a model, not scratch")
            if self.freeze_embeddings or self.freeze_layers:
                raise UserError("--freeze-embeddings and --freeze-layers do not apply with --lora-r (the base is frozen)")
            if self.arch != "transformer":
                raise UserError("--lora-r adapts transformer models, not --arch rnn")
            if self.base_dtype not in ("float32", "auto", "int8", "int4"):
                raise UserError(f"--base-dtype must be one of float32, auto, int8, int4, got {self.base_dtype!r}")
        elif self.base_dtype != "float32":
            raise UserError("--base-dtype keeps a LoRA run's frozen base in blocks: give --lora-r")
        elif self.dpo:
            raise UserError("--dpo trains a LoRA adapter: give --lora-r")
        elif self.lora_targets:
            raise UserError("--lora-targets needs --lora-r")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise UserError(f"--compute-dtype must be float32 or bfloat16, got {self.compute_dtype!r}")
        if self.compute_dtype != "float32" and self.base_dtype == "float32":
            raise UserError("--compute-dtype applies to a base kept in blocks: give --base-dtype auto, int8 or int4")
        if not self.min_lr_ratio <= 1:
            raise UserError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
