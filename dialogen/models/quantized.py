"""Weights kept for inference as a file ships them, or as a compact copy: the Linears and the
embedding `native.swap_in` puts into a model (see its docstring).

- `BlockLinear`: the weight as GGUF blocks (or their tiled order where the build has one),
  multiplied by the native kernel with the RMS norm or SwiGLU fused in, for prompts and decode steps
  alike. Blocks a file ships are the only copy of that weight.
- `SegmentedLinear`: a fused Linear whose parts ship in different block formats.
- `BlockEmbedding`: the token embedding as the file's blocks; a lookup dequantizes its rows.
- `HalfLinear`: a reference Linear with a float16/bfloat16 copy that decode steps multiply.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .kernels import formats, library, ops
from .kernels.grad import BlockProduct
from .layers import Embedding, Linear, RMSNorm, activate, skip_init

KERNEL_ROWS = 64  # a float16 copy multiplies decode steps of up to this many rows, so a row's logits
# do not depend on how many others share its step


def recast(cls, module: nn.Module) -> nn.Module:
    """`module` as an instance of `cls` (its subclass or its base): the same parameters, buffers,
    children and attributes, in registries of its own."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for registry in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        new.__dict__[registry] = copy.copy(module.__dict__[registry])
    return new


def _check_blocks(kind: str, blocks: torch.Tensor, n: int, k: int):
    f = formats.FORMATS[formats.GGML_TYPES[kind]]
    if k % f.block or tuple(blocks.shape) != (n, k // f.block * f.bytes):
        raise UserError(f"{kind.upper()} blocks of shape {tuple(blocks.shape)} do not hold a ({n}, {k}) weight")


class ShippedWeight(nn.Module):
    """A swapped-in product whose weight is kept as the file shipped it: its state dict holds the
    reference's float32 `weight`, and `reference()` is the plain Linear of the same values."""

    in_features: int
    out_features: int

    reference_weight: callable  # () -> the weight (out, in) in float32, each subclass's own

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.reference_weight()  # the reference's key, float32
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def reference(self) -> Linear:
        token = skip_init.set(True)
        try:
            lin = Linear(self.in_features, self.out_features, bias=False)
        finally:
            skip_init.reset(token)
        lin.weight = nn.Parameter(self.reference_weight())
        lin.bias = self.bias
        return lin


class BlockLinear(ShippedWeight):
    """A Linear whose weight is blocks (out, in / 32 * block bytes): `forward(x, norm, act, residual)`
    as `Linear`'s, by the native kernel (the RMS norm or SwiGLU fused in, the residual added in place).

    `blocks` holds the weight in the layout `product_type` names: the file's blocks, or, where the
    build multiplies a tiled order (`formats.tile`), the same bytes reordered in place of them (not
    beside them). Either is the only copy of the weight. Blocks made at load (`--dtype int8` from a
    float checkpoint, or from a file's 4-bit blocks) keep the weight the file shipped as `shipped`
    (float32, or those 4-bit blocks), so that training and saving see the file's values.
    `blocks` may be given as a list of row parts (a fused projection's), joined here."""

    compute_dtype = torch.float32  # a training product's dtype (kernels/grad.BlockProduct; float32: native)

    def __init__(self, kind: str, blocks, in_features: int, out_features: int, bias=None,
                 shipped: torch.Tensor | None = None, shipped_kind: str | None = None):
        super().__init__()
        parts = blocks if isinstance(blocks, (list, tuple)) else [blocks]
        for p in parts:
            _check_blocks(kind, p, len(p), in_features)
        if sum(len(p) for p in parts) != out_features:
            raise UserError(f"{kind.upper()} blocks of {sum(len(p) for p in parts)} rows do not hold {out_features}")
        self.kind, self.in_features, self.out_features = kind, in_features, out_features
        self.ggml_type = formats.GGML_TYPES[kind]
        tiled = formats.tile(self.ggml_type, parts, out_features, in_features)
        if tiled is None:
            tiled = parts[0] if len(parts) == 1 else torch.cat(parts)
            self.product_type = self.ggml_type
        else:
            self.product_type = self.ggml_type | formats.TILED
        self.register_buffer("blocks", tiled, persistent=False)  # in the layout of `product_type`
        self.bias = bias
        self.register_buffer("shipped", shipped, persistent=False)  # None: the blocks are the file's
        self.shipped_kind = shipped_kind  # the block format of `shipped`, or None for float32

    @classmethod
    def of(cls, lin: Linear, kind: str, blocks: torch.Tensor, shipped=None, shipped_kind=None) -> "BlockLinear":
        return cls(kind, blocks, lin.in_features, lin.out_features, lin.bias, shipped, shipped_kind)

    def forward(self, x, norm=None, act: str | None = None, residual=None):
        if self.training and library.enabled():  # a frozen base that trains adapters (with or without a graph)
            y = BlockProduct.apply(activate(x, norm, act), self)
            y = y if self.bias is None else y + self.bias
            return y if residual is None else residual + y
        if torch.is_grad_enabled() or not library.enabled():  # the reference math on the weight as shipped
            y = F.linear(activate(x, norm, act), self.reference_weight(), self.bias)
            return y if residual is None else residual + y
        fused = isinstance(norm, RMSNorm) and not norm.offset  # the kernel fuses llama's RMS norm
        x = activate(x, None if fused else norm, None if act == "swiglu" else act)
        rows = x.numel() // x.shape[-1]
        out = None if residual is None else residual.view(rows, -1)
        y = ops.qmatmul(self.product_type, self.blocks, self.out_features,
                        self.in_features, x.reshape(rows, -1), self.bias, out, norm.weight if fused else None,
                        norm.eps if fused else 0.0, act == "swiglu")
        return y.view(*x.shape[:-1], -1)

    def reference_weight(self) -> torch.Tensor:
        """The weight (out, in) as the file shipped it, float32 (blocks' values exactly)."""
        if self.shipped is None:
            return self.weight_rows(0, self.out_features)
        if self.shipped_kind is None:
            return self.shipped
        return formats.dequantize(formats.GGML_TYPES[self.shipped_kind], self.shipped, self.out_features,
                                  self.in_features)

    def weight_rows(self, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows r0..r1 of the multiplied weight, float32 (r1 - r0, in), or written into `out` (float32 or
        bfloat16); tiled, r0 and r1 are whole groups of `formats.TILE` rows (or r1 the last row)."""
        per = formats.TILE if self.product_type & formats.TILED else 1
        return formats.dequantize(self.product_type, self.blocks[r0 // per: -(-r1 // per)], r1 - r0, self.in_features,
                                  out=out)

    def extra_repr(self) -> str:
        return f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}"


class SegmentedLinear(ShippedWeight):
    """A fused Linear (q/k/v, gate/up) whose parts a file ships in different block formats (a
    Q4_K_M-style mix): one BlockLinear per part, each product filling its columns of the output.
    Its block runs unfused (the fused native block multiplies one format per product)."""

    def __init__(self, lin: Linear, parts: list):
        super().__init__()
        self.in_features, self.out_features, self.bias = lin.in_features, lin.out_features, lin.bias
        # [BlockLinear] in row order; a plain list, so the state dict holds this module's `weight` only
        self.__dict__["parts"] = [BlockLinear(kind, b, lin.in_features, b.shape[0]) for kind, b in parts]

    def train(self, mode: bool = True):
        super().train(mode)
        for p in self.parts:  # not submodules (a plain list): they take the mode from here
            p.train(mode)
        return self

    def forward(self, x, norm=None, act: str | None = None, residual=None):
        if self.training and library.enabled():  # a frozen base that trains adapters (with or without a graph)
            a = activate(x, norm, act)
            y = torch.cat([BlockProduct.apply(a, p) for p in self.parts], dim=-1)
            y = y if self.bias is None else y + self.bias
            return y if residual is None else residual + y
        if torch.is_grad_enabled() or not library.enabled():  # the reference math on the weight as shipped
            y = F.linear(activate(x, norm, act), self.reference_weight(), self.bias)
            return y if residual is None else residual + y
        if norm is not None and not isinstance(norm, RMSNorm):  # an RMS norm is fused into each product
            x, norm = norm(x), None
        y = torch.cat([p(x, norm=norm, act=act) for p in self.parts], dim=-1)
        y = y if self.bias is None else y + self.bias
        return y if residual is None else residual + y

    def reference_weight(self) -> torch.Tensor:
        return torch.cat([p.reference_weight() for p in self.parts])

    def extra_repr(self) -> str:
        return f"{'+'.join(p.kind for p in self.parts)}, in_features={self.in_features}, out_features={self.out_features}"


class BlockEmbedding(nn.Module):
    """The token embedding as a file ships it, blocks (vocab, d / 32 * block bytes): a lookup
    dequantizes only the rows of the tokens it embeds (a tied head multiplies the same blocks)."""

    def __init__(self, kind: str, blocks: torch.Tensor, num_embeddings: int, embedding_dim: int):
        super().__init__()
        _check_blocks(kind, blocks, num_embeddings, embedding_dim)
        self.kind, self.ggml_type = kind, formats.GGML_TYPES[kind]  # ggml_type: the layout of `blocks`
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("blocks", blocks, persistent=False)

    @classmethod
    def of_head(cls, head: BlockLinear) -> "BlockEmbedding":
        """The embedding of a tied head: its rows read from the head's own weights, in the layout
        the head multiplies (tiled or not), so the table is kept once."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.kind, new.ggml_type = head.kind, head.product_type
        new.num_embeddings, new.embedding_dim = head.out_features, head.in_features
        new.register_buffer("blocks", head.blocks, persistent=False)
        return new

    def forward(self, ids):
        if (torch.is_grad_enabled() and not self.training) or not library.enabled():
            return F.embedding(ids, self.reference_weight())
        x = formats.dequantize_rows(self.ggml_type, self.blocks, ids, self.embedding_dim)  # those rows only
        return x.view(*ids.shape, self.embedding_dim)

    def reference_weight(self) -> torch.Tensor:
        return formats.dequantize(self.ggml_type, self.blocks, self.num_embeddings, self.embedding_dim)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.reference_weight()  # the reference's key, float32

    def reference(self) -> Embedding:
        token = skip_init.set(True)
        try:
            emb = Embedding(self.num_embeddings, self.embedding_dim)
        finally:
            skip_init.reset(token)
        emb.weight = nn.Parameter(self.reference_weight())
        return emb

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.num_embeddings}, {self.embedding_dim}"


class HalfLinear(Linear):
    """A reference Linear that multiplies decode steps by a float16/bfloat16 copy of its weight.
    Prompts keep the float32 weight: many rows are faster in float32 on CPUs without bf16 hardware."""

    everywhere = False  # the copy serves every inference product (to measure its quality)

    @classmethod
    def of(cls, lin: Linear, dtype: str) -> "HalfLinear":
        new = recast(cls, lin)
        new.register_buffer("decode_weight", lin.weight.detach().to(getattr(torch, dtype)), persistent=False)
        return new

    def forward(self, x, norm=None, act: str | None = None, residual=None):
        rows = x.numel() // x.shape[-1]
        inference = not (self.weight.requires_grad and torch.is_grad_enabled())
        # a decode step: one new token for each of a few rows (B, 1, d)
        if inference and (self.everywhere or x.dim() == 3 and x.shape[1] == 1 and rows <= KERNEL_ROWS):
            x = activate(x, norm, act)
            c = self.decode_weight
            bias = None if self.bias is None else self.bias.to(c.dtype)
            y = F.linear(x.to(c.dtype), c, bias).to(x.dtype)
            return y if residual is None else residual + y
        return super().forward(x, norm, act, residual)

    def reference(self) -> Linear:
        lin = recast(Linear, self)
        del lin.decode_weight
        lin.__dict__.pop("everywhere", None)
        return lin


def set_compute_dtype(model: nn.Module, dtype: torch.dtype):
    """The dtype of every training product of `model`'s BlockLinears (a SegmentedLinear's parts too)."""
    for m in model.modules():
        for lin in m.parts if isinstance(m, SegmentedLinear) else [m]:
            if isinstance(lin, BlockLinear):
                lin.compute_dtype = dtype
