"""Decoder-only transformer: the Llama and GPT-2 families from one config, with a KV cache.

Llama: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, optional tied head.
GPT-2: LayerNorm with bias, learned positions, GELU (tanh) MLP, fused qkv with bias.
Parameter names follow Hugging Face's, except that q/k/v (llama) are fused into `qkv` and
gate/up into `gate_up`; `models/loading.py` maps between the two layouts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

ARCHS = ("llama", "gpt2")


@dataclass
class Config:
    arch: str = "llama"
    vocab_size: int = 32000
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    d_model: int = 256
    d_ff: int = 1024
    head_dim: int = 0  # 0 -> d_model // n_head
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attn_bias: bool = False  # llama only; gpt2 always has biases
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; supported: {', '.join(ARCHS)}")
        if self.head_dim == 0:
            self.head_dim = self.d_model // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError("n_head must be a multiple of n_kv_head")

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Keys and values of every layer for a batch, grown in chunks; `length` tokens are valid."""

    def __init__(self, cfg: Config, batch: int = 1, dtype=torch.float32, capacity: int = 256):
        self.cfg, self.batch, self.dtype = cfg, batch, dtype
        self.length = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._alloc(capacity)

    def _alloc(self, capacity: int):
        shape = (self.batch, self.cfg.n_kv_head, capacity, self.cfg.head_dim)
        k = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.cfg.n_layer)]
        v = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.cfg.n_layer)]
        for old, new in zip(self.k + self.v, k + v):
            new[:, :, : self.length] = old[:, :, : self.length]
        self.k, self.v, self.capacity = k, v, capacity

    def reserve(self, n_new: int):
        need = self.length + n_new
        if need > self.capacity:
            self._alloc(max(need, 2 * self.capacity))

    def truncate(self, length: int):
        self.length = min(length, self.length)

    def reorder(self, index: torch.Tensor):
        """Select batch rows (beam search): row i becomes old row index[i]."""
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]
        self.batch = len(index)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def copy(self) -> "KVCache":
        """A new cache holding this one's valid tokens; the two grow apart from here."""
        out = KVCache(self.cfg, self.batch, self.dtype, capacity=max(self.length, 256))
        for src, dst in zip(self.k + self.v, out.k + out.v):
            dst[:, :, : self.length] = src[:, :, : self.length]
        out.length = self.length
        return out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


DECODE_ROWS = 8  # at most this many rows (batch x new tokens) use a Linear's compact decode weight


class Linear(nn.Linear):
    """nn.Linear that can keep a compact (e.g. bfloat16) copy of its weight for decode steps.

    Decoding multiplies one row per sequence by each weight, which is bound by memory traffic, so a
    half-size copy is faster; prefill and training multiply many rows, where fp32 is faster on CPUs
    without bf16 hardware. Activations stay fp32 either way.
    """

    compact: torch.Tensor | None = None
    scales: torch.Tensor | None = None  # per output row, when `compact` is int8

    def forward(self, x):
        c = self.compact
        if c is None or x.numel() > DECODE_ROWS * x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        if c.dtype == torch.int8:
            y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), c, self.scales).view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        bias = None if self.bias is None else self.bias.to(c.dtype)
        return F.linear(x.to(c.dtype), c, bias).to(x.dtype)

    def set_compact(self, dtype: torch.dtype):
        w = self.weight.detach()
        self.compact = self.scales = None
        if dtype == torch.int8:  # symmetric per-row scales
            self.scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).float()
            self.compact = (w / self.scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        elif dtype != torch.float32:
            self.compact = w.to(dtype)


def rope_tables(cfg: Config, positions: torch.Tensor):
    """cos/sin of shape (B, 1, T, head_dim) for integer positions (B, T)."""
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    freqs = positions.float()[..., None] * inv  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rot * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
        bias = cfg.attn_bias or cfg.arch == "gpt2"
        self.qkv = Linear(cfg.d_model, (nh + 2 * nkv) * hd, bias=bias)
        self.o_proj = Linear(nh * hd, cfg.d_model, bias=cfg.arch == "gpt2")

    def forward(self, x, rope, cache: KVCache | None, mask):
        cfg = self.cfg
        B, T, _ = x.shape
        hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
        q, k, v = self.qkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, nkv, hd).transpose(1, 2)
        v = v.view(B, T, nkv, hd).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            start = cache.length
            cache.k[self.layer][:, :, start : start + T] = k
            cache.v[self.layer][:, :, start : start + T] = v
            k = cache.k[self.layer][:, :, : start + T]
            v = cache.v[self.layer][:, :, : start + T]
        if T == 1 and mask is None and nkv != nh:
            # one query per head: each kv head's group of query heads attends as a (group, hd) block
            y = F.scaled_dot_product_attention(q.view(B, nkv, nh // nkv, hd), k, v).view(B, nh, 1, hd)
        elif mask is None:  # plain causal over exactly these T tokens
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=nkv != nh)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=nkv != nh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, nh * hd))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.arch = cfg.arch
        if cfg.arch == "llama":
            self.gate_up = Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)
            self.down = Linear(cfg.d_ff, cfg.d_model, bias=False)
        else:
            self.up = Linear(cfg.d_model, cfg.d_ff)
            self.down = Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x):
        if self.arch == "llama":
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x), approximate="tanh"))


def _norm(cfg: Config):
    if cfg.arch == "llama":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.norm1, self.attn = _norm(cfg), Attention(cfg, layer)
        self.norm2, self.mlp = _norm(cfg), MLP(cfg)

    def forward(self, x, rope, cache, mask):
        x = x + self.attn(self.norm1(x), rope, cache, mask)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """`forward(ids, cache, positions, key_mask) -> logits (B, T, V)`.

    With a cache, the T new tokens are appended after `cache.length` valid ones and the cache
    advances. `key_mask` (B, S) marks real (non-padding) key positions over the whole sequence
    including the cache, for left-padded batches; `positions` (B, T) then gives each token's
    position counting real tokens only.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.arch == "gpt2":
            self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = _norm(cfg)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def set_decode_dtype(self, dtype: torch.dtype):
        """Keep `dtype` copies of the weights for decode steps (float32: none)."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.set_compact(dtype)
        return self

    def new_cache(self, batch: int = 1) -> KVCache:
        return KVCache(self.cfg, batch, dtype=self.embed.weight.dtype)

    @property
    def max_positions(self) -> int:
        """Prompt plus reply stay within this many positions (the decoders stop a reply there)."""
        return self.cfg.max_seq_len

    def init_weights(self, seed: int = 0):
        """GPT-2 style initialisation for training from scratch."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if name.endswith(("o_proj.weight", "down.weight")) else 0.02
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, ids, cache: KVCache | None = None, positions=None, key_mask=None):
        B, T = ids.shape
        past = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + T).expand(B, T)
        x = self.embed(ids)
        rope = None
        if self.cfg.arch == "gpt2":
            if int(positions.max()) >= self.cfg.max_seq_len:
                raise ValueError(f"sequence longer than the model's {self.cfg.max_seq_len} positions")
            x = x + self.pos_embed(positions)
        else:
            rope = rope_tables(self.cfg, positions)
        mask = build_mask(B, T, past, key_mask)
        if cache is not None:
            cache.reserve(T)
        for block in self.blocks:
            x = block(x, rope, cache, mask)
        if cache is not None:
            cache.length += T
        return self.lm_head(self.norm(x))


def build_mask(B: int, T: int, past: int, key_mask):
    """Boolean attention mask (B, 1, T, past+T), or None when plain causal SDPA is exact."""
    if key_mask is None and (past == 0 or T == 1):
        return None
    S = past + T
    causal = torch.ones(T, S, dtype=torch.bool).tril(diagonal=past)  # (T, S)
    mask = causal.expand(B, 1, T, S)
    if key_mask is not None:
        mask = (mask & key_mask[:, None, None, :S].bool()).clone()
        # a padding query would attend to nothing (NaN); let every token see itself
        mask[..., torch.arange(T), past + torch.arange(T)] = True
    return mask
