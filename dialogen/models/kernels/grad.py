"""The product of frozen weight blocks as an autograd function: what a LoRA run on a blocked base
(QLoRA-style) multiplies, forward and backward, without a float copy of the weights."""

from __future__ import annotations

import torch

from . import ops

BACKWARD_ROWS = 256  # rows of a weight dequantized at a time for an input gradient


class BlockProduct(torch.autograd.Function):
    """`a @ W^T` for a BlockLinear's frozen blocks W (out, in), differentiable in `a`: the forward is
    the native product; the backward, `g @ W`, dequantizes BACKWARD_ROWS rows of W at a time, so no
    float copy of W outlives one tile. (The base of a LoRA run on blocks, QLoRA-style.)"""

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
        grad = torch.zeros(g2.shape[0], lin.in_features, dtype=g.dtype)
        for r0 in range(0, lin.out_features, BACKWARD_ROWS):
            r1 = min(r0 + BACKWARD_ROWS, lin.out_features)
            w = lin.weight_rows(r0, r1)  # (rows, in)
            grad.addmm_(g2[:, r0:r1], w)
        return grad.view(*g.shape[:-1], lin.in_features), None
