"""GGUF files: config, tokenizer and tensors, with quantized tensors kept in their shipped blocks.

The first use of a file reads its header (`gguf_header`, every length bounded by the file),
checks it (`gguf_config.validated`: metadata, tensor shapes and types, vocabulary) and writes a
small index beside the other caches: the config, the tokenizer and where each tensor lies. Loads
map the file and take the tensors from the mapping: tensors of the types the kernels multiply
(`kernels.formats.FORMATS`) stay blocks, views of the mapping, with no float copy; other types are
dequantized, with one line saying so.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..paths import cache_dir
from .gguf_config import ROTATE_HALVES, validated
from .gguf_families import value as _value
from .gguf_header import read_header
from .kernels.formats import FORMATS, dequantize
from .tokenizer import Tokenizer
from .transformer import Config

INDEX_VERSION = 5  # the index of the validated header (config with rope scaling, file size)
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")  # read into cfg.rope
# GGUF tensor names -> Hugging Face llama names (the layout `hf.hf_to_ours` reads)
RENAME = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
          "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
# GGUF names of GPT-2 tensors -> Hugging Face GPT-2 names (matrices there are Conv1D: (in, out))
GPT2_RENAME = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
               "output": "lm_head", "attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
               "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
CONV1D = {"attn_qkv", "attn_output", "ffn_up", "ffn_down"}
NATIVE = {number: f.name for number, f in FORMATS.items()}  # GGUF type number -> a block format kept as shipped


def read_gguf(path: Path):
    """(header, metadata) of a GGUF file, every length in it checked (`gguf_header`)."""
    header = read_header(path)
    return header, header.meta


def _factors(path: Path, header, name: str) -> list:
    """A rotary-factor tensor's values (each frequency's divisor), checked positive and finite."""
    t = next((t for t in header.tensors if t.name == name), None)
    if t is None:
        return []
    with open(path, "rb") as f:
        f.seek(t.offset)
        raw = np.frombuffer(f.read(t.bytes), dtype=np.uint8)
    w = _floats(raw, t.type, t.shape).reshape(-1)
    if not np.all(np.isfinite(w)) or not np.all(w > 0):
        raise UserError(f"{path}: tensor {name} must hold positive finite factors")
    return [float(x) for x in w]


def rope_from_tensors(path: Path, header, cfg: Config) -> dict:
    """`cfg.rope` with the rotary factors the file ships as tensors: `rope_freqs.weight` (Llama 3.1/3.2's
    scaling) or phi3's `rope_factors_long/short.weight` (LongRoPE: the long factors once a sequence
    passes `rope.scaling.original_context_length`, cos and sin times `rope.scaling.attn_factor`)."""
    arch = cfg.extra.get("gguf_arch", cfg.arch)
    factors, long = _factors(path, header, "rope_freqs.weight"), _factors(path, header, "rope_factors_long.weight")
    attn = header.meta.get(f"{arch}.rope.scaling.attn_factor")
    if attn is not None and not long and attn != 1:
        raise UserError(f"{path}: metadata key {arch}.rope.scaling.attn_factor={attn} without rope_factors_long.weight "
                        "is not supported")
    if (factors or long) and cfg.rope:
        raise UserError(f"{path}: rotary factor tensors together with {arch}.rope.scaling.type={cfg.rope['rope_type']} "
                        "is not supported")
    if factors:
        return {"rope_type": "freq_factors", "factors": factors}
    if long:
        key = f"{arch}.rope.scaling."
        return {"rope_type": "longrope", "long_factor": long, "short_factor": _factors(path, header, "rope_factors_short.weight"),
                "original_max_position_embeddings": _value(path, header.meta, key + "original_context_length", "size",
                                                           cfg.max_seq_len),
                "attention_factor": float(_value(path, header.meta, key + "attn_factor", "rate", 1.0))}
    return cfg.rope


def index_dir(path: Path) -> Path:
    """The small cached index of a GGUF file: config, tokenizer, tensor table (made after every check
    of `gguf_config.validated`)."""
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:v{INDEX_VERSION}"
    target = cache_dir() / "gguf" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (target / "index.json").exists():
        return target
    header = read_header(path)
    cfg, tokenizer = validated(path, header, lambda: Tokenizer.from_gguf(header.meta, path))
    cfg.rope = rope_from_tensors(path, header, cfg)
    tensors = [{"name": t.name, "type": t.type, "shape": t.shape, "offset": t.offset, "bytes": t.bytes}
               for t in header.tensors if t.name not in ROPE_TENSORS]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer.save(tmp)
        index = {"version": INDEX_VERSION, "config": asdict(cfg), "tensors": tensors, "source": str(path),
                 "size": st.st_size}
        (tmp / "index.json").write_text(json.dumps(index))
        if not (target / "index.json").exists():  # another process may have written it meanwhile
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def renames(cfg: Config) -> dict:
    """GGUF layer tensor names -> Hugging Face's for `cfg`'s architecture: with norms on the block
    outputs (gemma2/3, olmo2) ffn_norm is the MLP's input norm; phi3 ships q/k/v and gate/up fused."""
    out = dict(RENAME)
    if cfg.post_norms:
        out.update({"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                    "post_ffw_norm": "post_feedforward_layernorm"})
    if cfg.extra.get("gguf_arch") == "phi3":
        out.update({"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"})
    return out


def _hf_name(gguf_name: str, cfg: Config, names: dict | None = None) -> str:
    parts = gguf_name.split(".")
    try:
        if cfg.arch == "gpt2":
            if parts[0] == "blk":
                return f"transformer.h.{parts[1]}.{GPT2_RENAME[parts[2]]}.{parts[3]}"
            return f"{GPT2_RENAME[parts[0]]}.{parts[1]}"
        names = names or renames(cfg)
        if parts[0] == "blk":
            return f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
        return f"{names[parts[0]]}.{parts[1]}"
    except (KeyError, IndexError):
        raise UserError(f"GGUF tensor {gguf_name!r} is not part of a {cfg.extra.get('gguf_arch', cfg.arch)} model") from None


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp interleaves the two rotary halves of each q/k head's rows; put them back in order.
    Works on float rows and on rows of quantized blocks alike (a row is one output feature)."""
    rows = w.shape[0]
    order = np.arange(rows).reshape(n_head, rows // n_head // 2, 2).transpose(0, 2, 1).reshape(-1)  # new row -> old
    if w.dtype == torch.bfloat16:  # numpy has no bfloat16
        return w.index_select(0, torch.from_numpy(order))
    return torch.from_numpy(np.take(w.numpy(), order, axis=0))  # whole rows gathered (a tenth of a strided copy's time)


def map_file(path: Path) -> np.ndarray:
    """The whole file as a uint8 array backed by the page cache (a private mapping: nothing written
    to it reaches the file, and nothing is read before it is used)."""
    try:
        return np.memmap(path, dtype=np.uint8, mode="c")
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot map ({getattr(e, 'strerror', None) or e})") from None


def read_tensors(path: Path, cfg: Config, tensors: list[dict], lazy: bool = False, data=None) -> tuple[dict, dict]:
    """(float32 state dict in Hugging Face names, {name: (kind, blocks)} of the natively kept tensors).
    Blocks are views of the mapped file (q/k rows, which llama.cpp interleaves, are put back in
    order into a new tensor). `lazy`: a natively kept tensor's float32 entry is a function making
    it, for the caller to call only where it needs the floats."""
    data = map_file(path) if data is None else data
    interleaved = cfg.arch == "llama" and cfg.extra.get("gguf_arch") not in ROTATE_HALVES  # llama's q/k rows
    floats, blocks, converted, names = {}, {}, set(), renames(cfg)
    for t in tensors:
        name, kind, shape = _hf_name(t["name"], cfg, names), t["type"], t["shape"]
        end = t["offset"] + t["bytes"]
        if end > len(data):
            raise UserError(f"{path}: truncated file (tensor {t['name']} ends past the end)")
        raw = data[t["offset"]: end]
        heads = {"attn_q": cfg.n_head, "attn_k": cfg.n_kv_head}.get(t["name"].split(".")[-2]) if interleaved else None
        conv1d = cfg.arch == "gpt2" and t["name"].split(".")[-2] in CONV1D  # Hugging Face GPT-2 stores (in, out)
        if kind in NATIVE and len(shape) == 2:
            b = torch.from_numpy(raw).view(shape[0], -1)  # (rows, row bytes), a view of the mapping
            b = unpermute_rows(b, heads) if heads else b
            blocks[name] = (NATIVE[kind], b)
            make = partial(_block_floats, kind, b, shape, conv1d)
            floats[name] = make if lazy else make()
            continue
        if kind not in (0, 1):
            import gguf  # only here: importing it costs a fifth of a second of every start

            converted.add(gguf.GGMLQuantizationType(kind).name)
        w = torch.from_numpy(_floats(raw, kind, shape))
        floats[name] = unpermute_rows(w, heads) if heads else w.t() if conv1d else w
    if converted:
        kept = ", ".join(name.upper() for name in NATIVE.values())
        print(f"dialogen: {path.name}: {', '.join(sorted(converted))} tensors are dequantized "
              f"(kept natively: {kept})", file=sys.stderr)
    return floats, blocks


def adjacent_view(data: np.ndarray, cfg: Config, tensors: list[dict], names) -> torch.Tensor | None:
    """Tensors (Hugging Face names) of one type that lie back to back in the file, as one (rows, row bytes)
    view of the mapping (llama.cpp's files put ffn_gate right before ffn_up); None otherwise, or for
    q/k rows, which are reordered on reading."""
    names = renames(cfg)
    where = {_hf_name(t["name"], cfg, names): t for t in tensors}
    parts = [where.get(n) for n in names]
    if any(t is None or t["name"].split(".")[-2] in ("attn_q", "attn_k") for t in parts):
        return None
    if any(a["offset"] + a["bytes"] != b["offset"] or a["type"] != b["type"] or a["shape"][1:] != b["shape"][1:]
           for a, b in zip(parts, parts[1:])):
        return None
    start, end = parts[0]["offset"], parts[-1]["offset"] + parts[-1]["bytes"]
    return torch.from_numpy(data[start:end]).view(sum(t["shape"][0] for t in parts), -1)


def release_pages(data: np.ndarray):
    """Drop the mapping's pages from this process (they stay in the page cache): the pages read while
    loading (copies were made of them) stop counting as its memory, and any used later come back."""
    m = getattr(data, "_mmap", None)
    if m is not None and hasattr(mmap, "MADV_DONTNEED"):
        m.madvise(mmap.MADV_DONTNEED)


def _floats(raw: np.ndarray, kind: int, shape: list) -> np.ndarray:
    """A float32 copy (shape `shape`) of a tensor's bytes of GGML type `kind`."""
    if kind == 0:  # F32
        w = raw.view(np.float32)
    elif kind == 1:  # F16
        w = raw.view(np.float16)
    else:
        w = _dequantize(raw.reshape(shape[0] if len(shape) > 1 else 1, -1), kind).numpy()
    return np.array(w, dtype=np.float32).reshape(shape)


def _block_floats(kind: int, b: torch.Tensor, shape: list, conv1d: bool) -> torch.Tensor:
    w = dequantize(kind, b, *shape)
    return w.t() if conv1d else w


def _dequantize(raw: np.ndarray, kind: int) -> torch.Tensor:
    import gguf

    return torch.from_numpy(gguf.quants.dequantize(raw, kind).astype(np.float32))
