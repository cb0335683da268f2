"""Decoder-only transformer: the Llama and GPT-2 families from one config, with a KV cache.

Llama: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, optional tied head.
GPT-2: LayerNorm with bias, learned positions, GELU (tanh) MLP, fused qkv with bias.
Parameter names follow Hugging Face's, except that q/k/v (llama) are fused into `qkv` and
gate/up into `gate_up`; `models/loading.py` maps between the two layouts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .cache import CacheBatch, KVCache
from .family import DECODER
from .layers import Embedding, Linear, RMSNorm, skip_init

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


@dataclass
class Step:
    """What every layer of one forward call shares."""

    rope: tuple | None  # (cos, sin), each (B, 1, T, head_dim); None for learned positions
    cache: object  # KVCache, CacheBatch or None
    mask: torch.Tensor | None  # (B, 1, T, S) boolean, or None for plain causal attention
    key_mask: torch.Tensor | None  # (B, S) real key positions, or None
    native: object = None  # what the swapped-in native modules share for a native step (models/native.py)


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
        bias = cfg.attn_bias or cfg.arch == "gpt2"
        self.qkv = Linear(cfg.d_model, (nh + 2 * nkv) * hd, bias=bias)
        self.o_proj = Linear(nh * hd, cfg.d_model, bias=cfg.arch == "gpt2")

    def forward(self, x, norm, step: Step):
        """x + attention over norm(x)."""
        cfg = self.cfg
        B, T, _ = x.shape
        hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
        qkv = self.qkv(x, norm=norm)  # (B, T, (nh + 2 nkv) hd)
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, nkv, hd).transpose(1, 2)
        v = v.view(B, T, nkv, hd).transpose(1, 2)
        if step.rope is not None:
            q, k = apply_rope(q, *step.rope), apply_rope(k, *step.rope)
        cache, mask = step.cache, step.mask
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
        return self.o_proj(y.transpose(1, 2).reshape(B, T, nh * hd), residual=x)


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

    def forward(self, x, norm):
        """x + MLP(norm(x))."""
        if self.arch == "llama":
            return self.down(self.gate_up(x, norm=norm), act="swiglu", residual=x)
        return self.down(self.up(x, norm=norm), act="gelu", residual=x)


def _norm(cfg: Config):
    if cfg.arch == "llama":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.norm1, self.attn = _norm(cfg), Attention(cfg, layer)
        self.norm2, self.mlp = _norm(cfg), MLP(cfg)

    def forward(self, x, step: Step):
        return self.mlp(self.attn(x, self.norm1, step), self.norm2)


class Transformer(nn.Module):
    """`forward(ids, cache, positions, key_mask) -> logits (B, T, V)`: the only forward pass.

    Training (`hidden`), prefill, decode, beam rows, left-padded batches and the server's many
    conversations (a `CacheBatch`) all run it. With a cache, the T new tokens are appended after
    the cache's valid ones and the cache advances. `key_mask` (B, S) marks real (non-padding) key
    positions over the whole sequence including the cache, for left-padded batches; `positions`
    (B, T) then gives each token's position counting real tokens only.
    """

    family = DECODER
    reuses_prefix = True  # a kept cache is extended with a turn's new tokens (models/family.py)
    native = None  # what `models.native.swap_in` installed (its `Swap`), or None: the reference modules
    adapter = None  # the LoRA adapter hooked onto the Linears (`models.lora.Adapter.attach`), or None

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.arch == "gpt2":
            self.pos_embed = Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = _norm(cfg)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @classmethod
    def without_init(cls, cfg: Config) -> "Transformer":
        """Parameters allocated but not initialised, for weights loaded next. (Quicker than the meta
        device, whose first use in a process imports torch's reference ops: about a second.)"""
        token = skip_init.set(True)
        try:
            return cls(cfg)
        finally:
            skip_init.reset(token)

    def materialize(self) -> "Transformer":
        """The reference modules back in place of the swapped-in native ones, with float32 weights
        (dequantized from blocks where those are all the model holds)."""
        if self.native is not None:
            self.native.unswap(self)
        return self

    def train(self, mode: bool = True):
        if mode:  # training runs the reference
            self.materialize()
        return super().train(mode)

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

    def forward(self, ids, cache=None, positions=None, key_mask=None):
        return self.lm_head(self.trunk(ids, cache, positions, key_mask), norm=self.norm)

    def next_logits(self, ids, cache=None):
        """The next-token logits (B, V) after `ids` (B, T): `forward(ids, cache)[:, -1]`, with the head
        applied at the last position only (a prompt's other positions would cost T - 1 head products).
        With a CacheBatch (ids (R, 1)), one row per cache: after its last new token."""
        x = self.trunk(ids, cache)
        x = x[cache.ends] if isinstance(cache, CacheBatch) else x[:, -1:]
        return self.lm_head(x, norm=self.norm)[:, -1]

    def hidden(self, ids):
        """Final-norm hidden states (B, T, d) of a right-padded or unpadded batch, no cache (training)."""
        return self.norm(self.trunk(ids))

    def trunk(self, ids, cache=None, positions=None, key_mask=None):
        """The residual stream after the last block, (B, T, d)."""
        B, T = ids.shape
        if T > 1 and self.native is not None and self.native.prompt_as_rows(cache, positions, key_mask):
            # a prompt: rows of one native step (a CacheBatch of one cache with T new tokens)
            return self.trunk(ids.view(T, 1), CacheBatch([cache], [T])).view(1, T, -1)
        if positions is None:
            positions = cache.positions(B, T) if cache is not None else torch.arange(T).expand(B, T)
        x = self.embed(ids)
        rope = None
        if self.cfg.arch == "gpt2":
            if int(positions.max()) >= self.cfg.max_seq_len:
                raise ValueError(f"sequence longer than the model's {self.cfg.max_seq_len} positions")
            x = x + self.pos_embed(positions)
        else:
            rope = rope_tables(self.cfg, positions)
        if cache is not None:
            cache.reserve(T)
        step = self._step(B, T, rope, cache, key_mask)
        for block in self.blocks:
            x = block(x, step)
        if cache is not None:
            cache.advance(T)
        return x

    def _step(self, B: int, T: int, rope, cache, key_mask) -> Step:
        native = None if self.native is None else self.native.step(T, rope, cache, key_mask)
        if native is not None:
            return Step(rope, cache, None, key_mask, native)
        if isinstance(cache, CacheBatch):
            raise RuntimeError("a CacheBatch step needs the native kernels and one new token per row")
        past = cache.length if cache is not None else 0
        return Step(rope, cache, build_mask(B, T, past, key_mask), key_mask)


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
