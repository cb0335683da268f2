"""Tiny GGUF files written with gguf-py's GGUFWriter from tiny random transformers models, laid out
as llama.cpp's converter lays them out (q/k rows interleaved for llama's rotary, gemma's norms
stored as 1 + w, the norms on block outputs and phi3's fused projections under llama.cpp's names),
for the GGUF loader's tests and the GGUF fuzz test."""

from __future__ import annotations

import numpy as np
import torch

NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
PER_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
# the families whose blocks end in norms: transformers' names -> llama.cpp's
POST_NORMS = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
              "post_feedforward_layernorm": "post_ffw_norm"}
FUSED = {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}  # phi3
INTERLEAVED = ("llama", "granite", "smollm3")  # llama.cpp's converter permutes their q/k rows
ONE_PLUS = ("gemma", "gemma2", "gemma3")  # their converters store each norm weight as 1 + w
SPECIALS = ["<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_vocabulary(size: int) -> dict:
    """A byte-level BPE vocabulary of `size` tokens: the 256 byte stand-ins, merges of a few pairs,
    two control tokens last."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    chars.update({b: chr(0x100 + i) for i, b in enumerate(b for b in range(256) if b not in printable)})
    tokens = [chars[b] for b in range(256)]
    merges = []
    for a, b in zip("Ġthaeiou", "thenrsdl"):
        if len(tokens) >= size - len(SPECIALS):
            break
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    tokens += [f"[PAD{i}]" for i in range(size - len(SPECIALS) - len(tokens))] + SPECIALS
    types = [1] * (size - len(SPECIALS)) + [3] * len(SPECIALS)
    return {"tokens": tokens, "types": types, "merges": merges}


def tiny_hf(family: str = "llama", vocab: int = 288, tied: bool = False, seed: int = 0, **config):
    """A tiny random transformers model (weights widened so differences show)."""
    import transformers

    torch.manual_seed(seed)
    common = {**dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
                     tie_word_embeddings=tied), **config}
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
           "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
           "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
           "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
           "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
           "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM),
           "smollm3": (transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM),
           "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM),
           "olmo3": (transformers.Olmo3Config, transformers.Olmo3ForCausalLM)}[family]
    cfg = cls[0](**common)
    cfg._attn_implementation = "eager"  # soft-capping and windows as written in the modeling code
    model = cls[1](cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() == 2 else p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def write_gguf(path, hf_model, arch: str = "llama", types: dict | None = None, meta: dict | None = None,
               extra: dict | None = None, vocab: dict | None = None):
    """`hf_model` as a GGUF of architecture `arch`, each tensor in types[name] (default F32), with
    metadata `meta` ({key: value}, added as given) and `extra` tensors ({name: float array}).
    `vocab` replaces parts of the vocabulary (tokens, types, merges). Returns the weights as written,
    dequantized, in transformers' names."""
    import gguf

    types = types or {}
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope)
    w.add_rope_freq_base(float(rope.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    v = {**byte_vocabulary(cfg.vocab_size), **(vocab or {})}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(v["tokens"])
    w.add_token_types(v["types"])
    w.add_token_merges(v["merges"])
    w.add_eos_token_id(len(v["tokens"]) - 1 if v["tokens"] else 0)
    w.add_chat_template(CHATML)
    for key, value in (meta or {}).items():
        if isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, _value_type(value))
    names = {**PER_LAYER, **(POST_NORMS if arch in ("gemma2", "gemma3", "olmo2") else {}), **FUSED}
    written = {}
    for hf_name, t in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        stem, part = hf_name.rsplit(".", 1)
        if stem.startswith("model.layers."):
            i, rest = stem.removeprefix("model.layers.").split(".", 1)
            name = f"blk.{i}.{names[rest]}.{part}"
        else:
            name = f"{NAMES[stem]}.{part}"
        a = t.detach().float().numpy()
        one_plus = arch in ONE_PLUS and name.endswith("norm.weight")
        if one_plus:  # llama.cpp's converter stores gemma's 1 + w
            a = a + 1
        written[hf_name] = _add(w, name, a, types.get(name, "F32"), cfg, arch in INTERLEAVED)
        if one_plus:
            written[hf_name] = written[hf_name] - 1
    for name, a in (extra or {}).items():
        w.add_tensor(name, np.asarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def _value_type(value):
    import gguf

    if isinstance(value, str):
        return gguf.GGUFValueType.STRING
    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    if isinstance(value, float):
        return gguf.GGUFValueType.FLOAT32
    return gguf.GGUFValueType.UINT32


def _add(w, name: str, a: np.ndarray, type_name: str, cfg, interleave: bool) -> torch.Tensor:
    """One tensor written; llama's q/k rows interleaved as llama.cpp's converter does (qwen's are not)."""
    import gguf

    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(name.split(".")[-2])
    heads = heads if interleave else None
    shape = a.shape
    if heads:  # llama.cpp's order: the two rotary halves of each head interleaved
        a = a.reshape(heads, 2, shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(shape)
    kind = gguf.GGMLQuantizationType[type_name]
    try:
        data = gguf.quants.quantize(np.ascontiguousarray(a), kind) if kind.name != "F32" else np.ascontiguousarray(a)
    except NotImplementedError:  # gguf-py cannot make K-quants: random blocks of the type (test_kquants)
        from test_kquants import random_blocks

        data = random_blocks(int(kind), shape[0], shape[1], np.random.default_rng(len(name))).numpy()
    w.add_tensor(name, data, raw_dtype=kind)
    back = gguf.quants.dequantize(data, kind).reshape(shape) if kind.name != "F32" else a
    if heads:
        back = back.reshape(heads, shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(shape)
    return torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32))


def with_weights(hf_model, written: dict):
    """A copy of `hf_model` holding the weights as written."""
    import copy

    out = copy.deepcopy(hf_model)
    out.load_state_dict(written, strict=False)
    return out.eval()


def assert_refused(path, named: str, tmp_path, capsys):
    """Loading the GGUF at `path` raises one line naming the file and `named`; `dialogen generate`
    on it exits 2 with that one line."""
    import pytest

    from dialogen.cli import main
    from dialogen.errors import UserError
    from dialogen.models.loading import load

    with pytest.raises(UserError) as e:
        load(str(path), "auto")
    msg = str(e.value)
    assert str(path) in msg and named in msg and "\n" not in msg
    (tmp_path / "m.json").write_text('[{"role": "user", "content": "hi"}]')
    assert main(["generate", str(tmp_path / "m.json"), "--model", str(path), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1
