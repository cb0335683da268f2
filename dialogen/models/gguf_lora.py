"""A LoRA adapter as a GGUF file that llama.cpp loads beside its base (`llama-server --lora FILE`,
`llama-cli --lora FILE`), and such a file read back as an `Adapter`.

The layout is the one llama.cpp's `src/llama-adapter.cpp` reads: metadata `general.type = adapter`,
`adapter.type = lora`, `adapter.lora.alpha` and the base file's `general.architecture`; for each
adapted matrix of the base, two tensors named after the base's tensor, `blk.N.attn_q.weight.lora_a`
holding A (r, in) and `blk.N.attn_q.weight.lora_b` holding B (out, r). llama.cpp adds
`B (A x) * alpha / r` to that matrix's product, r read from the tensors' shapes.

The base file's rows decide B's rows: llama-architecture files interleave the two rotary halves of
each q/k head (`gguf_export.permute_rows`), so B of q_proj and k_proj is interleaved the same way;
the files of qwen2, qwen3 and gemma keep Hugging Face's order. A LoRA on a fused Linear of ours
(qkv, gate_up) is one pair per part, as PEFT stores it, and GPT-2's fused c_attn is one pair.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .gguf_config import ROTATE_HALVES
from .gguf_export import permute_rows, write_file
from .gguf_file import GPT2_RENAME, RENAME, _floats, map_file, unpermute_rows
from .gguf_header import read_header
from .hf import model_type
from .lora import Adapter, LoraSettings, peft_modules
from .transformer import Config

TYPES = ("f32", "f16")
# config.json model_type -> the GGUF architecture llama.cpp's converter gives such a model
HF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2"}


def gguf_arch(cfg: Config) -> str:
    """The `general.architecture` of the GGUF file llama.cpp runs this base from."""
    if cfg.extra.get("gguf_arch"):
        return cfg.extra["gguf_arch"]  # the base is a GGUF file
    mt = model_type(cfg)
    if mt not in HF_ARCH:
        raise UserError(f"a GGUF LoRA is written for the base's GGUF file: give that file as --model "
                        f"(this base is a {mt} directory; from one, only {', '.join(HF_ARCH)} are known)")
    return HF_ARCH[mt]


def tensor_names(cfg: Config) -> dict[str, tuple[str, int | None]]:
    """PEFT module name -> (the base's GGUF tensor name, heads whose rows the file interleaves or None)."""
    interleaved = cfg.arch == "llama" and gguf_arch(cfg) not in ROTATE_HALVES
    rename = {v: k for k, v in (GPT2_RENAME if cfg.arch == "gpt2" else RENAME).items()}
    heads = {"attn_q": cfg.n_head, "attn_k": cfg.n_kv_head} if interleaved else {}
    out = {}
    for module in peft_modules(cfg):
        # model.layers.3.self_attn.q_proj / transformer.h.3.attn.c_attn -> (3, self_attn.q_proj / attn.c_attn)
        layer, local = module.split(".", 2)[2].split(".", 1)
        short = rename[local]
        out[module] = (f"blk.{layer}.{short}.weight", heads.get(short))
    return out


def lora_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """{GGUF tensor name: float32 tensor} of the adapter: `<base tensor>.lora_a` A (r, in) and
    `.lora_b` B (out, r), B's rows in the base file's order."""
    names = tensor_names(adapter.cfg)
    out = {}
    for module in adapter.names:
        part = adapter.parts[module.replace(".", "-")]
        base, heads = names[module]
        b = part.B.detach().float()
        out[base + ".lora_a"] = part.A.detach().float().contiguous()
        out[base + ".lora_b"] = permute_rows(b, heads) if heads else b.contiguous()
    return out


def write_gguf_lora(out: Path, adapter: Adapter, kind: str = "f16", name: str = "adapter") -> int:
    """Write `adapter` to `out` (atomically) as llama.cpp's GGUF LoRA; the tensor count."""
    import gguf

    if kind not in TYPES:
        raise UserError(f"--type {kind!r}: a GGUF LoRA stores f32 or f16")
    arch = gguf_arch(adapter.cfg)
    tensors = lora_tensors(adapter)

    def fill(w):
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.settings.alpha))
        w.add_name(name)
        w.add_file_type(gguf.LlamaFileType.ALL_F32 if kind == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tensor_name, t in tensors.items():
            a = t.numpy()
            w.add_tensor(tensor_name, a if kind == "f32" else a.astype(np.float16))

    write_file(out, arch, fill)
    return len(tensors)


def is_gguf_lora(path: Path) -> bool:
    return path.suffix == ".gguf" and path.is_file()


def read_gguf_lora(path: Path, cfg: Config) -> Adapter:
    """The GGUF LoRA at `path` as an `Adapter` on a model of `cfg`; a file of another kind, or made
    for another base (architecture, a tensor the base lacks, a shape), is refused in one line."""
    header = read_header(path)
    meta = header.meta
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise UserError(f"{path}: not a GGUF LoRA adapter (general.type {meta.get('general.type')!r}, "
                        f"adapter.type {meta.get('adapter.type')!r})")
    arch = gguf_arch(cfg)
    if meta.get("general.architecture") != arch:
        raise UserError(f"{path}: the adapter is for another base: its architecture is "
                        f"{meta.get('general.architecture')!r}, this model's GGUF architecture is {arch!r}")
    if "adapter.alora.invocation_tokens" in meta:
        raise UserError(f"{path}: activated LoRA (adapter.alora.invocation_tokens) is not supported")
    modules = {base: (module, heads) for module, (base, heads) in tensor_names(cfg).items()}
    data, pairs = map_file(path), {}
    for t in header.tensors:
        base, _, which = t.name.rpartition(".lora_")
        if which not in ("a", "b"):
            raise UserError(f"{path}: tensor {t.name} is not a lora_a or lora_b tensor (only plain LoRA is supported)")
        if base not in modules:
            raise UserError(f"{path}: the adapter is for another base: this model has no adaptable tensor {base}")
        pairs.setdefault(base, {})[which] = torch.from_numpy(_floats(data[t.offset:t.offset + t.bytes], t.type, t.shape))
    return _adapter(path, cfg, pairs, modules, meta.get("adapter.lora.alpha", 0.0))


def _adapter(path: Path, cfg: Config, pairs: dict, modules: dict, alpha: float) -> Adapter:
    """The adapter of `pairs` ({base tensor: {"a": A, "b": B}}), checked against the model's shapes."""
    if not pairs:
        raise UserError(f"{path}: the adapter holds no tensors")
    ranks = set()
    for base, ab in pairs.items():
        if set(ab) != {"a", "b"}:
            raise UserError(f"{path}: tensor {base}.lora_{'b' if 'a' in ab else 'a'} is missing")
        ranks.add(ab["a"].shape[0] if ab["a"].dim() == 2 else -1)
    if len(ranks) != 1 or -1 in ranks:
        raise UserError(f"{path}: its lora_a tensors differ in rank ({sorted(ranks)}); one rank is supported")
    r = ranks.pop()
    order = list(peft_modules(cfg))
    found = tuple(sorted((modules[base][0] for base in pairs), key=order.index))
    alpha = float(alpha) if alpha else float(r)  # llama.cpp: alpha 0 means a scale of 1
    adapter = Adapter(cfg, LoraSettings(r, alpha, 0.0, found))
    for base, ab in pairs.items():
        module, heads = modules[base]
        part = adapter.parts[module.replace(".", "-")]
        for m, p, t in (("a", part.A, ab["a"]), ("b", part.B, ab["b"])):
            if tuple(t.shape) != tuple(p.shape):
                raise UserError(f"{path}: the adapter is for another base: {base}.lora_{m} is {list(t.shape)}, "
                                f"this model needs {list(p.shape)}")
        with torch.no_grad():
            part.A.copy_(ab["a"])
            part.B.copy_(unpermute_rows(ab["b"], heads) if heads else ab["b"])
    return adapter.eval().requires_grad_(False)
