"""What the training loop starts from: the model (scratch, pretrained or resumed), frozen
parts, and AdamW with a warmup + cosine schedule."""

from __future__ import annotations

import math
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from ..chat.templates import default_template_name
from ..errors import UserError
from ..models.hf import config_to_hf
from ..models.loading import default_model_path, load
from ..models.lora import Adapter, LoraSettings, default_targets, read_adapter
from ..models.quantized import set_compute_dtype
from ..models.transformer import Transformer
from . import checkpoint as ckpt
from .options import TrainOptions
from .rnn_train import check_rnn_start, new_rnn, wants_rnn
from .scratch import gpt2_config, scratch_tokenizer


@contextmanager
def undo_on_failure(out: Path, main: bool = True):
    """Whatever the block adds to `out` (and `out` itself, and parents it makes) is removed if it
    fails; what was there before is never touched."""
    top = out.absolute()
    while not top.parent.exists():
        top = top.parent
    made = None if top.exists() else top  # the outermost directory that this run creates
    before = set(out.iterdir()) if out.is_dir() else set()
    try:
        yield
    except BaseException:
        if main:
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)
            elif out.is_dir():
                for entry in set(out.iterdir()) - before:
                    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        raise


def build_model(opts: TrainOptions, d, train_convs):
    """(model, tokenizer, template name, saved training state or None, LoRA adapter or None): a
    transformer, or with `--arch rnn` (or a run or --init that is one) an encoder-decoder; with
    `--lora-r`, a frozen transformer and the adapter that trains."""
    if opts.lora_r:
        return build_lora(opts)
    rnn = wants_rnn(opts)
    if rnn:
        check_rnn_start(opts)
        torch.manual_seed(opts.seed)  # dropout draws from the global generator; a resume restores its state
    state = None
    if opts.resume:
        last = Path(opts.out) / "last"
        loaded = load(str(last), torch.float32)
        model, tok, tname = loaded.model, loaded.tokenizer, loaded.meta.get("template", "dialogpt" if rnn else "chatml")
        state = ckpt.load_state(last)
    elif opts.init == "scratch":
        tname = "dialogpt" if opts.template == "auto" else opts.template
        tok = scratch_tokenizer(opts, d, train_convs, tname)
        model = new_rnn(opts, tok, tname) if rnn else new_gpt2(opts, tok)
    else:
        loaded = load(None if opts.init == "default" else opts.init, torch.float32)
        model, tok = loaded.model, loaded.tokenizer
        if not rnn and not isinstance(model, Transformer):
            raise UserError(f"{opts.init}: dialogen train fine-tunes transformer models (llama, gpt2 families)")
        tname = opts.template
        if tname == "auto":
            tname = default_template_name(loaded.meta, tok, model.cfg.arch)
        if isinstance(model, Transformer):
            config_to_hf(model.cfg)  # a model that could not be saved is refused before training, not after
    if not rnn and opts.max_len > model.cfg.max_seq_len:
        raise UserError(f"--max-len {opts.max_len} exceeds the model's context of {model.cfg.max_seq_len} tokens")
    freeze(model, opts.freeze_embeddings, opts.freeze_layers)
    return model, tok, tname, state, None


def base_name(init: str) -> str:
    """The base a LoRA run adapts, as its adapter_config.json records it (base_model_name_or_path)."""
    return str(default_model_path() if init == "default" else Path(init).expanduser().resolve())


def lora_order(opts: TrainOptions, adapter: Adapter) -> list:
    """What a resumed LoRA run must share with the run it continues (its checkpoint's order)."""
    order = [opts.lora_r, opts.lora_alpha, opts.lora_dropout, adapter.names, opts.base_dtype]
    return order + ([opts.compute_dtype] if opts.compute_dtype != "float32" else [])


def build_lora(opts: TrainOptions):
    """The frozen base of --init (the float32 reference) with a new adapter, or the adapter of the
    run's last checkpoint on --resume."""
    loaded = load(None if opts.init == "default" else opts.init, opts.base_dtype)
    model, tok = loaded.model, loaded.tokenizer
    if not isinstance(model, Transformer):
        raise UserError(f"{opts.init}: --lora-r adapts transformer models (llama, gpt2 families)")
    if opts.max_len > model.cfg.max_seq_len:
        raise UserError(f"--max-len {opts.max_len} exceeds the model's context of {model.cfg.max_seq_len} tokens")
    if opts.base_dtype == "float32":
        model.materialize()
    elif model.native is None or not model.native.blocks:
        raise UserError(f"--base-dtype {opts.base_dtype}: the base has no blocks to train on here (the native "
                        f"kernels are off or cannot multiply this model); use --base-dtype float32")
    else:  # the Linears keep their blocks; their input gradients go through the same blocks
        model.frozen_blocks = True
        set_compute_dtype(model, getattr(torch, opts.compute_dtype))
    model.requires_grad_(False)
    cfg, base = model.cfg, base_name(opts.init)
    targets = tuple(t.strip() for t in opts.lora_targets.split(",") if t.strip()) or default_targets(cfg)
    settings = LoraSettings(opts.lora_r, opts.lora_alpha, opts.lora_dropout, targets)
    tname = default_template_name(loaded.meta, tok, cfg.arch) if opts.template == "auto" else opts.template
    state = None
    if opts.resume:
        last = Path(opts.out) / "last"
        adapter = read_adapter(last, cfg, Path(base))
        adapter.settings = settings
        state = ckpt.load_state(last)
    else:
        adapter = Adapter(cfg, settings, base).init(opts.seed)
    torch.manual_seed(opts.seed)  # the adapter's dropout draws from the global generator; a resume restores it
    return model, tok, tname, state, adapter.requires_grad_(True).train().attach(model)


def new_gpt2(opts: TrainOptions, tokenizer) -> Transformer:
    model = Transformer(gpt2_config(tokenizer.vocab_size, opts.n_layer, opts.n_head, opts.d_model, opts.max_len))
    model.init_weights(opts.seed)
    return model


def freeze(model, embeddings: bool, layers: int):
    """Stop gradients to the embeddings (and a head tied to them) and the first `layers` blocks."""
    if layers > model.cfg.n_layer:
        raise UserError(f"--freeze-layers {layers} exceeds the model's {model.cfg.n_layer} layers")
    if embeddings:
        model.embed.weight.requires_grad_(False)
        if model.cfg.arch == "gpt2":  # learned positions
            model.pos_embed.weight.requires_grad_(False)
    for block in list(model.blocks)[:layers] if layers else []:
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
