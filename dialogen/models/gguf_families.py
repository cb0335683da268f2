"""The GGUF architectures our decoder computes, with llama.cpp's key and tensor names and meanings.

For each architecture (`general.architecture`): the `{arch}.` metadata keys it reads besides the
common sizes, the `Config` fields they switch on, and the tensors of each layer. The meanings are
llama.cpp's (its `src/models/<arch>.cpp` and `convert_hf_to_gguf.py`), since a GGUF file holds
what llama.cpp computes: gemma's norm weights are stored as 1 + w; gemma2/3's query scale is
1/sqrt(head size) (1/sqrt(width / heads) for the 27B shapes), whatever `query_pre_attn_scalar` the
source model had; smollm3 skips rotary on every fourth layer; granite's `rope.scaling.finetuned`
false would switch rotary off. A key of the architecture not listed here is refused by
`gguf_config`, and so is a tensor not listed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .config_values import MAX_SIZE, shown

SWA = ("attention.sliding_window", "attention.sliding_window_pattern", "rope.freq_base_swa")


def value(path: Path, meta: dict, key: str, kind: str, default=None):
    """A metadata value checked: "size" a positive integer, "rate" a positive finite number."""
    v = meta.get(key, default)
    if v is None:
        raise UserError(f"{path}: metadata key {key} is missing")
    if kind == "size" and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_SIZE):
        raise UserError(f"{path}: metadata key {key} must be an integer in [1, {MAX_SIZE}], got {shown(v)}")
    if kind == "rate" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
        raise UserError(f"{path}: metadata key {key} must be a positive number, got {shown(v)}")
    return v


class Reader:
    """One file's `{arch}.` keys, each checked as it is read."""

    def __init__(self, path: Path, meta: dict, arch: str, n_layer: int, d_model: int, n_head: int):
        self.path, self.meta, self.arch = path, meta, arch
        self.n_layer, self.d_model, self.n_head = n_layer, d_model, n_head

    def key(self, k: str) -> str:
        return f"{self.arch}.{k}"

    def rate(self, k: str, default=None):
        return value(self.path, self.meta, self.key(k), "rate", default)

    def scale(self, k: str, default: float) -> float:
        """A multiplier where 0 (or absence) means llama.cpp leaves it out."""
        v = self.meta.get(self.key(k), 0)
        return default if v == 0 and not isinstance(v, bool) else float(self.rate(k))

    def window(self, default: int = 0) -> int:
        """`attention.sliding_window`; 0 (or absence without a default) is full attention."""
        k = self.key("attention.sliding_window")
        v = self.meta.get(k, default)
        return 0 if v == 0 and not isinstance(v, bool) else value(self.path, self.meta, k, "size", default)

    def sliding_layers(self, pattern: int) -> list[int]:
        """The sliding layers: `attention.sliding_window_pattern` as one flag per layer, or as n (the
        last layer of every n is global; 0: every layer slides), else the architecture's n."""
        k = self.key("attention.sliding_window_pattern")
        v = self.meta.get(k, pattern)
        if isinstance(v, list):
            if len(v) != self.n_layer or not all(isinstance(x, bool) for x in v):
                raise UserError(f"{self.path}: metadata key {k} must be {self.n_layer} true/false flags")
            return [i for i, x in enumerate(v) if x]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_SIZE:
            raise UserError(f"{self.path}: metadata key {k} must be a layer count or one flag per layer, got {shown(v)}")
        return [i for i in range(self.n_layer) if v == 0 or i % v < v - 1]

    def swa(self, pattern: int, default_window: int = 0, local_base: float | None = None) -> dict:
        """Sliding-window fields; `local_base`: the sliding layers' own plain rotary base (llama.cpp
        drops the rotary scaling there), None: they rotate as the full layers do."""
        w = self.window(default_window)
        if not w:
            return {}
        out = {"window": w, "window_layers": self.sliding_layers(pattern)}
        if local_base is not None:
            out["local_rope_theta"] = float(self.rate("rope.freq_base_swa", local_base))
        return out


def _gemma_scale(r: Reader, big: int) -> dict:
    """llama.cpp's query scale for gemma2/3: 1/sqrt(width / heads) for the 27B shape (`big` layers)."""
    return {"attn_scale": (r.d_model / r.n_head) ** -0.5} if r.n_layer == big else {}


def _gemma2(r: Reader) -> dict:
    """The sliding layers rotate as the full ones (scaling included) unless `rope.freq_base_swa`
    gives them a base of their own."""
    base, own = r.rate("rope.freq_base", 10000.0), r.meta.get(r.key("rope.freq_base_swa"))
    local = own is not None and own != base
    if local and r.meta.get(r.key("rope.scaling.type"), "none") != "none":
        raise UserError(f"{r.path}: metadata key {r.key('rope.freq_base_swa')} together with "
                        f"{r.key('rope.scaling.type')} is not supported")
    return {"act": "gelu_tanh", "embed_scale": r.d_model ** 0.5, "post_norms": True,
            "attn_softcap": float(r.rate("attn_logit_softcapping", 50.0)),
            "final_softcap": float(r.rate("final_logit_softcapping", 30.0)), **_gemma_scale(r, 46),
            **r.swa(2, 4096, base if local else None)}


def _gemma3(r: Reader) -> dict:
    cap = r.meta.get(r.key("final_logit_softcapping"))
    return {"act": "gelu_tanh", "embed_scale": r.d_model ** 0.5, "post_norms": True, "qk_norm": True,
            "final_softcap": float(r.rate("final_logit_softcapping")) if cap is not None else 0.0,
            **_gemma_scale(r, 62), **r.swa(6, 0, 10000.0)}


def _granite(r: Reader) -> dict:
    if r.meta.get(r.key("rope.scaling.finetuned"), True) is not True:
        raise UserError(f"{r.path}: metadata key {r.key('rope.scaling.finetuned')}="
                        f"{shown(r.meta[r.key('rope.scaling.finetuned')])} (granite without rotary) is not supported")
    return {"embed_scale": r.scale("embedding_scale", 1.0), "attn_scale": r.scale("attention.scale", 0.0),
            "residual_scale": r.scale("residual_scale", 1.0), "logit_scale": 1.0 / r.scale("logit_scale", 1.0)}


def _olmo2(r: Reader) -> dict:
    return {"qk_norm": True, "qk_norm_full": True, "pre_norms": False, "post_norms": True,
            **r.swa(4, 0, r.rate("rope.freq_base", 10000.0))}


@dataclass(frozen=True)
class Arch:
    name: str
    keys: tuple = ()  # `{arch}.` keys read besides the common ones (gguf_config.SIZES, RATES, HARMLESS)
    halves: bool = True  # q/k rows in Hugging Face's order (rotate halves); False: llama.cpp interleaves them
    math: Callable = lambda r: {}  # Reader -> the Config fields the architecture switches on
    biases: bool = False  # optional attention-output and MLP biases (llama.cpp's llama and granite graphs)
    rope_tensors: tuple = ()  # the rotary-factor tensors it may ship
    fused: bool = False  # attn_qkv and ffn_up holding [gate; up] (phi3)
    partial_rotary: bool = False  # rope.dimension_count may be smaller than the head


ARCHS = {a.name: a for a in (
    Arch("llama", halves=False, biases=True, rope_tensors=("rope_freqs",)),
    Arch("qwen2"),
    Arch("qwen3", math=lambda r: {"qk_norm": True}),
    Arch("gemma", math=lambda r: {"act": "gelu_tanh", "embed_scale": r.d_model ** 0.5}),
    Arch("gemma2", ("attn_logit_softcapping", "final_logit_softcapping", *SWA), math=_gemma2),
    Arch("gemma3", ("final_logit_softcapping", *SWA), math=_gemma3),
    Arch("phi3", ("attention.sliding_window", "rope.scaling.attn_factor"), fused=True, partial_rotary=True,
         rope_tensors=("rope_factors_long", "rope_factors_short"),
         math=lambda r: {"window": r.window(), "window_layers": list(range(r.n_layer))} if r.window() else {}),
    Arch("granite", ("embedding_scale", "attention.scale", "residual_scale", "logit_scale"), halves=False,
         biases=True, rope_tensors=("rope_freqs",), math=_granite),
    Arch("smollm3", halves=False, math=lambda r: {"nope_layers": [i for i in range(r.n_layer) if (i + 1) % 4 == 0]}),
    Arch("olmo2", SWA, math=_olmo2),
)}


def layer_tensors(cfg, arch: Arch) -> dict[str, tuple]:
    """Each layer's tensor names (without `blk.N.`) -> shapes, rows first."""
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    q, kv = cfg.n_head * hd, cfg.n_kv_head * hd
    out = {"attn_output.weight": (d, q), "ffn_down.weight": (d, f)}
    if cfg.pre_norms:
        out.update({"attn_norm.weight": (d,), "ffn_norm.weight": (d,)})
    if cfg.post_norms:
        out.update({"post_attention_norm.weight": (d,), "post_ffw_norm.weight": (d,)})
    if arch.fused:
        out.update({"attn_qkv.weight": (q + 2 * kv, d), "ffn_up.weight": (2 * f, d)})
    else:
        out.update({"attn_q.weight": (q, d), "attn_k.weight": (kv, d), "attn_v.weight": (kv, d),
                    "ffn_gate.weight": (f, d), "ffn_up.weight": (f, d)})
    if cfg.attn_bias:
        out.update({"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)})
    if cfg.o_bias:
        out["attn_output.bias"] = (d,)
    if cfg.mlp_bias:
        out.update({"ffn_gate.bias": (f,), "ffn_up.bias": (f,), "ffn_down.bias": (d,)})
    if cfg.qk_norm:  # over each head's values, or over all heads at once (olmo2)
        out.update({"attn_q_norm.weight": (q if cfg.qk_norm_full else hd,),
                    "attn_k_norm.weight": (kv if cfg.qk_norm_full else hd,)})
    return out
