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


def _low_precision_slices(lin):
    """(first row, end row, W[rows] in `lin.compute_dtype`) over the weight of a BlockLinear, each
    slice of at most LOW_PRECISION_VALUES weights (whole groups of BACKWARD_ROWS rows), dequantized
    straight into the shared buffer. A slice is valid until the next one is made."""
    step = max(1, LOW_PRECISION_VALUES // lin.in_features // BACKWARD_ROWS) * BACKWARD_ROWS
    for s0 in range(0, lin.out_features, step):
        s1 = min(s0 + step, lin.out_features)
        yield s0, s1, lin.weight_rows(s0, s1, out=_weight_buffer(lin.compute_dtype, s1 - s0, lin.in_features))


class BlockProduct(torch.autograd.Function):
    """`a @ W^T` for a BlockLinear's frozen blocks W (out, in), differentiable in `a`.

    In float32 (`lin.compute_dtype`) the forward is the native product, as at inference, and the
    backward, `g @ W`, dequantizes BACKWARD_ROWS rows of W at a time, so no float copy of W outlives
    one tile. In bfloat16 (QLoRA's compute dtype) both products take a and g in bfloat16 against
    W in slices of at most LOW_PRECISION_VALUES weights (a block's largest matrix whole, a large
    head in parts), made in one buffer that every product shares; they run on AMX where the CPU
    has it. (The base of a LoRA run on blocks.)"""

    @staticmethod
    def forward(ctx, a, lin):  # a (..., in) -> (..., out)
        ctx.lin = lin
        rows = a.numel() // a.shape[-1]
        y = torch.empty(*a.shape[:-1], lin.out_features)  # not a view: an adapter adds into it in place
        if lin.compute_dtype != torch.float32:
            al, y2 = a.reshape(rows, -1).to(lin.compute_dtype), y.view(rows, -1)
            for s0, s1, w in _low_precision_slices(lin):
                y2[:, s0:s1] = al @ w.T
            return y
        return ops.qmatmul(lin.product_type, lin.blocks, lin.out_features, lin.in_features, a.reshape(rows, -1),
                           into=y)

    @staticmethod
    def backward(ctx, g):  # g (..., out) -> (..., in)
        lin = ctx.lin
        g2 = g.reshape(-1, lin.out_features)
        if lin.compute_dtype != torch.float32:
            gl, grad = g2.to(lin.compute_dtype), None
            for s0, s1, w in _low_precision_slices(lin):
                part = (gl[:, s0:s1] @ w).to(g.dtype)
                grad = part if grad is None else grad.add_(part)
            return grad.view(*g.shape[:-1], lin.in_features), None
        grad = torch.zeros(g2.shape[0], lin.in_features, dtype=g.dtype)
        for r0 in range(0, lin.out_features, BACKWARD_ROWS):
            r1 = min(r0 + BACKWARD_ROWS, lin.out_features)
            w = lin.weight_rows(r0, r1)  # (rows, in)
            grad.addmm_(g2[:, r0:r1], w)
        return grad.view(*g.shape[:-1], lin.in_features), None
