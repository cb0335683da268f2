"""The layers the transformer is built of: RMSNorm, Embedding and Linear, the reference math.

Faster modules for inference (block weights, a float16 copy, the native decode step) are swapped
in at load by `models/native.py`; these stay the readable reference that training runs.
"""

from __future__ import annotations

import contextvars

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + weight): offset 0 (llama), or 1 with weights stored around 0 (gemma)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim) if not offset else torch.zeros(dim))

    def forward(self, x):
        w = self.weight if not self.offset else self.weight + self.offset
        return F.rms_norm(x, self.weight.shape, w, self.eps)


# Set by Transformer.without_init: the weights of Embedding and Linear made while it is set are
# placeholders on the meta device, each replaced next (by a checkpoint's tensor or a swapped-in
# block). Real placeholders would be freed at once, leaving holes all through the heap that a
# training step's activations then scatter into, keeping far more memory resident than is live.
skip_init = contextvars.ContextVar("skip_init", default=False)


def _placeholder(kwargs: dict) -> dict:
    return {**kwargs, "device": "meta"} if skip_init.get() else kwargs


class Embedding(nn.Embedding):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **_placeholder(kwargs))

    def reset_parameters(self):
        if not skip_init.get():
            super().reset_parameters()


class Linear(nn.Linear):
    """nn.Linear with an optional input norm, activation and residual:
    `forward(x, norm, act, residual)` is `residual + W @ act(norm(x)) + b`, where `act` is "swiglu"
    (x is [gate | up]: silu(gate) * up), "glu_<activation>" (the same with another of ACTIVATIONS),
    "gelu" (tanh approximation) or None."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **_placeholder(kwargs))

    def reset_parameters(self):
        if not skip_init.get():
            super().reset_parameters()

    def forward(self, x, norm=None, act: str | None = None, residual=None):
        y = F.linear(activate(x, norm, act), self.weight, self.bias)
        return y if residual is None else residual + y


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up over the two halves of x, for training: saves x alone and recomputes silu(gate)
    in the backward pass, where torch's two ops would also keep silu(gate) (a third more of the
    MLP's activations) until then. The same forward ops, the same gradient formula."""

    @staticmethod
    def forward(ctx, x):
        gate, up = x.chunk(2, dim=-1)
        ctx.save_for_backward(x)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        gate, up = x.chunk(2, dim=-1)
        s = torch.sigmoid(gate)
        return torch.cat([g * up * s * (1 + gate * (1 - s)), g * (gate * s)], dim=-1)


def activate(x, norm=None, act: str | None = None):
    """act(norm(x)), the input of a Linear's product."""
    if norm is not None:
        x = norm(x)
    if act == "gelu":
        x = F.gelu(x, approximate="tanh")
    elif act == "swiglu" and x.requires_grad and torch.is_grad_enabled():
        x = SwiGLU.apply(x)
    elif act is not None:  # gated: act(gate) * up over the two halves of x
        gate, up = x.chunk(2, dim=-1)
        x = ACTIVATIONS["silu" if act == "swiglu" else act.removeprefix("glu_")](gate) * up
    return x
