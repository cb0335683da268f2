"""A model's config.json values checked before anything is built from them.

A size is an integer (never a boolean, a float or a string) of at most MAX_SIZE, a rate a finite
number, a switch a boolean; each config class then checks its own ranges. Every error is one
line naming the file and the key.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields

import torch

from ..errors import UserError

MAX_SIZE = 1 << 24  # no size in a config.json is larger (vocabularies, widths, layers, positions)


def shown(v) -> str:
    return json.dumps(v)[:40]


def config_from_dict(cls, c: dict, where: str, required=("vocab_size",)):
    """`cls` (a dataclass of int, float, bool and str fields) from a config.json's values."""
    for key in required:
        if key not in c:
            raise UserError(f"{where}: missing field '{key}'")
    kwargs = {}
    for f in fields(cls):
        if f.name not in c or c[f.name] is None:
            continue
        v = c[f.name]
        if f.type == "int" and (isinstance(v, bool) or not isinstance(v, int) or abs(v) > MAX_SIZE):
            raise UserError(f"{where}: field {f.name!r} must be int (at most {MAX_SIZE}), got {shown(v)}")
        if f.type == "float" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise UserError(f"{where}: field {f.name!r} must be float (finite), got {shown(v)}")
        if f.type in ("bool", "str") and not isinstance(v, {"bool": bool, "str": str}[f.type]):
            raise UserError(f"{where}: field {f.name!r} must be {f.type}, got {shown(v)}")
        kwargs[f.name] = v
    try:
        return cls(**kwargs)
    except (UserError, TypeError) as e:
        raise UserError(f"{where}: {e}") from None


def check_weights(model_cls, cfg, sd: dict, where: str):
    """The weights' shapes against the model `cfg` describes, built on the meta device (no memory)
    so a config too large for its weights is refused before anything is allocated. `where`: the
    checkpoint directory, as errors show it."""
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in model_cls(cfg).state_dict().items()}
    for name, t in sd.items():
        if name in want and tuple(t.shape) != want[name]:
            sizes = ", ".join(f"{f.name}={getattr(cfg, f.name)}" for f in fields(cfg) if f.type == "int")
            raise UserError(f"{where}: weights do not match config.json: {name} is {list(t.shape)}; its sizes "
                            f"({sizes}) make it {list(want[name])}")
