"""Rotary position tables: the base frequencies and their scalings (linear, dynamic NTK, YaRN,
LongRoPE, Llama 3), as transformers' `modeling_rope_utils` defines them.

`rope` is a config's `rope_parameters` (or `rope_scaling`) dict without `rope_theta`; an empty
dict is the plain rotary of RoFormer. Each scaling returns (inverse frequencies (dim/2,), the
factor cos and sin are multiplied by).
"""

from __future__ import annotations

import math

import torch

KINDS = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")  # config.json's rope_type values
# besides these, "freq_factors" ({"factors": [dim/2 divisors]}) is how a GGUF file ships Llama 3.1's scaling
# the keys each kind reads besides rope_type/type and rope_theta (others are refused by the family table)
PARAMS = {"default": (), "linear": ("factor",), "dynamic": ("factor",),
          "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                   "mscale", "mscale_all_dim", "truncate"),
          "longrope": ("factor", "original_max_position_embeddings", "attention_factor", "short_factor", "long_factor"),
          "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def kind(rope: dict) -> str:
    return rope.get("rope_type", rope.get("type", "default")) or "default"


def _base(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def inv_freq(rope: dict, theta: float, dim: int, max_pos: int, seq_len: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin factor for a call whose furthest position is seq_len - 1
    (dynamic NTK and LongRoPE depend on it; the others do not)."""
    k = kind(rope)
    if k == "default":
        return _base(theta, dim), 1.0
    if k == "linear":
        return _base(theta, dim) / rope["factor"], 1.0
    if k == "dynamic":  # the base grows once the sequence passes max_pos
        n = max(seq_len, max_pos)
        f = rope["factor"]
        return _base(theta * ((f * n / max_pos) - (f - 1)) ** (dim / (dim - 2)), dim), 1.0
    if k == "llama3":
        return _llama3(rope, theta, dim), 1.0
    if k == "freq_factors":  # a GGUF file's rope_freqs tensor: each frequency's divisor
        return _base(theta, dim) / torch.tensor(rope["factors"], dtype=torch.float32), 1.0
    if k == "yarn":
        return _yarn(rope, theta, dim, max_pos)
    if k == "longrope":
        return _longrope(rope, theta, dim, max_pos, seq_len)
    raise ValueError(f"unknown rope type {k!r}")


def _llama3(rope: dict, theta: float, dim: int) -> torch.Tensor:
    inv = _base(theta, dim)
    factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > old / lo, inv / factor, inv)  # long wavelengths: interpolated
    smooth = (old / wavelen - lo) / (hi - lo)
    mid = (wavelen >= old / hi) & (wavelen <= old / lo)  # between: blended
    return torch.where(mid, (1 - smooth) * out / factor + smooth * out, out)


def _yarn_mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def _yarn(rope: dict, theta: float, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    old = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or max_pos / old
    att = rope.get("attention_factor")
    if att is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        att = _yarn_mscale(factor, m) / _yarn_mscale(factor, m_all) if m and m_all else _yarn_mscale(factor)
    fast, slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def dim_of(rotations):  # the dimension that turns `rotations` times over the original context
        return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(fast), dim_of(slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos = theta ** (torch.arange(0, dim, 2).float() / dim)
    keep = 1 - ramp  # 1: extrapolated (high frequencies), 0: interpolated
    return (1.0 / (factor * pos)) * (1 - keep) + (1.0 / pos) * keep, float(att)


def _longrope(rope: dict, theta: float, dim: int, max_pos: int, seq_len: int) -> tuple[torch.Tensor, float]:
    old = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or max_pos / old
    att = rope.get("attention_factor")
    if att is None:
        att = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old))
    ext = torch.tensor(rope["long_factor"] if seq_len > old else rope["short_factor"], dtype=torch.float32)
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext * theta ** shape), float(att)


def tables(rope: dict, theta: float, dim: int, max_pos: int, positions: torch.Tensor):
    """cos and sin (B, 1, T, dim) for integer positions (B, T)."""
    seq_len = int(positions.max()) + 1 if positions.numel() else 0
    inv, scale = inv_freq(rope, theta, dim, max_pos, seq_len)
    freqs = positions.float()[..., None] * inv  # (B, T, dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos() * scale, emb.sin() * scale


def switches(rope: dict) -> int | None:
    """LongRoPE's switch point: positions up to it use the short factors, a sequence past it the long
    ones for every position (transformers recomputes the cache there). None for other kinds."""
    return rope["original_max_position_embeddings"] if kind(rope) == "longrope" else None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., T, hd) rotated on its first cos.shape[-1] dims (partial rotary keeps the rest)."""
    d = cos.shape[-1]
    r, rest = x[..., :d], x[..., d:]
    half = d // 2
    rot = torch.cat([-r[..., half:], r[..., :half]], dim=-1)
    out = (r * cos + rot * sin).to(x.dtype)
    return out if rest.shape[-1] == 0 else torch.cat([out, rest], dim=-1)
