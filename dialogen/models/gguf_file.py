"""GGUF files: config, tokenizer and tensors, with quantized tensors kept in their shipped blocks.

Reading a GGUF file's metadata with the `gguf` package takes seconds (it walks every vocabulary
entry), so the first use writes a small index beside the other caches: the config, the tokenizer
and where each tensor lies in the file. Later loads read that index and the tensor bytes straight
from the file, with no float copy on disk. Tensors in a block format the kernels multiply
(`kernels.formats.FORMATS`) keep their blocks (no re-quantization error); other types are
dequantized, with one line saying so.
"""

from __future__ import annotations

import hashlib
import json
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
from .kernels.formats import FORMATS, dequantize
from .tokenizer import Tokenizer
from .transformer import Config

INDEX_VERSION = 1
# GGUF tensor names -> Hugging Face llama names (the layout `hf.hf_to_ours` reads)
RENAME = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
          "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
# GGUF names of GPT-2 tensors -> Hugging Face GPT-2 names (matrices there are Conv1D: (in, out))
GPT2_RENAME = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
               "output": "lm_head", "attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
               "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
CONV1D = {"attn_qkv", "attn_output", "ffn_up", "ffn_down"}
NATIVE = {number: f.name for number, f in FORMATS.items()}  # GGUF type number -> a block format kept as shipped


def read_gguf(path: Path):
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = {}
    for k, f in reader.fields.items():
        try:
            meta[k] = f.contents()
        except Exception:
            continue
    return reader, meta


def config_from_meta(path: Path, meta: dict, names: set[str]) -> Config:
    arch = meta.get("general.architecture")
    if arch not in ("llama", "gpt2"):
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported; supported: llama, gpt2")
    m = lambda k, d=None: meta.get(f"{arch}.{k}", d)  # noqa: E731
    n_head = m("attention.head_count")
    try:
        common = dict(arch=arch, vocab_size=len(meta["tokenizer.ggml.tokens"]), n_layer=m("block_count"),
                      n_head=n_head, d_model=m("embedding_length"), d_ff=m("feed_forward_length"),
                      max_seq_len=m("context_length", 2048), tie_embeddings="output.weight" not in names)
        if arch == "gpt2":
            return Config(**common, n_kv_head=n_head, norm_eps=m("attention.layer_norm_epsilon", 1e-5))
        return Config(**common, n_kv_head=m("attention.head_count_kv", n_head), head_dim=m("attention.key_length", 0) or 0,
                      rope_theta=m("rope.freq_base", 10000.0), norm_eps=m("attention.layer_norm_rms_epsilon", 1e-5),
                      attn_bias="blk.0.attn_q.bias" in names)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise UserError(f"{path}: incomplete {arch} metadata ({type(e).__name__}: {e})") from None


def index_dir(path: Path) -> Path:
    """The small cached index of a GGUF file: config, tokenizer, tensor table."""
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:v{INDEX_VERSION}"
    target = cache_dir() / "gguf" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (target / "index.json").exists():
        return target
    reader, meta = read_gguf(path)
    cfg = config_from_meta(path, meta, {t.name for t in reader.tensors})
    tokenizer = Tokenizer.from_gguf(meta)
    tensors = [{"name": t.name, "type": int(t.tensor_type), "shape": [int(x) for x in reversed(t.shape)],
                "offset": int(t.data_offset), "bytes": int(t.n_bytes)} for t in reader.tensors]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer.save(tmp)
        index = {"version": INDEX_VERSION, "config": asdict(cfg), "tensors": tensors, "source": str(path)}
        (tmp / "index.json").write_text(json.dumps(index))
        if not (target / "index.json").exists():  # another process may have written it meanwhile
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _hf_name(gguf_name: str, arch: str = "llama") -> str:
    parts = gguf_name.split(".")
    try:
        if arch == "gpt2":
            if parts[0] == "blk":
                return f"transformer.h.{parts[1]}.{GPT2_RENAME[parts[2]]}.{parts[3]}"
            return f"{GPT2_RENAME[parts[0]]}.{parts[1]}"
        if parts[0] == "blk":
            return f"model.layers.{parts[1]}.{RENAME[parts[2]]}.{parts[3]}"
        return f"{RENAME[parts[0]]}.{parts[1]}"
    except (KeyError, IndexError):
        raise UserError(f"GGUF tensor {gguf_name!r} is not part of a {arch} model") from None


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp interleaves the two rotary halves of each q/k head's rows; put them back in order.
    Works on float rows and on rows of quantized blocks alike (a row is one output feature)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, -1).transpose(1, 2).reshape(w.shape).contiguous()


def read_tensors(path: Path, cfg: Config, tensors: list[dict], lazy: bool = False) -> tuple[dict, dict]:
    """(float32 state dict in Hugging Face names, {name: (kind, blocks)} of the natively kept tensors).
    `lazy`: a natively kept tensor's float32 entry is a function making it, for the caller to call
    only where it needs the floats."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    floats, blocks, converted = {}, {}, set()
    for t in tensors:
        name, kind, shape = _hf_name(t["name"], cfg.arch), t["type"], t["shape"]
        end = t["offset"] + t["bytes"]
        if end > len(data):
            raise UserError(f"{path}: truncated file (tensor {t['name']} ends past the end)")
        raw = data[t["offset"]: end]
        heads = {"attn_q": cfg.n_head, "attn_k": cfg.n_kv_head}.get(t["name"].split(".")[-2])
        conv1d = cfg.arch == "gpt2" and t["name"].split(".")[-2] in CONV1D  # Hugging Face GPT-2 stores (in, out)
        if kind in NATIVE and len(shape) == 2:
            b = torch.from_numpy(raw).view(shape[0], -1)  # (rows, row bytes)
            b = unpermute_rows(b, heads) if heads else b
            blocks[name] = (NATIVE[kind], b)
            make = partial(_block_floats, kind, b, shape, conv1d)
            floats[name] = make if lazy else make()
            continue
        if kind == 0:  # F32
            w = raw.view(np.float32)
        elif kind == 1:  # F16
            w = raw.view(np.float16).astype(np.float32)
        else:
            import gguf  # only here: importing it costs a fifth of a second of every start

            converted.add(gguf.GGMLQuantizationType(kind).name)
            w = _dequantize(raw.reshape(shape[0] if len(shape) > 1 else 1, -1), kind).numpy()
        w = torch.from_numpy(np.array(w, dtype=np.float32).reshape(shape))
        floats[name] = unpermute_rows(w, heads) if heads else w.t() if conv1d else w
    if converted:
        kept = ", ".join(name.upper() for name in NATIVE.values())
        print(f"dialogen: {path.name}: {', '.join(sorted(converted))} tensors are dequantized "
              f"(kept natively: {kept})", file=sys.stderr)
    return floats, blocks


def _block_floats(kind: int, b: torch.Tensor, shape: list, conv1d: bool) -> torch.Tensor:
    w = dequantize(kind, b, *shape)
    return w.t() if conv1d else w


def _dequantize(raw: np.ndarray, kind: int) -> torch.Tensor:
    import gguf

    return torch.from_numpy(gguf.quants.dequantize(raw, kind).astype(np.float32))
