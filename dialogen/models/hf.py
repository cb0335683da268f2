"""Hugging Face's side of a checkpoint: our `Config` -> config.json (`families.py` reads one),
their tensor names <-> ours, the shapes a config implies, and the generation_config.json a chat
stops by. Every value is checked before anything is built from it; an error names the file and the
key."""

from __future__ import annotations

from dataclasses import fields

import torch

from ..errors import UserError
from .families import config_from_hf  # noqa: F401 (the reader of config.json, for loading)
from .tokenizer import Tokenizer
from .transformer import Config

SIZE_FIELDS = ("arch", "vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "head_dim", "max_seq_len",
               "rope_theta", "norm_eps", "tie_embeddings", "attn_bias", "rotary_dim", "extra")


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
        for norm in ("norm1", "norm2") if cfg.pre_norms else ():
            out[b + norm + ".weight"] = ((d,), ("d_model",))
        if cfg.arch == "gpt2":
            out[b + "mlp.up.weight"] = ((f, d), ("d_ff", "d_model"))
            for name, n, why in (("attn.qkv", qkv, heads), ("attn.o_proj", d, ("d_model",)), ("mlp.up", f, ("d_ff",)),
                                 ("mlp.down", d, ("d_model",)), ("norm1", d, ("d_model",)), ("norm2", d, ("d_model",))):
                out[b + name + ".bias"] = ((n,), why)
        else:
            out[b + "mlp.gate_up.weight"] = ((2 * f, d), ("d_ff", "d_model"))
            optional = [(cfg.attn_bias, "attn.qkv.bias", (qkv,), heads), (cfg.o_bias, "attn.o_proj.bias", (d,), ("d_model",)),
                        (cfg.mlp_bias, "mlp.gate_up.bias", (2 * f,), ("d_ff",)),
                        (cfg.mlp_bias, "mlp.down.bias", (d,), ("d_model",)),
                        (cfg.qk_norm, "attn.q_norm.weight", ((cfg.n_head if cfg.qk_norm_full else 1) * hd,), heads),
                        (cfg.qk_norm, "attn.k_norm.weight", ((cfg.n_kv_head if cfg.qk_norm_full else 1) * hd,), heads),
                        (cfg.post_norms, "post_attn_norm.weight", (d,), ("d_model",)),
                        (cfg.post_norms, "post_mlp_norm.weight", (d,), ("d_model",))]
            out.update({b + name: (shape, why) for on, name, shape, why in optional if on})
    return out


def check_shapes(cfg: Config, sd: dict, where: str, keys: dict, later=frozenset()):
    want = expected_shapes(cfg)
    for name, (shape, why) in want.items():
        t = sd.get(name)
        if t is not None and tuple(t.shape) != shape:
            named = ", ".join(dict.fromkeys(keys.get(f, f) for f in why))
            raise UserError(f"{where}: {named} do not match the weights: {name} is {list(t.shape)}, "
                            f"the config makes it {list(shape)}")
    missing = [k for k in want if k not in sd and k not in later]
    if missing:
        raise UserError(f"{where}: {keys.get('n_layer', 'n_layer')}={cfg.n_layer} does not match the weights: "
                        f"{missing[0]} is missing")


# --- config ---------------------------------------------------------------------------------
def model_type(cfg: Config) -> str:
    """The config.json model_type the model was read from (ours: llama or gpt2)."""
    return cfg.extra.get("hf", {}).get("model_type") or cfg.arch


def config_to_hf(cfg: Config) -> dict:
    """config.json of `cfg`: a family read from Hugging Face keeps the file it came from (with our
    sizes); a model of ours is written as llama or gpt2."""
    if cfg.extra.get("hf"):
        return {**cfg.extra["hf"], **_sizes_to_hf(cfg)}
    odd = beyond_plain(cfg)
    if odd:
        raise UserError(f"this model cannot be saved: it has {', '.join(odd)} set, and no Hugging Face config.json "
                        "to write them as (it was not read from one)")
    if cfg.arch == "gpt2":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], **_sizes_to_hf(cfg),
                "n_ctx": cfg.max_seq_len, "activation_function": "gelu_new"}
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **_sizes_to_hf(cfg),
            "rope_theta": cfg.rope_theta, "attention_bias": cfg.attn_bias, "hidden_act": "silu"}


def beyond_plain(cfg: Config) -> list[str]:
    """The Config fields that take `cfg` beyond a plain llama (or gpt2) model's math."""
    llama = cfg.arch == "llama"  # (gpt2's biases and activation are fixed)
    plain = Config(arch=cfg.arch, attn_bias=cfg.attn_bias, o_bias=cfg.attn_bias and llama, act="silu" if llama else cfg.act)
    return [f.name for f in fields(Config) if f.name not in SIZE_FIELDS and getattr(cfg, f.name) != getattr(plain, f.name)]


def _sizes_to_hf(cfg: Config) -> dict:
    if cfg.arch == "gpt2":
        return {"vocab_size": cfg.vocab_size, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.d_model,
                "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
                "tie_word_embeddings": cfg.tie_embeddings}
    return {"vocab_size": cfg.vocab_size, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
            "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings}


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


def fused_projections(cfg: Config) -> bool:
    """Whether the model ships qkv_proj and gate_up_proj joined already (phi3, from either format)."""
    return model_type(cfg) == "phi3" or cfg.extra.get("gguf_arch") == "phi3"


def rotary_names(cfg: Config) -> list[tuple[str, tuple[str, ...]]]:
    """(our tensor name, the Hugging Face names it joins, in order) of a rotary family's tensors but
    the head; q/k/v and gate/up are joined along the output rows."""
    fused = fused_projections(cfg)
    out = [("embed.weight", ("model.embed_tokens.weight",)), ("norm.weight", ("model.norm.weight",))]
    for i in range(cfg.n_layer):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        a, m = p + "self_attn.", p + "mlp."
        qkv = (a + "qkv_proj.",) if fused else tuple(a + f"{n}_proj." for n in "qkv")
        gate_up = (m + "gate_up_proj.",) if fused else (m + "gate_proj.", m + "up_proj.")
        parts = [("attn.qkv", qkv, True, cfg.attn_bias), ("attn.o_proj", (a + "o_proj.",), True, cfg.o_bias),
                 ("mlp.gate_up", gate_up, True, cfg.mlp_bias), ("mlp.down", (m + "down_proj.",), True, cfg.mlp_bias),
                 ("norm1", (p + "input_layernorm.",), cfg.pre_norms, False),
                 ("attn.q_norm", (a + "q_norm.",), cfg.qk_norm, False), ("attn.k_norm", (a + "k_norm.",), cfg.qk_norm, False)]
        if cfg.post_norms:  # gemma2/3, olmo2: post_attention_layernorm is the attention output's norm
            parts += [("post_attn_norm", (p + "post_attention_layernorm.",), True, False),
                      ("norm2", (p + "pre_feedforward_layernorm.",), cfg.pre_norms, False),
                      ("post_mlp_norm", (p + "post_feedforward_layernorm.",), True, False)]
        else:
            parts.append(("norm2", (p + "post_attention_layernorm.",), True, False))
        for ours, theirs, on, bias in parts:
            if on:
                out.append((q + ours + ".weight", tuple(t + "weight" for t in theirs)))
            if bias:
                out.append((q + ours + ".bias", tuple(t + "bias" for t in theirs)))
    return out


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
        for ours, theirs in rotary_names(cfg):
            put(ours, *(t.removeprefix("model.") for t in theirs))
    else:
        for theirs, ours, transposed in gpt2_names(cfg):
            put(ours, theirs, transposed=transposed)
    if "lm_head.weight" in sd and not cfg.tie_embeddings:
        put("lm_head.weight", "lm_head.weight")
    return {k: v.contiguous() for k, v in out.items()}


def ours_to_hf(cfg: Config, sd: dict) -> dict:
    out = {}
    if cfg.arch == "llama":
        q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        for ours, theirs in rotary_names(cfg):
            if len(theirs) == 1:
                out[theirs[0]] = sd[ours]
            else:  # q/k/v or gate/up, joined along the rows
                for name, part in zip(theirs, sd[ours].split([q, kv, kv] if len(theirs) == 3 else sd[ours].shape[0] // 2)):
                    out[name] = part
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
