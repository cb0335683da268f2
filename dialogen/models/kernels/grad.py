"""The product of frozen weight blocks as an autograd function: what a LoRA run on a blocked base
(QLoRA-style) multiplies, forward and backward, without a float copy of the weights."""

from __future__ import annotations

import torch

from . import ops

BACKWARD_ROWS = 256  # rows of a weight dequantized at a time
LOW_PRECISION_VALUES = 1 << 25  # at most this many weights in one bfloat16 product (64 MB)
_scratch = {}  # dtype -> the one buffer every bfloat16 product's weight copy is made in, grown as needed


def _weight_buffer(dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
    """A (rows, cols) tensor in the shared buffer of `dtype`: the same pages for every layer's product,
    so no step faults in fresh pages for it."""
    buf = _scratch.get(dtype)
    if buf is None or buf.numel() < rows * cols:
        buf = _scratch[dtype] = torch.empty(rows * cols, dtype=dtype)
    return buf[: rows * cols].view(rows, cols)


class BlockProduct(torch.autograd.Function):
    """`a @ W^T` for a BlockLinear's frozen blocks W (out, in), differentiable in `a`: the forward is
    the native product; the backward, `g @ W`, dequantizes BACKWARD_ROWS rows of W at a time. In
    float32 each tile is multiplied at once, so no float copy of W outlives one tile. In bfloat16
    (`lin.backward_dtype`; its products run on AMX where the CPU has it) the tiles fill a bfloat16
    copy of up to LOW_PRECISION_VALUES weights (a block's largest matrix, or a slice of a large
    head) in one buffer shared by every product, multiplied at once.
    (The base of a LoRA run on blocks, QLoRA-style.)"""

    @staticmethod
    def forward(ctx, a, lin):  # a (..., in) -> (..., out)
        ctx.lin = lin
        rows = a.numel() // a.shape[-1]
        y = torch.empty(*a.shape[:-1], lin.out_features)  # not a view: an adapter adds into it in place
        return ops.qmatmul(lin.product_type, lin.blocks, lin.out_features, lin.in_features, a.reshape(rows, -1),
                           into=y)

    @staticmethod
    def backward(ctx, g):  # g (..., out) -> (..., in)
        lin = ctx.lin
        g2 = g.reshape(-1, lin.out_features)
        if lin.backward_dtype != torch.float32:
            step = max(1, LOW_PRECISION_VALUES // lin.in_features // BACKWARD_ROWS) * BACKWARD_ROWS
            gl, grad = g2.to(lin.backward_dtype), None
            for s0 in range(0, lin.out_features, step):
                s1 = min(s0 + step, lin.out_features)
                w = _weight_buffer(lin.backward_dtype, s1 - s0, lin.in_features)
                for r0 in range(s0, s1, BACKWARD_ROWS):
                    w[r0 - s0:min(r0 + BACKWARD_ROWS, s1) - s0] = lin.weight_rows(r0, min(r0 + BACKWARD_ROWS, s1))
                part = (gl[:, s0:s1] @ w).to(g.dtype)
                grad = part if grad is None else grad.add_(part)
            return grad.view(*g.shape[:-1], lin.in_features), None
        grad = torch.zeros(g2.shape[0], lin.in_features, dtype=g.dtype)
        for r0 in range(0, lin.out_features, BACKWARD_ROWS):
            r1 = min(r0 + BACKWARD_ROWS, lin.out_features)
            w = lin.weight_rows(r0, r1)  # (rows, in)
            grad.addmm_(g2[:, r0:r1], w)
        return grad.view(*g.shape[:-1], lin.in_features), None
