"""The files of bench/make_models.py's `--families` and `--default-types`: tiny random models of every
family, as HF directories (transformers' config classes, save_pretrained) and as F16 GGUFs written by
llama.cpp's own converter; and the default model in llama.cpp's quant types.

Every family gets the default model's tokenizer (a byte-level BPE whose pre-tokenizer llama.cpp's
converter identifies by hashing its outputs), so the vocabulary is the same 49152 ids everywhere and
one list of prompt ids serves every model. `status.json` beside the files records, per family, "ok"
or the converter's last error line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

VOCAB = 49152  # the default model's vocabulary
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5,
             bos_token_id=1, eos_token_id=2, pad_token_id=2)

# family -> (transformers config class name, its arguments beyond SIZES). Sliding windows stay wider
# than a prompt plus its greedy tokens: the comparison is of each family's full-attention math.
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "gemma": ("GemmaConfig", {}),
    "gemma2": ("Gemma2Config", dict(sliding_window=256, query_pre_attn_scalar=16)),
    # six layers: gemma3's default pattern (the only one its GGUF records) has one global layer in six
    "gemma3_text": ("Gemma3TextConfig", dict(sliding_window=256, query_pre_attn_scalar=16, num_hidden_layers=6)),
    "phi3": ("Phi3Config", {}),
    "granite": ("GraniteConfig", dict(embedding_multiplier=2.0, attention_multiplier=0.25, residual_multiplier=0.5,
                                      logits_scaling=2.0)),
    "smollm3": ("SmolLM3Config", {}),
    "olmo2": ("Olmo2Config", {}),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=4, n_head=4, n_positions=512, bos_token_id=1, eos_token_id=2)),
}


# families whose converter reads a SentencePiece tokenizer.model only; they get one trained on the tests'
# corpus (llama.cpp pads its vocabulary to the model's), and prompts are compared as ids
SENTENCEPIECE_ONLY = ("gemma", "gemma2")


def sentencepiece_model() -> bytes:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import gguf_vocabs

    return gguf_vocabs.train_sentencepiece().serialized_model_proto()


def build_family(directory: Path, family: str, seed: int = 0):
    """A tiny random model of `family` in `directory`, weights wide enough for distinct greedy choices
    and representable in float16."""
    import torch
    import transformers

    from dialogen.models.loading import resolve

    cls_name, extra = FAMILIES[family]
    sizes = dict(vocab_size=VOCAB) if family == "gpt2" else dict(SIZES)
    if family == "phi3":  # phi3's head width is hidden_size / heads
        sizes.pop("head_dim")
    cfg = getattr(transformers, cls_name)(**{**sizes, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            elif "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0, 0.1)
            p.copy_(p.half().float())  # values an F16 GGUF holds exactly: HF dir and GGUF are one model
    model.save_pretrained(directory)
    if family == "gpt2":  # llama.cpp's converter reads the context length from n_ctx
        c = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**c, "n_ctx": c["n_positions"]}, indent=1))
    tokenizer_dir = resolve(None)
    if family in SENTENCEPIECE_ONLY:
        (directory / "tokenizer.model").write_bytes(sentencepiece_model())
    shutil.copy(tokenizer_dir / "tokenizer.json", directory / "tokenizer.json")
    tok_cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    tok_cfg["tokenizer_class"] = "GPT2Tokenizer"  # phi3's converter takes the BPE path only for this class
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1))


def convert(hf_dir: Path, out: Path, python: Path, converter: Path, outtype: str = "f16") -> str:
    """llama.cpp's converter on `hf_dir` -> `out` (F16, or `outtype`); "ok" or its last error line."""
    if not python.exists() or not converter.exists():
        raise SystemExit(f"make_models: the converter is not installed ({python}, {converter}): make bench-peers")
    tmp = out.with_suffix(".part")
    # general.name: llama.cpp gives a model named phi3 SentencePiece token rules (<s>, </s>, <unk> must
    # exist); this phi3 has a byte-level BPE vocabulary, as Phi-4-mini does
    name = "tiny random phi, byte-level BPE" if hf_dir.name == "phi3" else f"tiny random {hf_dir.name}"
    run = subprocess.run([str(python), str(converter), "--outtype", outtype, "--model-name", name, "--outfile", str(tmp),
                          str(hf_dir)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        tmp.unlink(missing_ok=True)
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        return "convert failed: " + (lines[-1] if lines else f"exit {run.returncode}")
    tmp.replace(out)
    return "ok"


def write_families(out: Path, python: Path, converter: Path, names=None, outtype: str = "f16") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    status_file = out / "status.json"
    status = json.loads(status_file.read_text()) if status_file.exists() else {}
    for family in names or FAMILIES:
        hf_dir, gguf = out / family, out / f"{family}-{outtype.upper()}.gguf"
        if not (hf_dir / "config.json").exists():
            build_family(hf_dir, family)
        if not gguf.exists():
            status[family] = convert(hf_dir, gguf, python, converter, outtype)
        print(f"{family}: {status.get(family, 'ok')}", flush=True)
        status_file.write_text(json.dumps(status, indent=1))
    return status


def write_default_types(out: Path, types: list[str], python: Path, converter: Path, quantizer) -> None:
    """The default model (its HF-style directory, converted to F16 by llama.cpp) in each type. A type
    llama-quantize refuses without an importance matrix is reported and skipped."""
    from dialogen.models.loading import resolve

    f16 = out / "default-F16.gguf"
    if not f16.exists():
        result = convert(resolve(None), f16, python, converter)
        if result != "ok":
            raise SystemExit(f"make_models: the default model: {result}")
    for t in types:
        target = out / f"default-{t}.gguf"
        if not target.exists():
            tmp = target.with_suffix(".part")
            run = subprocess.run([quantizer(), str(f16), str(tmp), t, "2"], capture_output=True, text=True)
            if run.returncode != 0:
                tmp.unlink(missing_ok=True)
                why = [line for line in (run.stderr + run.stdout).splitlines() if "imatrix" in line.lower()]
                print(f"skipped {t}: " + (why[-1].strip() if why else f"llama-quantize exit {run.returncode}"))
                continue
            tmp.replace(target)
        print(target)
