"""Bench model files of deployed shapes, with random weights, in the GGUF types people download.

Random weights decode exactly as fast as trained ones of the same shape and type, so the speed and
memory benches need no model hub: this writes an F16 GGUF of the chosen shape from seeded random
weights (gguf-py's writer; the default model's tokenizer, padded to the shape's vocabulary) and
turns it into each requested type with llama.cpp's own `llama-quantize` (built by
`make bench-peers`). Files land in `<cache>/bench-models/` unless `--out` says otherwise.

    .venv/bin/python bench/make_models.py --shape llama-1b --types Q4_K_M Q4_0
    .venv/bin/python bench/make_models.py --shape qwen-3b --types Q4_K_M Q4_0

`--families` writes, for every family dialogen reads, a tiny random model built from transformers'
own config class (save_pretrained, with the default model's byte-level BPE tokenizer so llama.cpp's
converter recognises its pre-tokenizer) and its F16 GGUF made by llama.cpp's `convert_hf_to_gguf.py`,
run by the converter's own venv (`make bench-peers`: `.venv-convert`). `--default-types` quantizes the
default model, from its F16 GGUF, into each listed type. bench/family_parity.py compares them.

    .venv/bin/python bench/make_models.py --families --default-types Q4_K_M Q5_K_M Q6_K IQ4_NL Q4_0 Q5_0 Q8_0
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

CONVERT_VENV = Path(__file__).resolve().parent.parent / ".venv-convert"

# the published shapes of Llama-3.2-1B-Instruct and Qwen2.5-3B-Instruct (their config.json values)
SHAPES = {
    "llama-1b": dict(arch="llama", vocab=128256, d=2048, layers=16, heads=32, kv=8, ff=8192, theta=500000.0,
                     ctx=131072, eps=1e-5, bias=False, llama3_rope=(32.0, 1.0, 4.0, 8192)),
    "qwen-3b": dict(arch="qwen2", vocab=151936, d=2048, layers=36, heads=16, kv=2, ff=11008, theta=1000000.0,
                    ctx=32768, eps=1e-6, bias=True, llama3_rope=None),
}


def llama3_rope_factors(head_dim: int, theta: float, factor: float, low: float, high: float, original: int):
    """The per-frequency divisors of Llama 3.1's rope scaling (the `rope_freqs.weight` tensor of its GGUFs)."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = original / low, original / high
    smooth = (original / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, factor, mid))
    return out.astype(np.float32)


def default_tokenizer():
    """(tokens, token types, merges, pre) of the embedded default model's vocabulary."""
    import gguf

    from dialogen.models.loading import default_model_path

    r = gguf.GGUFReader(str(default_model_path()))
    f = r.fields
    return (f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.token_type"].contents(),
            f["tokenizer.ggml.merges"].contents(), f["tokenizer.ggml.pre"].contents())


def write_f16(path: Path, name: str, s: dict, seed: int = 0):
    import gguf

    rng = np.random.default_rng(seed)
    hd = s["d"] // s["heads"]
    w = gguf.GGUFWriter(str(path), s["arch"])
    w.add_name(f"random {name}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_block_count(s["layers"])
    w.add_context_length(s["ctx"])
    w.add_embedding_length(s["d"])
    w.add_feed_forward_length(s["ff"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv"])
    w.add_rope_freq_base(s["theta"])
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(s["eps"])
    w.add_vocab_size(s["vocab"])
    tokens, types, merges, pre = default_tokenizer()
    pad = s["vocab"] - len(tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(list(tokens) + [f"<|bench_pad_{i}|>" for i in range(pad)])
    # the padding is ordinary vocabulary, as the bulk of a published vocabulary is (Llama-3's 128,000
    # BPE tokens, beside 256 control tokens); no merge produces these ids
    w.add_token_types(list(types) + [int(gguf.TokenType.NORMAL)] * pad)
    w.add_token_merges(list(merges))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)

    def mat(rows, cols, std=0.02):  # GGUF lists shapes innermost first; numpy's (rows, cols) is (out, in)
        return (rng.standard_normal((rows, cols), dtype=np.float32) * std).astype(np.float16)

    def vec(n, value=1.0):
        return np.full(n, value, dtype=np.float32)

    w.add_tensor("token_embd.weight", mat(s["vocab"], s["d"]))
    w.add_tensor("output_norm.weight", vec(s["d"]))
    if s["llama3_rope"]:
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(hd, s["theta"], *s["llama3_rope"]))
    for i in range(s["layers"]):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", vec(s["d"]))
        w.add_tensor(b + "ffn_norm.weight", vec(s["d"]))
        w.add_tensor(b + "attn_q.weight", mat(s["heads"] * hd, s["d"]))
        w.add_tensor(b + "attn_k.weight", mat(s["kv"] * hd, s["d"]))
        w.add_tensor(b + "attn_v.weight", mat(s["kv"] * hd, s["d"]))
        if s["bias"]:
            for n, rows in (("q", s["heads"] * hd), ("k", s["kv"] * hd), ("v", s["kv"] * hd)):
                w.add_tensor(b + f"attn_{n}.bias", (rng.standard_normal(rows) * 0.02).astype(np.float32))
        w.add_tensor(b + "attn_output.weight", mat(s["d"], s["heads"] * hd))
        w.add_tensor(b + "ffn_gate.weight", mat(s["ff"], s["d"]))
        w.add_tensor(b + "ffn_up.weight", mat(s["ff"], s["d"]))
        w.add_tensor(b + "ffn_down.weight", mat(s["d"], s["ff"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()


def quantizer() -> str:
    exe = shutil.which("llama-quantize") or str(Path(sys.executable).with_name("llama-quantize"))
    if not Path(exe).exists():
        raise SystemExit("make_models: llama-quantize is not built (make bench-peers)")
    return exe


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", action="store_true", help="tiny random models of every family, HF dir and F16 GGUF")
    ap.add_argument("--family-type", choices=["f16", "f32"], default="f16",
                    help="the converter's --outtype for --families (f32: no rounding in llama.cpp's products)")
    ap.add_argument("--default-types", nargs="*", default=[],
                    help="quantize the default model's F16 GGUF into these llama-quantize types")
    ap.add_argument("--convert-python", type=Path, default=CONVERT_VENV / "bin/python",
                    help="the python of the converter's venv")
    ap.add_argument("--converter", type=Path, default=CONVERT_VENV / "llama.cpp/convert_hf_to_gguf.py",
                    help="llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    ap.add_argument("--types", nargs="+", default=["Q4_K_M", "Q4_0"],
                    help="llama-quantize type names (Q4_K_M, Q5_K_M, Q6_K, Q4_0, IQ4_NL, ...); F16 keeps the source")
    ap.add_argument("--out", type=Path, default=None, help="directory (default: <cache>/bench-models)")
    args = ap.parse_args()
    from dialogen.paths import cache_dir

    out = args.out or cache_dir() / "bench-models"
    out.mkdir(parents=True, exist_ok=True)
    if args.families or args.default_types:
        from family_models import write_default_types, write_families

        if args.families:
            write_families(out / "families", args.convert_python, args.converter, outtype=args.family_type)
        if args.default_types:
            write_default_types(out, args.default_types, args.convert_python, args.converter, quantizer)
        return
    f16 = out / f"{args.shape}-F16.gguf"
    if not f16.exists():
        tmp = f16.with_suffix(".part")
        write_f16(tmp, args.shape, SHAPES[args.shape])
        tmp.replace(f16)
    for t in args.types:
        target = out / f"{args.shape}-{t}.gguf"
        if t != "F16" and not target.exists():
            tmp = target.with_suffix(".part")
            subprocess.run([quantizer(), str(f16), str(tmp), t, "2"], check=True, stdout=subprocess.DEVNULL)
            tmp.replace(target)
        print(target if t != "F16" else f16)


if __name__ == "__main__":
    main()
