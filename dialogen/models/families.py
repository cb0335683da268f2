"""The model families read from a Hugging Face config.json: one table, one reader.

Each family (config.json `model_type`) lists the keys it reads and what they switch on in
`transformer.Config`. A key neither read nor known not to change the math (`INERT`, and the
family's own inert keys) is refused in one line naming the file and the key, as is a read key
whose value asks for math that is not implemented: a model loads exact or not at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from . import rope as rotary
from .config_values import MAX_SIZE, shown
from .transformer import Config

# keys of any config.json that change nothing at inference: bookkeeping, token ids, dropout, init
INERT = frozenset({
    "architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "output_attentions",
    "output_hidden_states", "return_dict", "use_return_dict", "pretraining_tp", "id2label", "label2id", "problem_type",
    "tokenizer_class", "task_specific_params", "auto_map", "chunk_size_feed_forward", "is_encoder_decoder",
    "tie_encoder_decoder", "cache_implementation", "_attn_implementation_autoset", "max_length", "prefix",
    "finetuning_task", "torchscript", "use_bfloat16", "pruned_heads", "num_labels", "model_name",
    "gradient_checkpointing", "output_past", "is_decoder", "tf_legacy_loss", "_commit_hash", "xla_device",
    # generation settings older config.json files carry (they pick tokens, not logits)
    "bad_words_ids", "num_beams", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "early_stopping", "min_length", "num_return_sequences",
})
# Config field -> config.json key, for the sizes every rotary family reads
ROTARY_SIZES = {"vocab_size": "vocab_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
                "n_kv_head": "num_key_value_heads", "d_model": "hidden_size", "d_ff": "intermediate_size",
                "head_dim": "head_dim", "max_seq_len": "max_position_embeddings", "norm_eps": "rms_norm_eps",
                "rope_theta": "rope_theta"}
GPT2_SIZES = {"vocab_size": "vocab_size", "n_layer": "n_layer", "n_head": "n_head", "n_kv_head": "n_head",
              "d_model": "n_embd", "d_ff": "n_inner", "head_dim": "n_embd", "max_seq_len": "n_positions",
              "norm_eps": "layer_norm_epsilon"}
ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor")
ACT = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
       "gelu_fast": "gelu_tanh", "relu": "relu"}
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class Family:
    name: str  # config.json model_type
    reads: tuple  # keys read besides the sizes (a None value is the family's default)
    features: str  # what the family switches on, for docs/models.md
    inert: tuple = ()  # the family's own keys that change nothing
    defaults: tuple = ()  # (key, value) of its transformers config class where a key is absent


def _defaults(kv=None, head_dim=None, eps=1e-6, tied=False, positions=2048) -> tuple:
    """A rotary family's defaults for absent size keys (None: from the other sizes)."""
    return (("num_key_value_heads", kv), ("head_dim", head_dim), ("rms_norm_eps", eps),
            ("tie_word_embeddings", tied), ("max_position_embeddings", positions))


FAMILIES = {f.name: f for f in (
    Family("llama", (*ROPE_KEYS, "attention_bias", "mlp_bias", "hidden_act", "rope_interleaved"),
           "rotary scalings (linear, dynamic, yarn, llama3, longrope), attention_bias (q, k, v, o), mlp_bias, hidden_act",
           ("is_llama_config",), _defaults()),  # (SmolLM2's config.json says is_llama_config)
    Family("mistral", (*ROPE_KEYS, "hidden_act", "sliding_window"), "sliding window on every layer",
           defaults=_defaults(kv=8, positions=131072)),
    Family("qwen2", (*ROPE_KEYS, "hidden_act", "use_sliding_window", "sliding_window", "max_window_layers",
                     "layer_types"), "q/k/v biases; sliding window on the layers from max_window_layers on",
           defaults=_defaults(kv=32, positions=32768)),
    Family("qwen3", (*ROPE_KEYS, "hidden_act", "attention_bias", "use_sliding_window", "sliding_window",
                     "max_window_layers", "layer_types"), "q/k RMSNorm per head; qwen2's sliding window",
           defaults=_defaults(kv=32, head_dim=128, positions=32768)),
    Family("gemma", (*ROPE_KEYS, "hidden_act", "attention_bias", "use_bidirectional_attention"),
           "embeddings times sqrt(d), RMSNorm times (1 + w), GELU (tanh) gated MLP", ("hidden_activation",),
           _defaults(kv=16, head_dim=256, tied=True, positions=8192)),
    Family("gemma2", (*ROPE_KEYS, "hidden_activation", "attention_bias", "query_pre_attn_scalar", "sliding_window",
                      "layer_types", "final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention"),
           "gemma's, plus attention and final logit soft-capping, query_pre_attn_scalar, alternating sliding "
           "window, norms on the attention and MLP outputs", ("hidden_act", "sliding_window_size"),
           _defaults(kv=4, head_dim=256, tied=True, positions=8192)),
    Family("gemma3_text", (*ROPE_KEYS, "rope_local_base_freq", "hidden_activation", "attention_bias",
                           "query_pre_attn_scalar", "sliding_window", "sliding_window_pattern", "_sliding_window_pattern",
                           "layer_types", "final_logit_softcapping", "attn_logit_softcapping",
                           "use_bidirectional_attention"),
           "gemma2's, plus q/k norms and a local rotary base on the sliding layers (one in sliding_window_pattern "
           "is global)", ("hidden_act",), _defaults(kv=4, head_dim=256, tied=True, positions=131072)),
    Family("phi3", (*ROPE_KEYS, "original_max_position_embeddings", "hidden_act", "sliding_window"),
           "fused qkv_proj and gate_up_proj, longrope, partial rotary",
           ("attention_bias",), _defaults(eps=1e-5, positions=4096)),  # phi3 has no biases whatever it says
    Family("granite", (*ROPE_KEYS, "attention_bias", "mlp_bias", "hidden_act", "embedding_multiplier",
                       "attention_multiplier", "residual_multiplier", "logits_scaling"),
           "llama's, plus embedding, attention, residual and logit multipliers", defaults=_defaults()),
    Family("smollm3", (*ROPE_KEYS, "attention_bias", "mlp_bias", "hidden_act", "no_rope_layers",
                       "no_rope_layer_interval", "use_sliding_window", "sliding_window", "layer_types"),
           "llama's, plus layers without rotary (no_rope_layers) and sliding window on those",
           ("max_window_layers",), _defaults(kv=4, tied=True, positions=32768)),
    Family("olmo2", (*ROPE_KEYS, "attention_bias", "hidden_act"),
           "norms on the attention and MLP outputs only, q/k RMSNorm across all heads",
           defaults=_defaults(eps=1e-5)),
    Family("gpt2", ("activation_function", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
                    "reorder_and_upcast_attn", "add_cross_attention"),
           "learned positions, LayerNorm, GELU (tanh) MLP, fused biased projections",
           ("n_ctx", "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
            "summary_first_dropout")),
)}


def check_config_values(c: dict, keys: dict, where: str):
    """Types and ranges of a config.json's values, before any arithmetic on them: sizes are
    positive integers, rates positive finite numbers, switches booleans, heads divide evenly."""
    for field, key in keys.items():
        v = c.get(key)
        if v is None or (field == "head_dim" and key == "head_dim" and v == 0):
            continue
        if field in ("rope_theta", "norm_eps"):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise UserError(f"{where}: {key} must be a positive number, got {shown(v)}")
        elif isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_SIZE:
            raise UserError(f"{where}: {key} must be an integer in [1, {MAX_SIZE}], got {shown(v)}")
    for key in ("tie_word_embeddings", "attention_bias"):
        if c.get(key) is not None and not isinstance(c[key], bool):
            raise UserError(f"{where}: {key} must be true or false, got {shown(c[key])}")
    heads, kv = c.get(keys["n_head"]), c.get(keys["n_kv_head"]) or c.get(keys["n_head"])
    width = c.get(keys["d_model"])
    if heads and not c.get("head_dim") and width % heads:
        raise UserError(f"{where}: {keys['d_model']}={width} is not divisible by {keys['n_head']}={heads}")
    if heads and kv and heads % kv:
        raise UserError(f"{where}: {keys['n_head']}={heads} is not a multiple of {keys['n_kv_head']}={kv}")


def refuse(where: str, key: str, value, why: str):
    raise UserError(f"{where}: {key}={shown(value)} is not supported ({why})")


def config_from_hf(c: dict, where: Path) -> tuple[Config | dict, str]:
    """(Config, its loader's name) from a config.json's values; anything unread is refused."""
    mt = c.get("model_type")
    if mt == "dialogen-rnn":
        return c, "rnn"
    fam = FAMILIES.get(mt)
    file = f"{where}/config.json"
    if fam is None:
        raise UserError(f"{file}: model_type {mt!r} is not supported; supported: {', '.join(FAMILIES)}")
    sizes = GPT2_SIZES if mt == "gpt2" else ROTARY_SIZES
    for key, v in c.items():
        if key not in INERT and key not in fam.inert and key not in fam.reads and key not in sizes.values() \
                and key != "tie_word_embeddings" and v is not None:
            refuse(file, key, v, f"model_type {mt} does not read it here, and it may change the math")
    check_config_values(c, sizes, file)
    raw, c = c, {**{k: v for k, v in fam.defaults if k not in c}, **c}  # absent keys: the class's defaults
    tied = c.get("tie_word_embeddings")
    try:
        if mt == "gpt2":
            return Config(**_gpt2(c, file), tie_embeddings=True if tied is None else tied, extra={"hf": raw}), "gpt2"
        heads = c["num_attention_heads"]
        kw = dict(arch="llama", vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"], n_head=heads,
                  n_kv_head=c.get("num_key_value_heads") or heads, d_model=c["hidden_size"],
                  d_ff=c["intermediate_size"], head_dim=c.get("head_dim") or 0,
                  max_seq_len=c.get("max_position_embeddings") or 2048, norm_eps=c.get("rms_norm_eps") or 1e-6)
        kw.update(_rope(c, file, mt, kw["head_dim"] or kw["d_model"] // heads, kw["max_seq_len"]))
        kw.update(READERS[mt](c, file, kw["n_layer"]))
        cfg = Config(**kw, tie_embeddings=bool(tied), extra={"hf": raw})
    except KeyError as e:
        raise UserError(f"{file}: missing field {e}") from None
    except ValueError as e:
        raise UserError(f"{file}: {e}") from None
    return cfg, "llama"


def _flag(c, file, key, default=False) -> bool:
    v = c.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise UserError(f"{file}: {key} must be true or false, got {shown(v)}")
    return v


def _number(c, file, key, default=None, positive=True):
    """The key's number; `default` when absent (an explicit null stays None: "none")."""
    v = c.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
        raise UserError(f"{file}: {key} must be a {'positive ' if positive else ''}number, got {shown(v)}")
    return v


def _size(c, file, key, default=None):
    v = c.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_SIZE:
        raise UserError(f"{file}: {key} must be an integer in [1, {MAX_SIZE}], got {shown(v)}")
    return v


def _act(c, file, key, default: str) -> str:
    v = c.get(key) or default
    if v not in ACT:
        refuse(file, key, v, f"supported: {', '.join(ACT)}")
    return ACT[v]


def _rope(c: dict, file: str, mt: str, head_dim: int, max_pos: int) -> dict:
    """Config's rotary fields from rope_parameters / rope_scaling / rope_theta (either format)."""
    params = c.get("rope_scaling") or c.get("rope_parameters") or {}
    key = "rope_scaling" if c.get("rope_scaling") else "rope_parameters"
    if not isinstance(params, dict):
        refuse(file, key, params, "expected an object")
    out = {}
    if mt == "gemma3_text":  # per layer type: the full layers' scaling, the sliding layers' base
        if SLIDING in params or FULL in params:
            local, params = params.get(SLIDING) or {}, dict(params.get(FULL) or {})
            if rotary.kind(local) != "default" or set(local) - {"rope_type", "type", "rope_theta"}:
                refuse(file, f"{key}.{SLIDING}", local, "only a plain rotary base on the sliding layers")
            out["local_rope_theta"] = local.get("rope_theta") or _number(c, file, "rope_local_base_freq") or 1e4
        else:
            out["local_rope_theta"] = _number(c, file, "rope_local_base_freq") or 1e4
    params = dict(params)
    theta = params.pop("rope_theta", None) or _number(c, file, "rope_theta") or (1e6 if mt == "gemma3_text" else 1e4)
    partial = params.pop("partial_rotary_factor", None) or _number(c, file, "partial_rotary_factor") or 1.0
    for name, v in (("rope_theta", theta), ("partial_rotary_factor", partial)):
        _number({name: v}, f"{file}: {key}", name)
    if partial != 1 and mt != "phi3":
        refuse(file, "partial_rotary_factor", partial, f"model_type {mt} rotates whole heads")
    kind = rotary.kind(params)
    if mt == "phi3" and kind in ("su", "yarn"):
        kind = "longrope"
    if kind not in rotary.KINDS or (mt == "phi3" and kind not in ("default", "longrope")):
        refuse(file, f"{key}.rope_type", kind, f"supported: {', '.join(rotary.KINDS)}")
    for k in set(params) - {"rope_type", "type", *rotary.PARAMS[kind]}:
        if params[k] is not None:
            refuse(file, f"{key}.{k}", params[k], f"rope type {kind} does not read it")
    rope = {k: v for k, v in params.items() if k in rotary.PARAMS[kind] and v is not None}
    if kind in ("llama3", "yarn", "longrope"):
        rope["original_max_position_embeddings"] = (c.get("original_max_position_embeddings")
                                                    or rope.get("original_max_position_embeddings") or max_pos)
    needed = {"linear": ("factor",), "dynamic": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
              "longrope": ("short_factor", "long_factor")}.get(kind, ())
    for k in needed:
        if k not in rope:
            raise UserError(f"{file}: {key} of type {kind} needs {k}")
    if kind == "longrope":
        for k in ("short_factor", "long_factor"):
            if not isinstance(rope[k], list) or len(rope[k]) != int(head_dim * partial) // 2:
                refuse(file, f"{key}.{k}", rope[k], f"expected {int(head_dim * partial) // 2} numbers")
    if not 0 < partial <= 1:
        refuse(file, "partial_rotary_factor", partial, "expected a number in (0, 1]")
    rotary_dim = int(head_dim * partial)
    if rotary_dim % 2:
        refuse(file, "partial_rotary_factor", partial, f"it leaves an odd number ({rotary_dim}) of rotary dims")
    return {**out, "rope_theta": theta, "rope": ({"rope_type": kind, **rope} if kind != "default" else {}),
            "rotary_dim": rotary_dim}


def _windows(c: dict, file: str, n_layer: int, default_types: list[str], window: int | None) -> dict:
    """The sliding layers: config.json's layer_types, else the family's default pattern."""
    types = c.get("layer_types") or default_types
    if not isinstance(types, list) or len(types) != n_layer or set(types) - {SLIDING, FULL}:
        refuse(file, "layer_types", types, f"expected {n_layer} of {SLIDING!r} / {FULL!r}")
    layers = [i for i, t in enumerate(types) if t == SLIDING]
    return {"window": window or 0, "window_layers": layers if window else []}


def _qwen_windows(c, file, n_layer) -> dict:
    window = _size(c, file, "sliding_window") if _flag(c, file, "use_sliding_window") else None
    start = c.get("max_window_layers")
    start = 28 if start is None else _size(c, file, "max_window_layers") if start else 0
    return _windows(c, file, n_layer, [SLIDING if window and i >= start else FULL for i in range(n_layer)], window)


def _gemma_common(c, file, n_layer) -> dict:
    if _flag(c, file, "use_bidirectional_attention"):
        refuse(file, "use_bidirectional_attention", True, "a chat model attends causally")
    bias = _flag(c, file, "attention_bias")
    return {"attn_bias": bias, "o_bias": bias, "norm_offset": 1.0, "embed_scale": c["hidden_size"] ** 0.5}


def _gemma2(c, file, n_layer, pattern=2, qk_norm=False) -> dict:
    pattern = c.get("sliding_window_pattern") or c.get("_sliding_window_pattern") or pattern
    default = [SLIDING if (i + 1) % pattern else FULL for i in range(n_layer)]
    return {**_gemma_common(c, file, n_layer), "act": _act(c, file, "hidden_activation", "gelu_pytorch_tanh"),
            "attn_scale": (_number(c, file, "query_pre_attn_scalar") or 256) ** -0.5,
            "attn_softcap": _number(c, file, "attn_logit_softcapping", 50.0 if not qk_norm else 0.0) or 0.0,
            "final_softcap": _number(c, file, "final_logit_softcapping", 30.0 if not qk_norm else 0.0) or 0.0,
            "post_norms": True, "qk_norm": qk_norm,
            **_windows(c, file, n_layer, default, _size(c, file, "sliding_window", 4096))}


def _llama(c, file, n_layer) -> dict:
    if _flag(c, file, "rope_interleaved"):
        refuse(file, "rope_interleaved", True, "rotary pairs are the two halves of each head here")
    bias = _flag(c, file, "attention_bias")
    return {"attn_bias": bias, "o_bias": bias, "mlp_bias": _flag(c, file, "mlp_bias"),
            "act": _act(c, file, "hidden_act", "silu")}


def _granite(c, file, n_layer) -> dict:
    scaling = _number(c, file, "logits_scaling") or 1.0
    return {**_llama(c, file, n_layer), "embed_scale": _number(c, file, "embedding_multiplier") or 1.0,
            "attn_scale": _number(c, file, "attention_multiplier") or 1.0,
            "residual_scale": _number(c, file, "residual_multiplier") or 1.0, "logit_scale": 1.0 / scaling}


def _smollm3(c, file, n_layer) -> dict:
    every = _size(c, file, "no_rope_layer_interval") or 4
    rotary = c.get("no_rope_layers")
    if rotary is None:
        rotary = [int((i + 1) % every != 0) for i in range(n_layer)]
    if not isinstance(rotary, list) or len(rotary) != n_layer or set(rotary) - {0, 1}:
        refuse(file, "no_rope_layers", rotary, f"expected {n_layer} of 0 / 1")
    window = _size(c, file, "sliding_window")
    slide = _flag(c, file, "use_sliding_window") and window
    default = [SLIDING if slide and not r else FULL for r in rotary]
    return {**_llama(c, file, n_layer), "nope_layers": [i for i, r in enumerate(rotary) if not r],
            **_windows(c, file, n_layer, default, window)}


def _gpt2(c: dict, file: str) -> dict:
    act = c.get("activation_function") or "gelu_new"
    if ACT.get(act) != "gelu_tanh":
        refuse(file, "activation_function", act, "supported: gelu_new, gelu_pytorch_tanh")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if _flag(c, file, key, want) != want:
            refuse(file, key, c[key], f"only {str(want).lower()} is implemented")
    d = c["n_embd"]
    return dict(arch="gpt2", vocab_size=c["vocab_size"], n_layer=c["n_layer"], n_head=c["n_head"], n_kv_head=c["n_head"],
                d_model=d, d_ff=c.get("n_inner") or 4 * d, max_seq_len=c.get("n_positions") or 1024,
                norm_eps=c.get("layer_norm_epsilon") or 1e-5, act="gelu_tanh")


READERS = {
    "llama": _llama,
    "mistral": lambda c, f, n: {"act": _act(c, f, "hidden_act", "silu"),
                                **_windows(c, f, n, [SLIDING] * n, _size(c, f, "sliding_window"))},
    "qwen2": lambda c, f, n: {"attn_bias": True, "act": _act(c, f, "hidden_act", "silu"), **_qwen_windows(c, f, n)},
    "qwen3": lambda c, f, n: {**_llama({k: v for k, v in c.items() if k != "mlp_bias"}, f, n), "qk_norm": True,
                              **_qwen_windows(c, f, n)},
    "gemma": lambda c, f, n: {**_gemma_common(c, f, n),
                              "act": "gelu_tanh" if c.get("hidden_act") in (None, "gelu") else _act(c, f, "hidden_act", "")},
    "gemma2": _gemma2,
    "granite": _granite,
    "olmo2": lambda c, f, n: {**_llama({k: v for k, v in c.items() if k != "mlp_bias"}, f, n), "qk_norm": True,
                              "qk_norm_full": True, "pre_norms": False, "post_norms": True},
    "smollm3": _smollm3,
    "gemma3_text": lambda c, f, n: _gemma2(c, f, n, pattern=6, qk_norm=True),
    "phi3": lambda c, f, n: {"act": _act(c, f, "hidden_act", "silu"),
                             **_windows(c, f, n, [SLIDING] * n, _size(c, f, "sliding_window"))},
}


# model_type -> the `general.architecture` llama.cpp's converter writes for it
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
             "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3", "granite": "granite", "smollm3": "smollm3",
             "olmo2": "olmo2", "gpt2": "gpt2"}


def table_markdown() -> str:
    """The family table of docs/models.md, from FAMILIES and the GGUF architectures `gguf_config`
    reads (a test keeps the two equal)."""
    from .gguf_config import ARCHS

    rows = ["| model_type | Hugging Face dir | GGUF file (`general.architecture`) | what it switches on | "
            "config.json keys read (besides the sizes) | tested |", "|---|---|---|---|---|---|"]
    for f in FAMILIES.values():
        arch = GGUF_ARCH.get(f.name)
        gguf = f"exact (`{arch}`)" if arch in ARCHS else "refused"
        rows.append(f"| {f.name} | exact | {gguf} | {f.features} | {', '.join(f.reads)} | {TESTED} |")
    return "\n".join(rows)


TESTED = ("tests/test_families.py (HF dir: logits, greedy decoding, each field off its default); "
          "tests/test_gguf_load.py, tests/test_gguf_families.py (GGUF: logits, greedy decoding, refusals)")
