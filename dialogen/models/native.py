"""Native modules swapped into a loaded Transformer for inference, as gpt-fast's `quantize.py`
swaps its Linears; the model code itself (`transformer.py`, `layers.py`) stays the reference.

- `BlockLinear`: the weight as GGUF blocks (Q4_0/Q4_1/Q8_0, plus their tiled order where the
  build has one), multiplied by the native kernel with the RMS norm or SwiGLU fused in, for
  prompts and decode steps alike. Blocks a file ships are the only copy of that weight.
- `BlockEmbedding`: the token embedding as the file's blocks; a lookup dequantizes its rows.
- `HalfLinear`: a reference Linear with a float16/bfloat16 copy that decode steps multiply.
- `NativeAttention`, `FusedBlock`: the step of one new token per row (decode steps, beam rows, the
  server's `CacheBatch`): rotary, cache write and attention in one native call per layer, or the
  whole llama block in one call when its four products are blocks.

`swap_in(model, dtype, blocks)` installs them and records what it did as `model.native` (a `Swap`);
`unswap(model)` (also `model.train()`, `model.materialize()`) puts the reference modules back with
float32 weights. A swapped model's `state_dict()` has the reference's keys and float32 values.
With the kernels off (`--no-kernels`, `library.disabled()`), every swapped module computes the
reference math in torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from .cache import KVCache
from .kernels import formats, library, ops
from .layers import Linear, RMSNorm
from .quantized import BlockEmbedding, BlockLinear, HalfLinear, SegmentedLinear, recast  # noqa: F401 (native.X names)
from .rope import kind as rope_kind
from .transformer import Attention, Block, Config, Transformer

DTYPES = ("auto", "int4", "int8", "float16", "bfloat16", "float32")  # decode weights (see `swap_in`)
BLOCKED = ("auto", "int8", "int4")  # the dtypes whose weights are blocks
BLOCK_KIND = {"int8": "q8_0", "int4": "q4_1"}  # the blocks made from float weights



def attention_supported(cfg: Config) -> str | None:
    """None when the native one-token step computes this config's attention exactly, else why not
    (then the reference attention runs every step, and the server steps conversations one by one)."""
    if cfg.arch not in ("llama", "gpt2"):
        return f"the {cfg.arch} architecture"
    # the kernel: softmax(q.k / sqrt(hd)) over the whole cache, full rotary from per-row tables, its
    # output added to the residual stream as it is
    checks = [(cfg.window_layers and cfg.window, "sliding-window layers"),
              (cfg.attn_softcap, "attention soft-capping"), (cfg.qk_norm, "q/k norms"),
              (cfg.attn_scale and abs(cfg.attn_scale - cfg.head_dim ** -0.5) > 1e-12, "a custom attention scale"),
              (cfg.rotary_dim != cfg.head_dim, "partial rotary"), (cfg.nope_layers, "layers without rotary"),
              (rope_kind(cfg.rope) in ("dynamic", "longrope"), "rotary tables that change with the length"),
              (cfg.local_rope_theta, "a second rotary base"), (cfg.post_norms, "norms on the attention output"),
              (cfg.residual_scale != 1, "a residual multiplier")]
    return next((why for bad, why in checks if bad), None)


def block_supported(cfg: Config) -> str | None:
    """None when the fused native block computes this config's whole block exactly, else why not."""
    why = attention_supported(cfg)
    if why is None and cfg.arch != "llama":
        why = "a block other than llama's (RMS norms, SwiGLU)"
    checks = [(cfg.norm_offset, "RMSNorm with (1 + w)"), (not cfg.pre_norms, "blocks without input norms"),
              (cfg.act != "silu", f"the {cfg.act} activation"), (cfg.o_bias or cfg.mlp_bias, "output or MLP biases")]
    return why or next((why for bad, why in checks if bad), None)


def decode_dtype(dtype, widths) -> str:
    """The dtype a model's Linears decode with, given their input widths: `dtype` itself, or
    float16 for `auto` where blocks cannot be multiplied here. One line names what is missing."""
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype not in BLOCKED:
        return dtype
    why = None if library.enabled() else "the native decode kernels, which need a C compiler (cc)"
    odd = next((w for w in widths if w % formats.QK), None)
    if why is None and odd is not None:
        why = f"input widths that are multiples of {formats.QK} (this model has {odd})"
    if why is None:
        return dtype
    if dtype != "auto":
        raise UserError(f"--dtype {dtype} needs {why}; use --dtype float16")
    return "float16"


@dataclass
class NativeStep:
    """What the native modules of one step share: one new token per row."""

    table: object  # cache.KernelTable: each row's cache addresses, capacity and slot
    key_mask: torch.Tensor | None  # (B, S) uint8, or None
    cos: torch.Tensor | None  # (B, hd/2) rotary tables, or None (learned positions)
    sin: torch.Tensor | None


class NativeAttention(Attention):
    """Attention whose native step (`step.native`) ropes, caches and attends in one call."""

    def forward(self, x, norm, step, post=None):
        n = step.native
        if n is None:
            return super().forward(x, norm, step, post)
        cfg, t, B = self.cfg, n.table, x.shape[0]
        qkv = self.qkv(x, norm=norm).view(B, -1)  # (B, (nh + 2 nkv) hd)
        y = ops.attend_decode(qkv, cfg.n_head, cfg.n_kv_head, cfg.head_dim, t.k[self.layer], t.v[self.layer],
                              t.caps, t.slots, n.key_mask, n.cos, n.sin)
        return self.o_proj(y.view(B, 1, -1), residual=x)

    def reference(self) -> Attention:
        return recast(Attention, self)


class FusedBlock(Block):
    """A llama block whose four products are BlockLinears: its native step is one call, in place on
    the residual stream."""

    @classmethod
    def of(cls, block: Block) -> "FusedBlock":
        new = recast(cls, block)
        a, m = block.attn, block.mlp
        lins = (a.qkv, a.o_proj, m.gate_up, m.down)
        held = (block.norm1.weight, block.norm2.weight, a.qkv.bias) + tuple(b.blocks for b in lins)
        products = [(b.product_type, b.blocks.data_ptr()) for b in lins]
        new.weights = ops.block_weights(a.cfg.n_head, a.cfg.n_kv_head, a.cfg.head_dim, block.norm1.eps,
                                        block.norm1.weight, block.norm2.weight, a.qkv.bias, a.o_proj.out_features,
                                        m.down.in_features, products)
        new.held = held  # the tensors whose addresses `weights` holds, alive as long as it is
        return new

    def forward(self, x, step):
        n = step.native
        if n is None:
            return super().forward(x, step)
        t, layer = n.table, self.attn.layer
        ops.block_decode(self.weights, x.view(x.shape[0], -1), t.k[layer], t.v[layer], t.caps, t.slots, n.key_mask,
                         n.cos, n.sin)
        return x

    def reference(self) -> Block:
        block = recast(Block, self)
        del block.__dict__["weights"], block.__dict__["held"]
        return block


@dataclass
class Swap:
    """What `swap_in` installed in a model (`model.native`), and the native step it drives."""

    dtype: str  # the decode dtype the Linears were given
    attention: bool  # native attention: a step of one new token per row (and a CacheBatch) runs natively
    blocks: bool  # the Linears multiply blocks: a prompt runs as rows of the native step too
    head_dim: int

    @property
    def can_batch(self) -> bool:
        """Whether many caches can be stepped as one `CacheBatch` (the server)."""
        return self.attention and library.enabled()

    @property
    def prompts_as_rows(self) -> bool:
        """Whether a prompt's tokens run as rows of the native step (one token per row, the whole
        block in one call): with blocks, whose products a prompt shares with decode steps. (A
        float16 or bfloat16 copy serves decode steps only, and float32 gains nothing: their prompts
        keep the reference path, bit-identical between the two.)"""
        return self.blocks and self.can_batch

    def _native(self, cache) -> bool:
        return cache.dtype == torch.float32 and not torch.is_grad_enabled() and self.can_batch

    def prompt_as_rows(self, cache, positions, key_mask) -> bool:
        """Whether this prompt (more than one token) runs as rows of one native step."""
        return (self.blocks and isinstance(cache, KVCache) and cache.batch == 1 and positions is None
                and key_mask is None and self._native(cache))

    def step(self, T: int, rope, cache, key_mask) -> NativeStep | None:
        """The native step's shared tensors when this step is one token per row, else None."""
        if T != 1 or cache is None or not self._native(cache):
            return None
        half = self.head_dim // 2
        cos, sin = (None, None) if rope is None else (r[:, 0, 0, :half].contiguous() for r in rope)
        mask = None if key_mask is None else key_mask.to(torch.uint8).contiguous()
        return NativeStep(cache.table(), mask, cos, sin)

    def unswap(self, model):
        unswap(model)


def _replace(model: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _as_q8_0(kind: str, b: torch.Tensor, k: int) -> torch.Tensor:
    """Blocks of `kind` (rows, k) as Q8_0 blocks (`--dtype int8`): kept as they are, 4-bit blocks moved
    onto the 8-bit grid from the blocks themselves, other formats' values quantized afresh."""
    if kind == "q8_0":
        return b
    if kind in ("q4_0", "q4_1"):
        return formats.requantize_q8_0(kind, b, len(b), k)
    return formats.quantize(formats.dequantize(formats.GGML_TYPES[kind], b, len(b), k), "q8_0")


def _decode_linear(m: Linear, dtype: str, shipped) -> nn.Module:
    """The Linear `m` for decode `dtype`; `shipped`: (kind, blocks, ...) as the file ships its weight."""
    kind, b = shipped[:2] if shipped else (None, None)
    if dtype not in BLOCKED:
        return m if dtype == "float32" else HalfLinear.of(m, dtype)
    if kind is None and b is not None:  # parts of different formats [(kind, blocks)]
        return SegmentedLinear(m, [(k, p) if dtype != "int8" else ("q8_0", _as_q8_0(k, p, m.in_features)) for k, p in b])
    if b is not None and (dtype != "int8" or kind == "q8_0"):
        return BlockLinear.of(m, kind, b)
    if isinstance(b, list):  # row parts of one format (`loading.native_blocks`), joined to be moved
        b = torch.cat(b)
    if b is not None:
        return BlockLinear.of(m, "q8_0", _as_q8_0(kind, b, m.in_features), b, kind)
    kind = BLOCK_KIND.get(dtype, "q8_0")
    return BlockLinear.of(m, kind, formats.quantize(m.weight, kind), m.weight.detach())


def swap_in(model, dtype="auto", blocks: dict | None = None) -> str:
    """Install the native modules for decode `dtype` in a Transformer (other models are left as they
    are); returns the dtype resolved (`decode_dtype`).

    auto: the file's own blocks (any `formats.FORMATS` type) where it has them, else int8;
    int8: Q8_0 blocks (int8, one scale per 32 inputs), keeping a file's Q8_0 blocks and moving its
      Q4_0/Q4_1 blocks onto the 8-bit grid (`formats.requantize_q8_0`);
    int4: the file's blocks where it has them, else Q4_1 blocks (int4, scale and minimum per 32);
    float16 / bfloat16: a half-size float copy for decode steps; float32: none.
    `blocks`: {our Linear's name: (kind, blocks, ...)}, a file's weights as shipped (`loading.native_blocks`;
    blocks a tensor, or a list of row parts of that kind; kind None: [(kind, blocks)] of parts in
    different formats), and "embed" for the token embedding;
    a module given blocks may hold no float weight. Native attention and fused blocks are installed
    where the kernels are built and `attention_supported` / `block_supported` allow."""
    if isinstance(model, Transformer) and model.native is not None:
        unswap(model)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]
    dtype = decode_dtype(dtype, [m.in_features for _, m in linears])
    if not isinstance(model, Transformer):
        return dtype
    blocks = blocks or {}
    if "embed" in blocks and dtype in BLOCKED:
        kind, b = blocks["embed"][:2]
        model.embed = BlockEmbedding(kind, b, model.cfg.vocab_size, model.cfg.d_model)
    for name, m in linears:
        new = _decode_linear(m, dtype, blocks.get(name))
        if new is not m:
            _replace(model, name, new)
    head = model.lm_head
    if (model.cfg.tie_embeddings and isinstance(model.embed, BlockEmbedding) and isinstance(head, BlockLinear)
            and head.shipped is None and head.kind == model.embed.kind):  # one table: the head's (maybe tiled)
        model.embed = BlockEmbedding.of_head(head)
    cfg = model.cfg
    attention = library.enabled() and attention_supported(cfg) is None
    fused = attention and dtype in BLOCKED and block_supported(cfg) is None
    for i, block in enumerate(model.blocks):
        if attention:
            block.attn = recast(NativeAttention, block.attn)
        lins = (block.attn.qkv, block.attn.o_proj, getattr(block.mlp, "gate_up", None), block.mlp.down)
        if fused and isinstance(block.norm1, RMSNorm) and all(isinstance(m, BlockLinear) for m in lins):
            model.blocks[i] = FusedBlock.of(block)
    installed = attention or dtype != "float32"  # float32 without the kernels: the reference as it is
    model.native = Swap(dtype, attention, dtype in BLOCKED, cfg.head_dim) if installed else None
    nn.Module.train(model, model.training)  # new modules in the model's mode: a BlockLinear in training runs autograd's products
    return dtype


def unswap(model: Transformer) -> Transformer:
    """The reference modules back in place of every native one, with float32 weights (a BlockLinear's
    are its blocks' values); the model is then the reference, for training and saving."""
    for name, m in list(model.named_modules()):
        if isinstance(m, (BlockLinear, SegmentedLinear, BlockEmbedding, HalfLinear, NativeAttention, FusedBlock)):
            _replace(model, name, m.reference())
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.native = None
    nn.Module.train(model, model.training)
    return model
