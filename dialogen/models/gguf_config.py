"""A GGUF file's metadata -> our `Config`, and every tensor and the vocabulary checked against it.

Architectures: `gpt2`, and the rotary ones of `gguf_families.ARCHS` (llama, also Mistral's files;
qwen2, qwen3, gemma, gemma2, gemma3, phi3, granite, smollm3, olmo2), each with llama.cpp's meaning
of its keys and tensors. A metadata key that changes the math is read (rope base and scaling,
`rope_freqs.weight`'s per-frequency factors, phi3's long/short factors, norms, head sizes,
soft-capping, sliding windows, multipliers) or refused; an unknown key of the architecture is
refused too, as is an unknown tensor. Every check runs before any tensor byte is used, and each
failure is one `UserError` naming the file and the key or tensor.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .config_values import MAX_SIZE, shown
from .gguf_families import ARCHS as ROTARY, Reader, layer_tensors, value as _value
from .gguf_header import Header, TensorInfo
from .transformer import Config

LLAMA_MATH = tuple(ROTARY)  # GGUF architectures our rotary decoder computes exactly
ROTATE_HALVES = tuple(a.name for a in ROTARY.values() if a.halves)  # q/k rows in Hugging Face's order
ARCHS = (*LLAMA_MATH, "gpt2")
FLOAT_TYPES = {0, 1, 30}  # F32, F16, BF16: the only types of norms, biases and rotary factors
# matrices: every type the kernels multiply or gguf.quants dequantizes (TQ1_0, TQ2_0, MXFP4, NVFP4 included)
MATRIX_TYPES = FLOAT_TYPES | {2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22, 23, 29, 34, 35, 39, 40}
# keys of `{arch}.` read into the config (or known not to change the math)
SIZES = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
         "attention.head_count_kv", "attention.key_length", "attention.value_length", "rope.dimension_count",
         "vocab_size", "rope.scaling.original_context_length")
RATES = ("rope.freq_base", "attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon", "rope.scaling.factor")
HARMLESS = ("rope.scaling.type", "rope.scaling.finetuned", "expert_used_count", "expert_count")
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "eot_token_id", "eom_token_id", "padding_token_id",
               "unknown_token_id", "separator_token_id")


def config_from_meta(path: Path, meta: dict, tensors: list[TensorInfo]) -> Config:
    """Our Config from a GGUF file's metadata; every value checked, every math key read or refused."""
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise UserError(f"{path}: GGUF architecture {shown(arch)} is not supported; supported: {', '.join(ARCHS)}")
    own = ROTARY[arch].keys if arch in ROTARY else ()
    for key in meta:
        sub = key[len(arch) + 1:]
        if key.startswith(arch + ".") and sub not in (*SIZES, *RATES, *HARMLESS, *own):
            raise UserError(f"{path}: metadata key {key} changes the model's math and is not supported")
    if meta.get(f"{arch}.expert_count", 0) not in (0, 1):
        raise UserError(f"{path}: metadata key {arch}.expert_count: mixture-of-experts models are not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or len(tokens) > MAX_SIZE:
        raise UserError(f"{path}: metadata key tokenizer.ggml.tokens must be a non-empty list of strings")
    m = lambda k, kind="size", d=None: _value(path, meta, f"{arch}.{k}", kind, d)  # noqa: E731
    n_head, d = m("attention.head_count"), m("embedding_length")
    names = {t.name for t in tensors}
    common = dict(vocab_size=len(tokens), n_layer=m("block_count"), n_head=n_head, d_model=d,
                  d_ff=m("feed_forward_length"), max_seq_len=m("context_length", d=2048),
                  tie_embeddings="output.weight" not in names)
    if arch == "gpt2":
        return _config(path, arch, dict(arch="gpt2", **common, n_kv_head=n_head,
                                        norm_eps=m("attention.layer_norm_epsilon", "rate", 1e-5)))
    n_kv = m("attention.head_count_kv", d=n_head)
    if n_head % n_kv:
        raise UserError(f"{path}: {arch}.attention.head_count={n_head} is not a multiple of "
                        f"{arch}.attention.head_count_kv={n_kv}")
    if f"{arch}.attention.key_length" not in meta and d % n_head:
        raise UserError(f"{path}: {arch}.embedding_length={d} is not divisible by {arch}.attention.head_count={n_head}")
    head_dim = m("attention.key_length", d=d // n_head)
    if m("attention.value_length", d=head_dim) != head_dim:
        raise UserError(f"{path}: metadata key {arch}.attention.value_length={meta[f'{arch}.attention.value_length']} "
                        f"differs from the head size {head_dim}: not supported")
    rotary = m("rope.dimension_count", d=head_dim)
    if rotary != head_dim and not (ROTARY[arch].partial_rotary and rotary < head_dim):
        raise UserError(f"{path}: metadata key {arch}.rope.dimension_count={rotary} differs from the head size "
                        f"{head_dim}: not supported")
    if rotary % 2:
        raise UserError(f"{path}: {arch}: an odd rotary width {rotary} has no rotary pairs")
    biases = ROTARY[arch].biases
    fields = ROTARY[arch].math(Reader(path, meta, arch, common["n_layer"], d, n_head))
    return _config(path, arch, dict(arch="llama", **common, n_kv_head=n_kv, head_dim=head_dim, rotary_dim=rotary,
                                    rope_theta=m("rope.freq_base", "rate", 10000.0),
                                    norm_eps=m("attention.layer_norm_rms_epsilon", "rate", 1e-5),
                                    attn_bias="blk.0.attn_q.bias" in names, rope=_rope_scaling(path, meta, arch),
                                    o_bias=biases and "blk.0.attn_output.bias" in names,
                                    mlp_bias=biases and "blk.0.ffn_up.bias" in names,
                                    extra={"gguf_arch": arch}, **fields))


def _rope_scaling(path: Path, meta: dict, arch: str) -> dict:
    """The rotary scaling (`Config.rope`, models/rope.py) the metadata asks for."""
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = _value(path, meta, f"{arch}.rope.scaling.factor", "rate", 1.0)
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)} if factor != 1.0 else {}
    if kind != "none" and not (kind in ("yarn", "longrope") and factor == 1.0):
        raise UserError(f"{path}: metadata key {arch}.rope.scaling.type={shown(kind)} is not supported "
                        "(supported: none, linear)")
    return {}


def _config(path: Path, arch: str, kwargs: dict) -> Config:
    try:
        return Config(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: {arch} metadata does not make a model ({e})") from None


def expected_tensors(cfg: Config, arch: str) -> dict[str, tuple[tuple, bool]]:
    """GGUF tensor name -> (its shape, rows first, under `cfg`; whether the file must have it)."""
    v, d, f = cfg.vocab_size, cfg.d_model, cfg.d_ff
    out = {"token_embd.weight": ((v, d), True), "output_norm.weight": ((d,), True),
           "output.weight": ((v, d), not cfg.tie_embeddings)}
    if arch == "gpt2":
        out.update({"position_embd.weight": ((cfg.max_seq_len, d), True), "output_norm.bias": ((d,), True)})
        layer = {"attn_norm.weight": (d,), "attn_norm.bias": (d,), "attn_qkv.weight": (3 * d, d),
                 "attn_qkv.bias": (3 * d,), "attn_output.weight": (d, d), "attn_output.bias": (d,),
                 "ffn_norm.weight": (d,), "ffn_norm.bias": (d,), "ffn_up.weight": (f, d), "ffn_up.bias": (f,),
                 "ffn_down.weight": (d, f), "ffn_down.bias": (d,)}
    else:
        out.update({f"{name}.weight": ((cfg.rotary_dim // 2,), False) for name in ROTARY[arch].rope_tensors})
        layer = layer_tensors(cfg, ROTARY[arch])
    for i in range(cfg.n_layer):
        out.update({f"blk.{i}.{name}": (shape, True) for name, shape in layer.items()})
    return out


def check_tensors(path: Path, cfg: Config, arch: str, tensors: list[TensorInfo]):
    """Every tensor known, of the shape the config implies and of a type allowed for it; none missing."""
    if cfg.n_layer > len(tensors):  # every block has tensors of its own: the table is not built for a bad count
        raise UserError(f"{path}: metadata key {arch}.block_count={cfg.n_layer} is more than the file's "
                        f"{len(tensors)} tensors")
    want = expected_tensors(cfg, arch)
    for t in tensors:
        if t.name not in want:
            what = "a tensor of another architecture or of a feature not supported"
            raise UserError(f"{path}: tensor {t.name} is not part of a {arch} model ({what})")
        shape = want[t.name][0]
        if tuple(t.shape) != shape:
            raise UserError(f"{path}: tensor {t.name} is {t.shape}; the metadata makes it {list(shape)}")
        allowed = FLOAT_TYPES if len(shape) == 1 or t.name == "position_embd.weight" else MATRIX_TYPES
        if t.type not in allowed:
            import gguf

            raise UserError(f"{path}: tensor {t.name} has type {gguf.GGMLQuantizationType(t.type).name}, "
                            "which is not allowed for it")
    names = {t.name for t in tensors}
    missing = next((n for n, (_, needed) in want.items() if needed and n not in names), None)
    if missing:
        raise UserError(f"{path}: tensor {missing} is missing")
    pair = [n for n in ("rope_factors_long.weight", "rope_factors_short.weight") if n in names]
    if len(pair) == 1:
        raise UserError(f"{path}: tensor {pair[0]} comes without its long/short partner")


def check_vocabulary(path: Path, meta: dict):
    """Tokens are strings, types and special ids in range, every merge joins two known tokens."""
    tokens = meta["tokenizer.ggml.tokens"]
    if not all(isinstance(t, str) for t in tokens):
        raise UserError(f"{path}: metadata key tokenizer.ggml.tokens must be a list of strings")
    n = len(tokens)
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None and (not isinstance(types, list) or len(types) != n
                              or not all(isinstance(k, int) and 0 <= k <= 6 for k in types)):
        raise UserError(f"{path}: metadata key tokenizer.ggml.token_type must be {n} token types (0 to 6)")
    for key in SPECIAL_IDS:
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None and (isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n):
            raise UserError(f"{path}: metadata key tokenizer.ggml.{key}={shown(i)} is not a token id (0 to {n - 1})")
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        return
    known = set(tokens)
    if not isinstance(merges, list):
        raise UserError(f"{path}: metadata key tokenizer.ggml.merges must be a list of strings")
    for j, merge in enumerate(merges):
        parts = merge.split(" ", 1) if isinstance(merge, str) else []
        if len(parts) != 2 or parts[0] not in known or parts[1] not in known:
            raise UserError(f"{path}: metadata key tokenizer.ggml.merges[{j}]={shown(merge)} does not join two "
                            "tokens of the vocabulary")


def validated(path: Path, header: Header, make_tokenizer):
    """(config, tokenizer) of a parsed header, after every check in this order: the metadata, the
    vocabulary, the tokenizer `make_tokenizer()` builds, the tensors."""
    cfg = config_from_meta(path, header.meta, header.tensors)
    check_vocabulary(path, header.meta)
    tokenizer = make_tokenizer()
    check_tensors(path, cfg, header.meta["general.architecture"], header.tensors)
    return cfg, tokenizer
