"""The layers the transformer is built of: RMSNorm, Embedding and Linear, whose weight can have a
decode copy (GGUF blocks for the native kernels, or float16/bfloat16) and be made on first use."""

from __future__ import annotations

import contextvars

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


KERNEL_ROWS = 64  # decode steps of up to this many rows use a Linear's decode copy, so a row's logits
# do not depend on how many others share its step
BLOCK_KIND = {"int8": "q8_0", "int4": "q4_1"}


skip_init = contextvars.ContextVar("skip_init", default=False)  # set by Transformer.without_init


class Embedding(nn.Embedding):
    """nn.Embedding whose table can stay in a GGUF file's blocks (`source`): inference dequantizes
    only the rows it looks up; training and `--no-kernels` make the float32 table first."""

    source: tuple | None = None  # (kind, blocks (vocab, row bytes)) the table is made from

    def reset_parameters(self):
        if not skip_init.get():
            super().reset_parameters()

    def forward(self, ids):
        if self.source is not None and kernels.enabled() and not torch.is_grad_enabled():
            kind, blocks = self.source
            rows = blocks[ids.reshape(-1)]  # (N, row bytes): the looked-up rows' blocks only
            out = kernels.dequantize(kernels.GGML_TYPES[kind], rows, rows.shape[0], self.embedding_dim)
            return out.view(*ids.shape, -1)
        return F.embedding(ids, self.float_weight())

    def float_weight(self) -> nn.Parameter:
        """`weight`, made from `source` first if it was left to first use."""
        if self.source is not None:
            kind, blocks = self.source
            w = kernels.dequantize(kernels.GGML_TYPES[kind], blocks, self.num_embeddings, self.embedding_dim)
            with torch.no_grad():
                self.weight.copy_(w)
            self.source = None
        return self.weight


class Linear(nn.Linear):
    """nn.Linear with an optional input norm, activation and residual, and a decode copy of its weight.

    `forward(x, norm, act, residual)` is `residual + W @ act(norm(x)) + b`. Decoding multiplies a
    few rows by each weight, which is bound by memory traffic, so a compact copy is faster there:
    `packed` (weights in GGUF's Q4_0/Q4_1/Q8_0 block layouts, multiplied by the native kernel, with
    the RMS norm or SwiGLU fused in) or `compact` (float16/bfloat16). Blocks serve every inference
    product, a prompt's too, as a GGUF file's blocks do in llama.cpp: a whole prompt ran 1.1-3.9x
    faster than in float32 here, most on short ones (bench/prefill.py). A float16/bfloat16 copy only
    decodes: many rows are faster in float32 on CPUs without bf16 hardware. Training always
    multiplies the float32 weight.
    """

    compact: torch.Tensor | None = None
    packed: torch.Tensor | None = None  # blocks (out, in / 32 * block bytes) uint8
    kind: str | None = None  # q4_0, q4_1 or q8_0
    tiled: torch.Tensor | None = None  # the same blocks in the tiled order, where the kernels have it
    everywhere = False  # use the decode copy for every inference product (to measure its quality)
    source: tuple | None = None  # (kind, blocks) `weight` is made from on first use (loaded lazily)
    segments: list | None = None  # [(kind, blocks, tiled, rows)]: parts of different layouts (`set_segments`)

    def reset_parameters(self):
        if not skip_init.get():
            super().reset_parameters()

    def forward(self, x, norm=None, act: str | None = None, residual=None):
        rows = x.numel() // x.shape[-1]
        inference = not (self.weight.requires_grad and torch.is_grad_enabled())
        # a decode step: one new token for each of a few rows (B, 1, d)
        decode = inference and (self.everywhere or x.dim() == 3 and x.shape[1] == 1 and rows <= KERNEL_ROWS)
        if inference and (self.packed is not None or self.segments) and kernels.enabled():  # blocks serve prompts too
            fused = isinstance(norm, RMSNorm)
            if norm is not None and not fused:
                x = norm(x)
            if act == "gelu":
                x = F.gelu(x, approximate="tanh")
            norm_args = (norm.weight if fused else None, norm.eps if fused else 0.0, act == "swiglu")
            if self.segments:
                y = self._segmented(x.reshape(rows, -1), norm_args)
                y = y if residual is None else y + residual.view(rows, -1)
                return y.view(*x.shape[:-1], -1)
            out = None if residual is None else residual.view(rows, -1)
            kind, _ = kernels.weight_args(self)
            y = kernels.qmatmul(kind, self.packed if self.tiled is None else self.tiled, self.out_features, self.in_features,
                                x.reshape(rows, -1), self.bias, out, *norm_args)
            return y.view(*x.shape[:-1], -1)
        if norm is not None:
            x = norm(x)
        if act == "swiglu":
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        elif act == "gelu":
            x = F.gelu(x, approximate="tanh")
        c = self.compact
        if c is None or not decode:
            y = F.linear(x, self.float_weight(), self.bias)
        else:
            bias = None if self.bias is None else self.bias.to(c.dtype)
            y = F.linear(x.to(c.dtype), c, bias).to(x.dtype)
        return y if residual is None else residual + y

    def _segmented(self, x, norm_args):
        """(R, in) -> (R, out) through `segments`: each part's product fills its slice of the output columns."""
        outs, start = [], 0
        for kind, blocks, tiled, rows in self.segments:
            ggml = kernels.GGML_TYPES[kind] | (kernels.TILED if tiled is not None else 0)
            bias = None if self.bias is None else self.bias[start:start + rows]
            outs.append(kernels.qmatmul(ggml, blocks if tiled is None else tiled, rows, self.in_features, x, bias,
                                        None, *norm_args))
            start += rows
        return torch.cat(outs, dim=-1)

    def set_segments(self, parts: list):
        """Decode by blocks of different layouts joined along the output rows (a fused q/k/v or gate/up whose
        parts a file ships in different types): parts [(kind, blocks (rows, row bytes))]."""
        self.compact = self.packed = self.kind = self.tiled = None
        self.segments = []
        for kind, blocks in parts:
            tiled = kernels.tile(kernels.GGML_TYPES[kind], blocks, blocks.shape[0], self.in_features) \
                if kernels.enabled() else None
            self.segments.append((kind, blocks, tiled, blocks.shape[0]))

    def set_compact(self, dtype: str, blocks: torch.Tensor | None = None, kind: str | None = None):
        """Keep a decode copy: float16/bfloat16, or blocks (given, e.g. as a GGUF file ships them, or
        quantized here for int8/int4); float32 keeps none."""
        self.compact = self.packed = self.kind = self.tiled = self.segments = None
        if blocks is not None:
            self.packed, self.kind = blocks, kind
        elif dtype in BLOCK_KIND:
            self.kind = BLOCK_KIND[dtype]
            self.packed = kernels.quantize(self.float_weight(), self.kind)
        if self.packed is not None:
            if kernels.enabled():
                self.tiled = kernels.tile(kernels.GGML_TYPES[self.kind], self.packed, self.out_features,
                                          self.in_features)
        elif dtype != "float32":
            self.compact = self.float_weight().detach().to(getattr(torch, dtype))

    def float_weight(self) -> nn.Parameter:
        """`weight`, made from `source` first if it was left to first use."""
        if self.source is not None:
            parts = self.source if isinstance(self.source, list) else [self.source]  # [(kind, blocks)]
            w = torch.cat([kernels.dequantize(kernels.GGML_TYPES[kind], blocks, blocks.shape[0], self.in_features)
                           for kind, blocks in parts])
            with torch.no_grad():
                self.weight.copy_(w)
            self.source = None
        return self.weight
