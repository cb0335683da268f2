"""Checkpoint files every model family shares: weights read from a directory, and a directory
written atomically (a temp dir beside it, then a rename), so a crash never leaves half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import UserError


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


def atomic_dir(target: Path, write) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old.{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
