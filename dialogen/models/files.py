"""Checkpoint files, for every model family: the one writer and the one weights check.

A checkpoint is a Hugging Face style directory: model.safetensors (float32), config.json, the
tokenizer's files and dialogen.json (template, training information). `write_checkpoint` writes
one atomically (a temp dir beside it, then a rename), so a crash never leaves half of one; the
transformer, the RNN, the discriminator and a converted GGUF file all go through it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from ..paths import atomic_dir
from .config_values import check_weights


def read_state_dict(path: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    try:
        if files:
            sd = {}
            for f in files:
                sd.update(load_file(str(f)))
            return sd
        if (path / "pytorch_model.bin").exists():
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or corrupt weights file
        raise UserError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    raise UserError(f"{path}: no weights (*.safetensors or pytorch_model.bin)")


def write_checkpoint(directory: Path, sd: dict, config: dict, tokenizer, meta: dict, more=None) -> Path:
    """Weights `sd`, `config` (config.json), the tokenizer and `meta` (dialogen.json), written
    atomically; `more(tmp)` adds files of its own (generation_config.json, a training state)."""
    from safetensors.torch import save_file

    def write(tmp: Path):
        weights = {k: v.detach().float().contiguous() for k, v in sd.items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        tokenizer.save(tmp)
        (tmp / "dialogen.json").write_text(json.dumps(meta, indent=1))
        if more is not None:
            more(tmp)

    return atomic_dir(Path(directory), write)


def assign_weights(model, sd: dict, where: str, optional=(), assign: bool = False):
    """`sd` into `model`; every weight present (but those `optional`) and none unknown."""
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=assign)
    missing = [m for m in missing if m not in optional]
    if missing or unexpected:
        raise UserError(f"{where}: weights do not match config.json: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


def load_checked(model_cls, cfg, path: Path, where: str):
    """`model_cls(cfg)` with the weights of the checkpoint directory `path`, their shapes checked
    against `cfg` before anything is allocated."""
    sd = read_state_dict(path)
    check_weights(model_cls, cfg, sd, where)
    return assign_weights(model_cls(cfg), sd, where).eval()
