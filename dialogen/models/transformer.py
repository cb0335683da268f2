"""Decoder-only transformer: every supported family's math from one config, with a KV cache.

Rotary decoders (`arch="llama"`): pre-norm blocks of grouped-query attention and a gated MLP, with
the variations the families of `models/families.py` switch on from their config.json: rotary
scalings (models/rope.py), biases, the MLP activation, sliding-window layers, q/k norms, RMSNorm
scaled by (1 + w), scaled embeddings, attention and final logit soft-capping, norms on the
attention and MLP outputs, residual and logit multipliers.
GPT-2 (`arch="gpt2"`): LayerNorm with bias, learned positions, GELU (tanh) MLP, fused qkv with bias.
Parameter names follow Hugging Face's, except that q/k/v are fused into `qkv` and gate/up into
`gate_up`; `models/hf.py` maps between the two layouts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import heap, rope as rotary
from .cache import CacheBatch, KVCache
from .family import DECODER
from .layers import Embedding, Linear, RMSNorm, skip_init
from .recompute import recomputed

ARCHS = ("llama", "gpt2")
ACTS = ("silu", "gelu", "gelu_tanh", "relu")  # the MLP's activation (gated for llama, plain for gpt2)


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
    attn_bias: bool = False  # q, k and v biases (gpt2 always has every bias)
    o_bias: bool = False  # the attention output's bias
    mlp_bias: bool = False
    act: str = "silu"  # llama: act(gate) * up; gpt2: act(up) (gelu_tanh)
    rope: dict = field(default_factory=dict)  # rotary scaling (models/rope.py); {} is plain rotary
    rotary_dim: int = 0  # dims of each head that rotate; 0 -> head_dim
    local_rope_theta: float = 0.0  # rotary base of the sliding-window layers (plain rotary); 0 -> rope_theta
    window: int = 0  # sliding window: a query at i sees keys j with i - window < j <= i
    window_layers: list = field(default_factory=list)  # the layers that slide
    nope_layers: list = field(default_factory=list)  # the layers without rotary positions (smollm3)
    norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + weight): 1 for gemma
    embed_scale: float = 1.0  # embeddings times this (gemma: sqrt(d_model))
    qk_norm: bool = False  # RMSNorm over each head's q and k before rotary
    qk_norm_full: bool = False  # the q/k norm spans all heads at once (olmo2)
    pre_norms: bool = True  # norms on each block's inputs (olmo2 has output norms only)
    post_norms: bool = False  # norms on the attention and MLP outputs, before the residual add
    attn_scale: float = 0.0  # softmax scale of q.k; 0 -> head_dim ** -0.5
    attn_softcap: float = 0.0  # scores -> cap * tanh(scores / cap); 0: none
    final_softcap: float = 0.0  # the same on the logits
    residual_scale: float = 1.0  # each block output times this before the residual add
    logit_scale: float = 1.0  # logits times this
    extra: dict = field(default_factory=dict)  # "hf": the config.json the model was read from

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; supported: {', '.join(ARCHS)}")
        if self.head_dim == 0:
            self.head_dim = self.d_model // self.n_head
        if self.rotary_dim == 0:
            self.rotary_dim = self.head_dim
        if self.n_head % self.n_kv_head:
            raise ValueError("n_head must be a multiple of n_kv_head")
        if self.act not in ACTS:
            raise ValueError(f"unknown activation {self.act!r}; supported: {', '.join(ACTS)}")

    def sliding(self, layer: int) -> bool:
        return self.window > 0 and layer in self.window_layers


def rope_tables(cfg: Config, positions: torch.Tensor, local: bool = False):
    """cos/sin of shape (B, 1, T, rotary_dim) for integer positions (B, T); `local`: the
    sliding-window layers' own base (gemma3)."""
    if local:
        return rotary.tables({}, cfg.local_rope_theta, cfg.rotary_dim, cfg.max_seq_len, positions)
    return rotary.tables(cfg.rope, cfg.rope_theta, cfg.rotary_dim, cfg.max_seq_len, positions)


apply_rope = rotary.rotate


@dataclass
class Step:
    """What every layer of one forward call shares."""

    rope: tuple | None  # (cos, sin), each (B, 1, T, rotary_dim); None for learned positions
    cache: object  # KVCache, CacheBatch or None
    mask: torch.Tensor | None  # (B, 1, T, S) boolean, or None for plain causal attention
    key_mask: torch.Tensor | None  # (B, S) real key positions, or None
    native: object = None  # what the swapped-in native modules share for a native step (models/native.py)
    window_mask: torch.Tensor | None = None  # the sliding-window layers' mask, as `mask`
    local_rope: tuple | None = None  # the sliding-window layers' (cos, sin) when their base differs


def attend(q, k, v, mask, scale: float, softcap: float = 0.0):
    """softmax(scale * q.k, capped) . v over (B, heads, T, hd) q and (B, kv heads, S, hd) k, v.
    `mask` (B, 1, T, S) boolean, or None for causal attention over exactly these T keys."""
    T, nh, nkv = q.shape[2], q.shape[1], k.shape[1]
    if not softcap:
        if T == 1 and mask is None and nkv != nh:
            # one query per head: each kv head's group of query heads attends as a (group, hd) block
            B, hd = q.shape[0], q.shape[-1]
            return F.scaled_dot_product_attention(q.view(B, nkv, nh // nkv, hd), k, v, scale=scale).view(B, nh, 1, hd)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                              scale=scale, enable_gqa=nkv != nh)
    k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
    s = torch.tanh((q @ k.transpose(-1, -2)) * scale / softcap) * softcap  # (B, nh, T, S)
    if mask is None:
        S = k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.sliding = cfg.sliding(layer)
        self.rotary = layer not in cfg.nope_layers
        hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
        gpt2 = cfg.arch == "gpt2"
        self.qkv = Linear(cfg.d_model, (nh + 2 * nkv) * hd, bias=cfg.attn_bias or gpt2)
        self.o_proj = Linear(nh * hd, cfg.d_model, bias=cfg.o_bias or gpt2)
        if cfg.qk_norm:  # over each head's hd values, or over all heads' (olmo2)
            self.q_norm, self.k_norm = (_norm(cfg, nh * hd), _norm(cfg, nkv * hd)) if cfg.qk_norm_full else \
                (_norm(cfg, hd), _norm(cfg, hd))
        self.scale = cfg.attn_scale or hd ** -0.5

    def forward(self, x, norm, step: Step, post=None):
        """x + post(attention over norm(x)); without `post` the residual add is fused into o_proj."""
        cfg = self.cfg
        B, T, _ = x.shape
        hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
        qkv = self.qkv(x, norm=norm)  # (B, T, (nh + 2 nkv) hd)
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        if cfg.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, nkv, hd).transpose(1, 2)
        v = v.view(B, T, nkv, hd).transpose(1, 2)
        if cfg.qk_norm and not cfg.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        rope = step.local_rope if self.sliding and step.local_rope is not None else step.rope
        if rope is not None and self.rotary:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        cache = step.cache
        if cache is not None:
            start = cache.length
            cache.k[self.layer][:, :, start : start + T] = k
            cache.v[self.layer][:, :, start : start + T] = v
            k = cache.k[self.layer][:, :, : start + T]
            v = cache.v[self.layer][:, :, : start + T]
        y = attend(q, k, v, step.window_mask if self.sliding else step.mask, self.scale, cfg.attn_softcap)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)
        return self.o_proj(y, residual=x) if post is None else x + post(self.o_proj(y))

class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.arch = cfg.arch
        if cfg.arch == "llama":
            self.gate_up = Linear(cfg.d_model, 2 * cfg.d_ff, bias=cfg.mlp_bias)
            self.down = Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)
            self.act = "swiglu" if cfg.act == "silu" else f"glu_{cfg.act}"  # act(gate) * up
        else:
            self.up = Linear(cfg.d_model, cfg.d_ff)
            self.down = Linear(cfg.d_ff, cfg.d_model)
            self.act = "gelu"

    def forward(self, x, norm, post=None):
        """x + post(MLP(norm(x))); without `post` the residual add is fused into down."""
        h = self.gate_up(x, norm=norm) if self.arch == "llama" else self.up(x, norm=norm)
        return self.down(h, act=self.act, residual=x) if post is None else x + post(self.down(h, act=self.act))


def _norm(cfg: Config, dim: int | None = None):
    if cfg.arch == "llama":
        return RMSNorm(dim or cfg.d_model, cfg.norm_eps, cfg.norm_offset)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.norm1 = _norm(cfg) if cfg.pre_norms else None
        self.norm2 = _norm(cfg) if cfg.pre_norms else None
        self.attn, self.mlp = Attention(cfg, layer), MLP(cfg)
        if cfg.post_norms:  # gemma2/3, olmo2: each branch's output is normed before the residual add
            self.post_attn_norm, self.post_mlp_norm = _norm(cfg), _norm(cfg)

    def forward(self, x, step: Step):
        post1, post2 = self._posts()
        return self.mlp(self.attn(x, self.norm1, step, post1), self.norm2, post2)

    def _posts(self):
        """What each branch's output goes through before the residual add (None: nothing)."""
        s = self.attn.cfg.residual_scale
        if hasattr(self, "post_attn_norm"):
            if s != 1:
                return (lambda y: self.post_attn_norm(y) * s), (lambda y: self.post_mlp_norm(y) * s)
            return self.post_attn_norm, self.post_mlp_norm
        return ((lambda y: y * s), (lambda y: y * s)) if s != 1 else (None, None)


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
    checkpointing = False  # training: recompute each block's activations in the backward pass
    frozen_blocks = False  # a LoRA run's base: its swapped-in blocks stay in training (native.BlockProduct)

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
        """The model with its Embedding and Linear weights as meta-device placeholders (`layers.skip_init`),
        for weights assigned next; the other parameters allocated but not initialised."""
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
        if mode and not self.frozen_blocks:  # training runs the reference
            self.materialize()
        return super().train(mode)

    def new_cache(self, batch: int = 1) -> KVCache:
        return KVCache(self.cfg, batch, dtype=self.norm.weight.dtype)

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
        return self.head(self.trunk(ids, cache, positions, key_mask), norm=self.norm)

    def head(self, h, norm=None):
        """Logits of hidden states h (..., d): the output layer, then the family's scale and cap."""
        logits = self.lm_head(h, norm=norm)
        cfg = self.cfg
        if cfg.logit_scale != 1:
            logits = logits * cfg.logit_scale
        if cfg.final_softcap:
            logits = torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return logits

    def next_logits(self, ids, cache=None):
        """The next-token logits (B, V) after `ids` (B, T): `forward(ids, cache)[:, -1]`, with the head
        applied at the last position only (a prompt's other positions would cost T - 1 head products).
        With a CacheBatch (ids (R, 1)), one row per cache: after its last new token."""
        x = self.trunk(ids, cache)
        x = x[cache.ends] if isinstance(cache, CacheBatch) else x[:, -1:]
        return self.head(x, norm=self.norm)[:, -1]

    def hidden(self, ids, segments=None):
        """Final-norm hidden states (B, T, d) of a right-padded or unpadded batch, no cache (training);
        `segments` (B, T): packed examples, each attending within itself from position 0."""
        return self.norm(self.trunk(ids, segments=segments))

    def trunk(self, ids, cache=None, positions=None, key_mask=None, segments=None):
        """The residual stream after the last block, (B, T, d)."""
        B, T = ids.shape
        if segments is not None:  # positions restart at each segment's first token
            idx = torch.arange(T).expand(B, T)
            starts = torch.ones(B, T, dtype=torch.bool)
            starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
            positions = idx - torch.where(starts, idx, 0).cummax(dim=1).values
        if T > 1 and self.native is not None and self.native.prompt_as_rows(cache, positions, key_mask):
            # a prompt: rows of one native step (a CacheBatch of one cache with T new tokens)
            x = self.trunk(ids.view(T, 1), CacheBatch([cache], [T])).view(1, T, -1)
            heap.after_rows(T)  # a long prompt's activations (tens of MB) leave the process
            return x
        if self._recomputes(cache, T):
            if positions is not None or key_mask is not None:
                raise ValueError("a padded batch cannot pass LongRoPE's switch point")
            past, cache.length = cache.ids[:, : cache.length].clone(), 0
            return self.trunk(torch.cat([past, ids], dim=1), cache)[:, -T:]
        if positions is None:
            positions = cache.positions(B, T) if cache is not None else torch.arange(T).expand(B, T)
        if getattr(cache, "ids", None) is not None:
            cache.reserve(T)
            cache.ids[:, cache.length : cache.length + T] = ids
        x = self.embed(ids)
        cfg = self.cfg
        if cfg.embed_scale != 1:
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        rope = None
        if cfg.arch == "gpt2":
            if int(positions.max()) >= cfg.max_seq_len:
                raise ValueError(f"sequence longer than the model's {cfg.max_seq_len} positions")
            x = x + self.pos_embed(positions)
        else:
            rope = rope_tables(cfg, positions)
        if cache is not None:
            cache.reserve(T)
        step = self._step(B, T, rope, cache, key_mask)
        if segments is not None:  # attention within each segment: (B, 1, T, T)
            same = segments[:, None, :, None] == segments[:, None, None, :]
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            step.mask = same & (causal if step.mask is None else step.mask)
            step.window_mask = None if step.window_mask is None else same & step.window_mask
        if cfg.local_rope_theta:
            step.local_rope = rope_tables(cfg, positions, local=True)
        for i, block in enumerate(self.blocks):
            if self.checkpointing and torch.is_grad_enabled() and (x.requires_grad or self._trains(i)):
                x = recomputed(block, x, step)  # keep each block's input only; redo it in backward
            else:
                x = block(x, step)
        if cache is not None:
            cache.advance(T)
        return x

    def _trains(self, i: int) -> bool:
        """Whether block i has a weight that takes a gradient: its own, or an adapter's on its Linears
        (a frozen block over a frozen input, `--freeze-layers`, is run plainly: nothing in it trains)."""
        if any(p.requires_grad for p in self.blocks[i].parameters()):
            return True
        return self.adapter is not None and self.adapter.trains(f"blocks.{i}.")

    def _recomputes(self, cache, T: int) -> bool:
        """LongRoPE: once a sequence passes the switch point every position takes the long factors,
        so a cache filled before it is computed again (as transformers does)."""
        at = rotary.switches(self.cfg.rope)
        return at is not None and isinstance(cache, KVCache) and 0 < cache.length <= at < cache.length + T

    def _step(self, B: int, T: int, rope, cache, key_mask) -> Step:
        native = None if self.native is None else self.native.step(T, rope, cache, key_mask)
        if native is not None:
            return Step(rope, cache, None, key_mask, native)
        if isinstance(cache, CacheBatch):
            raise RuntimeError("a CacheBatch step needs the native kernels and one new token per row")
        past = cache.length if cache is not None else 0
        window = self.cfg.window if self.cfg.window_layers else 0
        return Step(rope, cache, build_mask(B, T, past, key_mask), key_mask,
                    window_mask=build_mask(B, T, past, key_mask, window) if window else None)


def build_mask(B: int, T: int, past: int, key_mask, window: int = 0):
    """Boolean attention mask (B, 1, T, past+T), or None when plain causal SDPA is exact. `window`:
    a query at cache index i sees keys j with i - window < j <= i (transformers' sliding window)."""
    S = past + T
    windowed = 0 < window < S
    if key_mask is None and (past == 0 or T == 1) and not windowed:
        return None
    causal = torch.ones(T, S, dtype=torch.bool).tril(diagonal=past)  # (T, S)
    if windowed:
        causal &= ~torch.ones(T, S, dtype=torch.bool).tril(diagonal=past - window)
    mask = causal.expand(B, 1, T, S)
    if key_mask is not None:
        mask = (mask & key_mask[:, None, None, :S].bool()).clone()
        # a padding query would attend to nothing (NaN); let every token see itself
        mask[..., torch.arange(T), past + torch.arange(T)] = True
    return mask
