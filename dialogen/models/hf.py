"""Hugging Face's side of a checkpoint: config.json <-> our `Config`, their tensor names <-> ours,
the shapes a config implies, and the generation_config.json a chat stops by. Every value is
checked before anything is built from it; an error names the file and the key."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import UserError
from .config_values import MAX_SIZE, shown
from .tokenizer import Tokenizer
from .transformer import Config

SUPPORTED = ("llama", "gpt2")


GPT2_LINEARS = {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.o_proj", "mlp.c_fc": "mlp.up", "mlp.c_proj": "mlp.down"}


def expected_shapes(cfg: Config) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Our tensor name -> (its shape under `cfg`, the Config fields that set it)."""
    v, d, f, hd = cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.head_dim
    qkv = (cfg.n_head + 2 * cfg.n_kv_head) * hd
    heads = ("n_head", "n_kv_head", "head_dim")
    out = {"embed.weight": ((v, d), ("vocab_size", "d_model")), "norm.weight": ((d,), ("d_model",))}
    if cfg.arch == "gpt2":
        out["pos_embed.weight"] = ((cfg.max_seq_len, d), ("max_seq_len", "d_model"))
        out["norm.bias"] = ((d,), ("d_model",))
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = ((v, d), ("vocab_size", "d_model"))
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        out[b + "attn.qkv.weight"] = ((qkv, d), (*heads, "d_model"))
        out[b + "attn.o_proj.weight"] = ((d, cfg.n_head * hd), ("d_model", *heads))
        out[b + "mlp.down.weight"] = ((d, f), ("d_model", "d_ff"))
        for norm in ("norm1", "norm2"):
            out[b + norm + ".weight"] = ((d,), ("d_model",))
        if cfg.arch == "gpt2":
            out[b + "mlp.up.weight"] = ((f, d), ("d_ff", "d_model"))
            for name, n, why in (("attn.qkv", qkv, heads), ("attn.o_proj", d, ("d_model",)), ("mlp.up", f, ("d_ff",)),
                                 ("mlp.down", d, ("d_model",)), ("norm1", d, ("d_model",)), ("norm2", d, ("d_model",))):
                out[b + name + ".bias"] = ((n,), why)
        else:
            out[b + "mlp.gate_up.weight"] = ((2 * f, d), ("d_ff", "d_model"))
            if cfg.attn_bias:
                out[b + "attn.qkv.bias"] = ((qkv,), heads)
    return out


def check_shapes(cfg: Config, sd: dict, where: str, keys: dict, later=frozenset()):
    want = expected_shapes(cfg)
    for name, (shape, fields) in want.items():
        t = sd.get(name)
        if t is not None and tuple(t.shape) != shape:
            named = ", ".join(dict.fromkeys(keys.get(f, f) for f in fields))
            raise UserError(f"{where}: {named} do not match the weights: {name} is {list(t.shape)}, "
                            f"the config makes it {list(shape)}")
    missing = [k for k in want if k not in sd and k not in later]
    if missing:
        raise UserError(f"{where}: {keys.get('n_layer', 'n_layer')}={cfg.n_layer} does not match the weights: "
                        f"{missing[0]} is missing")


# --- config ---------------------------------------------------------------------------------
# our Config field -> the config.json key it comes from
LLAMA_KEYS = {"vocab_size": "vocab_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
              "n_kv_head": "num_key_value_heads", "d_model": "hidden_size", "d_ff": "intermediate_size",
              "head_dim": "head_dim", "max_seq_len": "max_position_embeddings", "rope_theta": "rope_theta",
              "norm_eps": "rms_norm_eps"}
GPT2_KEYS = {"vocab_size": "vocab_size", "n_layer": "n_layer", "n_head": "n_head", "n_kv_head": "n_head",
             "d_model": "n_embd", "d_ff": "n_inner", "head_dim": "n_embd", "max_seq_len": "n_positions",
             "norm_eps": "layer_norm_epsilon"}


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


def config_from_hf(c: dict, where: Path) -> tuple[Config, str]:
    mt = c.get("model_type")
    try:
        if mt in ("llama", "mistral", "qwen2"):
            check_config_values(c, LLAMA_KEYS, f"{where}/config.json")
            rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind != "default":
                raise UserError(f"{where}/config.json: rope scaling {kind!r} is not supported (only 'default')")
            heads = c["num_attention_heads"]
            return Config(
                arch="llama", vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"], n_head=heads,
                n_kv_head=c.get("num_key_value_heads") or heads, d_model=c["hidden_size"],
                d_ff=c["intermediate_size"], head_dim=c.get("head_dim") or 0,
                max_seq_len=c.get("max_position_embeddings", 2048),
                rope_theta=c.get("rope_theta") or rope.get("rope_theta", 10000.0),
                norm_eps=c.get("rms_norm_eps", 1e-6), tie_embeddings=c.get("tie_word_embeddings", False),
                attn_bias=c.get("attention_bias", mt == "qwen2"),
            ), "llama"
        if mt == "gpt2":
            act = c.get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh"):
                raise UserError(f"{where}/config.json: gpt2 activation {act!r} is not supported")
            check_config_values(c, GPT2_KEYS, f"{where}/config.json")
            d = c["n_embd"]
            return Config(
                arch="gpt2", vocab_size=c["vocab_size"], n_layer=c["n_layer"], n_head=c["n_head"],
                n_kv_head=c["n_head"], d_model=d, d_ff=c.get("n_inner") or 4 * d,
                max_seq_len=c.get("n_positions", 1024), norm_eps=c.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=c.get("tie_word_embeddings", True),
            ), "gpt2"
        if mt == "dialogen-rnn":
            return c, "rnn"
    except KeyError as e:
        raise UserError(f"{where}/config.json: missing field {e}") from None
    raise UserError(f"{where}/config.json: model_type {mt!r} is not supported; supported: "
                    f"{', '.join(SUPPORTED)} (and mistral/qwen2 without sliding window)")


def config_to_hf(cfg: Config) -> dict:
    if cfg.arch == "gpt2":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.d_model, "n_inner": cfg.d_ff,
                "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu_new", "tie_word_embeddings": cfg.tie_embeddings}
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": cfg.vocab_size,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
            "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
            "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "attention_bias": cfg.attn_bias, "hidden_act": "silu"}


# --- weights: Hugging Face names <-> ours ---------------------------------------------------
def gpt2_names(cfg: Config, prefix: str = ""):
    """(Hugging Face name, ours, whether theirs is transposed) of every GPT-2 tensor but the head;
    GPT-2's Conv1D stores a linear layer's weight as (in, out)."""
    yield from ((prefix + a, b, False) for a, b in (("wte.weight", "embed.weight"), ("wpe.weight", "pos_embed.weight"),
                                                     ("ln_f.weight", "norm.weight"), ("ln_f.bias", "norm.bias")))
    for i in range(cfg.n_layer):
        for theirs, ours in {**GPT2_LINEARS, "ln_1": "norm1", "ln_2": "norm2"}.items():
            yield f"{prefix}h.{i}.{theirs}.weight", f"blocks.{i}.{ours}.weight", not theirs.startswith("ln")
            yield f"{prefix}h.{i}.{theirs}.bias", f"blocks.{i}.{ours}.bias", False


def hf_to_ours(cfg: Config, sd: dict, later=frozenset()) -> dict:
    """Hugging Face names -> ours. `later`: Hugging Face names left out on purpose (weights made
    as blocks by a native module, `native.swap_in`); ours built from them are left out too."""
    sd = {k.removeprefix("transformer.").removeprefix("model."): v for k, v in sd.items()}
    later = {k.removeprefix("transformer.").removeprefix("model.") for k in later}
    out = {}

    def put(ours, *theirs, transposed=False):
        if any(t in later for t in theirs):
            return
        w = torch.cat([sd[t] for t in theirs]) if len(theirs) > 1 else sd[theirs[0]]
        out[ours] = w.t() if transposed else w

    if cfg.arch == "llama":
        put("embed.weight", "embed_tokens.weight")
        put("norm.weight", "norm.weight")
        for i in range(cfg.n_layer):
            p, q = f"layers.{i}.", f"blocks.{i}."
            a = p + "self_attn."
            put(q + "attn.qkv.weight", *(a + f"{n}_proj.weight" for n in "qkv"))
            if cfg.attn_bias:
                put(q + "attn.qkv.bias", *(a + f"{n}_proj.bias" for n in "qkv"))
            put(q + "attn.o_proj.weight", a + "o_proj.weight")
            put(q + "mlp.gate_up.weight", p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
            put(q + "mlp.down.weight", p + "mlp.down_proj.weight")
            put(q + "norm1.weight", p + "input_layernorm.weight")
            put(q + "norm2.weight", p + "post_attention_layernorm.weight")
    else:
        for theirs, ours, transposed in gpt2_names(cfg):
            put(ours, theirs, transposed=transposed)
    if "lm_head.weight" in sd and not cfg.tie_embeddings:
        put("lm_head.weight", "lm_head.weight")
    return {k: v.contiguous() for k, v in out.items()}


def ours_to_hf(cfg: Config, sd: dict) -> dict:
    out = {}
    if cfg.arch == "llama":
        out["model.embed_tokens.weight"], out["model.norm.weight"] = sd["embed.weight"], sd["norm.weight"]
        sizes = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
        for i in range(cfg.n_layer):
            p, q = f"model.layers.{i}.", f"blocks.{i}."
            for n, w in zip("qkv", sd[q + "attn.qkv.weight"].split(sizes)):
                out[p + f"self_attn.{n}_proj.weight"] = w
            if cfg.attn_bias:
                for n, b in zip("qkv", sd[q + "attn.qkv.bias"].split(sizes)):
                    out[p + f"self_attn.{n}_proj.bias"] = b
            out[p + "self_attn.o_proj.weight"] = sd[q + "attn.o_proj.weight"]
            gate, up = sd[q + "mlp.gate_up.weight"].chunk(2)
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
            out[p + "mlp.down_proj.weight"] = sd[q + "mlp.down.weight"]
            out[p + "input_layernorm.weight"] = sd[q + "norm1.weight"]
            out[p + "post_attention_layernorm.weight"] = sd[q + "norm2.weight"]
    else:
        for theirs, ours, transposed in gpt2_names(cfg, "transformer."):
            out[theirs] = sd[ours].t() if transposed else sd[ours]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.detach().contiguous() for k, v in out.items()}


def hf_configs(cfg: Config, tokenizer: Tokenizer, stop_ids=None, stop_strings=None) -> tuple[dict, dict]:
    """config.json and generation_config.json as transformers reads them: special token ids that
    exist in the vocabulary, and generation that stops where a dialogen chat stops (the template's
    end-of-turn ids, or strings when the vocabulary has no single token for the marker)."""
    def known(i):
        return i if i is not None and 0 <= i < cfg.vocab_size else None

    ids = {"bos_token_id": known(tokenizer.token_id(tokenizer.bos_token)), "eos_token_id": known(tokenizer.eos_id),
           "pad_token_id": known(tokenizer.token_id(tokenizer.pad_token))}
    stops = sorted({known(i) for i in (stop_ids or [])} - {None}) or ids["eos_token_id"]
    generation = {**ids, "eos_token_id": stops}
    if stop_strings:
        generation["stop_strings"] = list(stop_strings)
    return {**config_to_hf(cfg), **ids}, generation
