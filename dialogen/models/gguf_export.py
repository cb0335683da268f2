"""`dialogen export --gguf OUT.gguf`: a llama or gpt2 model as a GGUF file llama.cpp can chat with.

Written with the `gguf` package's writer, laid out as llama.cpp's own converter lays out these
families: llama.cpp's tensor names, q/k rows of llama models interleaved the way llama.cpp's
rotary expects, GPT-2's head written out even when tied to the embeddings. Matrices are stored as
f32, f16, Q8_0 or Q4_0 (quantized by the gguf package, as llama.cpp's `quantize` does them);
norms, biases and GPT-2's position table stay f32. The tokenizer (byte-level BPE: tokens, types,
merges, the pre-tokenizer's llama.cpp name, special ids) and the chat template the model is used
with in dialogen travel in the metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..paths import atomic_file
from .hf import beyond_plain, model_type
from .tokenizer import Tokenizer, _pre_tokenizer

TYPES = ("f32", "f16", "q8_0", "q4_0")
# our names -> llama.cpp's (blocks: blk.N.<name>)
LLAMA_NAMES = {"attn.o_proj": "attn_output", "mlp.down": "ffn_down", "norm1": "attn_norm", "norm2": "ffn_norm"}
GPT2_NAMES = {"attn.qkv": "attn_qkv", "attn.o_proj": "attn_output", "mlp.up": "ffn_up", "mlp.down": "ffn_down",
              "norm1": "attn_norm", "norm2": "ffn_norm"}
PRE_NAMES = ("smollm", "llama-bpe", "gpt-2", "qwen2", "tekken", "gpt-4o", "deepseek-coder", "falcon",
             "default")  # the pre-tokenizers dialogen reads back from GGUF, one name each


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Interleave the two rotary halves of each q/k head's rows, as llama.cpp stores them (the
    inverse of `gguf_file.unpermute_rows`)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, -1).transpose(1, 2).reshape(w.shape).contiguous()


def gguf_tensors(cfg, sd: dict) -> dict[str, torch.Tensor]:
    """Our state dict (float) -> {llama.cpp tensor name: tensor (rows = output features)}."""
    out = {"token_embd.weight": sd["embed.weight"], "output_norm.weight": sd["norm.weight"]}
    if cfg.arch == "gpt2":
        out["position_embd.weight"] = sd["pos_embed.weight"]
        out["output_norm.bias"] = sd["norm.bias"]
        out["output.weight"] = sd.get("lm_head.weight", sd["embed.weight"])  # llama.cpp's converter writes it
    elif not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"blk.{i}."
        names = GPT2_NAMES if cfg.arch == "gpt2" else LLAMA_NAMES
        for name, gguf_name in names.items():
            for part in ("weight", "bias"):
                if f"{ours}{name}.{part}" in sd:
                    out[f"{theirs}{gguf_name}.{part}"] = sd[f"{ours}{name}.{part}"]
        if cfg.arch == "llama":
            for part in ("weight", "bias"):
                if f"{ours}attn.qkv.{part}" not in sd:
                    continue
                wq, wk, wv = sd[f"{ours}attn.qkv.{part}"].split([q, kv, kv])
                out[f"{theirs}attn_q.{part}"] = permute_rows(wq, cfg.n_head)
                out[f"{theirs}attn_k.{part}"] = permute_rows(wk, cfg.n_kv_head)
                out[f"{theirs}attn_v.{part}"] = wv
            gate, up = sd[f"{ours}mlp.gate_up.weight"].chunk(2)
            out[f"{theirs}ffn_gate.weight"], out[f"{theirs}ffn_up.weight"] = gate, up
    return out


def _stored(name: str, t: torch.Tensor, kind: str):
    """(array, raw dtype or None) as the file stores tensor `name` for export type `kind`."""
    import gguf

    a = t.detach().float().contiguous().numpy()
    matrix = a.ndim == 2 and name != "position_embd.weight"
    if not matrix or kind == "f32":
        return a, None
    if kind == "f16" or a.shape[1] % 32:  # a row that is not whole blocks stays f16
        return a.astype(np.float16), None
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[kind]
    return gguf.quants.quantize(a, qtype), qtype


# --- tokenizer ------------------------------------------------------------------------------
def pre_name(tokenizer: Tokenizer) -> str:
    """The llama.cpp name of the tokenizer's pre-tokenizer (how text is split before BPE)."""
    spec = json.loads(tokenizer._tmpl.to_str())
    pre = spec.get("pre_tokenizer")
    for name in PRE_NAMES:
        if pre == json.loads(_pre_tokenizer(name).__getstate__()):
            return name
    parts = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []
    kinds = [p.get("type") for p in parts]
    byte_level = parts and parts[-1].get("type") == "ByteLevel" and parts[-1].get("use_regex", True) \
        and not parts[-1].get("add_prefix_space", False)
    if byte_level and kinds == ["ByteLevel"]:
        return "gpt-2"  # GPT-2's own split (Hugging Face's GPT-2 tokenizer, dialogen's scratch BPE)
    if byte_level and kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    raise UserError(f"the tokenizer's pre-tokenizer ({', '.join(map(str, kinds)) or 'none'}) is not one GGUF "
                    f"readers know by name ({', '.join(PRE_NAMES)}): it cannot be exported to GGUF")


def tokenizer_fields(tokenizer: Tokenizer, vocab_size: int) -> dict:
    spec = json.loads(tokenizer._tmpl.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel" or spec.get("normalizer"):
        raise UserError("only byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM style) can be exported to GGUF")
    vocab = {**model["vocab"], **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
    if max(vocab.values()) >= vocab_size:
        raise UserError(f"the tokenizer has ids up to {max(vocab.values())}, beyond the model's {vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [5] * vocab_size  # UNUSED: rows no token maps to
    for text, i in vocab.items():
        tokens[i], types[i] = text, 1  # NORMAL
    for t in spec.get("added_tokens", []):
        types[t["id"]] = 3 if t.get("special") else 4  # CONTROL, USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre_name(tokenizer)}


def _write_tokenizer(w, tokenizer: Tokenizer, vocab_size: int, chat_template: str, eot_ids: set[int]):
    f = tokenizer_fields(tokenizer, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(f["pre"])
    w.add_token_list(f["tokens"])
    w.add_token_types(f["types"])
    w.add_token_merges(f["merges"])
    for token, add in ((tokenizer.bos_token, w.add_bos_token_id), (tokenizer.eos_token, w.add_eos_token_id),
                       (tokenizer.pad_token, w.add_pad_token_id)):
        i = tokenizer.token_id(token)
        if i is not None:
            add(i)
    if len(eot_ids) == 1:
        w.add_eot_token_id(next(iter(eot_ids)))  # llama.cpp ends a chat turn here
    w.add_add_bos_token(False)  # dialogen's templates write every token the model sees
    w.add_add_eos_token(False)
    w.add_chat_template(chat_template)


# --- the file -------------------------------------------------------------------------------
def write_gguf(out: Path, cfg, sd: dict, tokenizer: Tokenizer, kind: str, name: str, chat_template: str,
               eot_ids: set[int]) -> int:
    """Write the model (`cfg`, our float state dict `sd`) to `out` atomically; the tensor count."""
    if kind not in TYPES:
        raise UserError(f"--type {kind!r} is not one of {', '.join(TYPES)}")
    odd = beyond_plain(cfg)
    if odd:
        raise UserError(f"{out}: GGUF export writes plain llama and gpt2 models; this {model_type(cfg)} model has "
                        f"{', '.join(odd)}")
    tensors = gguf_tensors(cfg, sd)

    def fill(w):
        _write_config(w, cfg, kind, name)
        _write_tokenizer(w, tokenizer, cfg.vocab_size, chat_template, eot_ids)
        for tensor_name, t in tensors.items():
            array, raw = _stored(tensor_name, t, kind)
            w.add_tensor(tensor_name, array, raw_dtype=raw)

    write_file(out, cfg.arch, fill)
    return len(tensors)


def write_file(out: Path, arch: str, fill):
    """A GGUF file of `arch` at `out`, whole or not at all: `fill(writer)` adds its keys and tensors."""
    import gguf

    def write(tmp: Path):
        w = gguf.GGUFWriter(tmp, arch)
        fill(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    try:
        atomic_file(out, write)
    except OSError as e:
        raise UserError(f"{out}: cannot write ({e.strerror})") from None


def _write_config(w, cfg, kind: str, name: str):
    import gguf

    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    if cfg.arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
        return
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.head_dim * cfg.n_head != cfg.d_model:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
