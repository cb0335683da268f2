"""The product of frozen weight blocks as an autograd function: what a LoRA run on a blocked base
(QLoRA-style) multiplies, forward and backward, without a float copy of the weights."""

from __future__ import annotations

import weakref

import torch

from . import ops

BACKWARD_ROWS = 256  # rows of a weight dequantized at a time
LOW_PRECISION_VALUES = 1 << 25  # at most this many weights in one bfloat16 product (64 MB)
_scratch = {}  # (role, dtype) -> one buffer every bfloat16 product shares for that role, grown as needed
_held = {}  # dtype -> the weight slice the buffer holds: (weakref to the blocks, their version, type, first, end row)


def _buffer(role: str, dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
    """A (rows, cols) tensor in the shared buffer of `role` ("weight", "input" or "output") and `dtype`:
    the same pages for every layer's product, so a step neither faults in fresh pages for them nor
    leaves the heap strewn with freed copies. Never returned to autograd: it is overwritten next."""
    buf = _scratch.get((role, dtype))
    if buf is None or buf.numel() < rows * cols:
        buf = _scratch[role, dtype] = torch.empty(rows * cols, dtype=dtype)
        if role == "weight":
            _held.pop(dtype, None)
    return buf[: rows * cols].view(rows, cols)


def low_precision_slices(lin):
    """(first row, end row, W[rows] in `lin.compute_dtype`) over the weight of a BlockLinear, each
    slice of at most LOW_PRECISION_VALUES weights (whole groups of BACKWARD_ROWS rows), dequantized
    straight into the shared buffer. A slice is valid until the next one is made. The slice the
    buffer already holds is not made again: a product's backward right after its forward (the
    frozen head's loss, the last Linear of a recomputed block) reads the forward's copy."""
    step = max(1, LOW_PRECISION_VALUES // lin.in_features // BACKWARD_ROWS) * BACKWARD_ROWS
    dtype = lin.compute_dtype
    for s0 in range(0, lin.out_features, step):
        s1 = min(s0 + step, lin.out_features)
        w = _buffer("weight", dtype, s1 - s0, lin.in_features)
        held = _held.get(dtype)
        if held is None or held[0]() is not lin.blocks or held[1:] != (lin.blocks._version, lin.product_type, s0, s1):
            _held.pop(dtype, None)  # a failed dequantize leaves nothing marked as held
            lin.weight_rows(s0, s1, out=w)
            _held[dtype] = (weakref.ref(lin.blocks), lin.blocks._version, lin.product_type, s0, s1)
        yield s0, s1, w


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
        dtype = lin.compute_dtype
        if dtype != torch.float32:
            al, y2 = _buffer("input", dtype, rows, lin.in_features).copy_(a.reshape(rows, -1)), y.view(rows, -1)
            for s0, s1, w in low_precision_slices(lin):
                y2[:, s0:s1] = torch.mm(al, w.T, out=_buffer("output", dtype, rows, s1 - s0))
            return y
        return ops.qmatmul(lin.product_type, lin.blocks, lin.out_features, lin.in_features, a.reshape(rows, -1),
                           into=y)

    @staticmethod
    def backward(ctx, g):  # g (..., out) -> (..., in)
        lin = ctx.lin
        g2 = g.reshape(-1, lin.out_features)
        dtype, rows = lin.compute_dtype, g2.shape[0]
        if dtype != torch.float32:
            gl, grad = _buffer("input", dtype, rows, lin.out_features).copy_(g2), torch.empty(rows, lin.in_features)
            for s0, s1, w in low_precision_slices(lin):
                part = torch.mm(gl[:, s0:s1], w, out=_buffer("output", dtype, rows, lin.in_features))
                grad.copy_(part) if s0 == 0 else grad.add_(part)
            return grad.view(*g.shape[:-1], lin.in_features), None
        grad = torch.zeros(g2.shape[0], lin.in_features, dtype=g.dtype)
        for r0 in range(0, lin.out_features, BACKWARD_ROWS):
            r1 = min(r0 + BACKWARD_ROWS, lin.out_features)
            w = lin.weight_rows(r0, r1)  # (rows, in)
            grad.addmm_(g2[:, r0:r1], w)
        return grad.view(*g.shape[:-1], lin.in_features), None
