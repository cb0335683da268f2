"""`dialogen export --gguf OUT.gguf`: a model as llama.cpp, Ollama and LM Studio run it;
`dialogen export --merge OUT_DIR --adapter DIR`: a base with a LoRA adapter folded into its weights,
as a Hugging Face directory (or, for `--merge OUT.gguf`, a GGUF file);
`dialogen export --gguf-lora OUT.gguf --adapter DIR`: the adapter alone, as the GGUF LoRA file
llama.cpp loads beside its base (`llama-server --lora`, `models/gguf_lora.py`).

The model is loaded as dialogen chats with it (its template included) and written by
`models.gguf_export.write_gguf`. Reading it back with dialogen (`--model OUT.gguf`) gives the same
logits within the stored type's rounding. With `--adapter`, the adapter is folded in first
(W += B A alpha / r on the rows it adapts), for either output."""

from __future__ import annotations

import json
from pathlib import Path

from .decoding.engine import add_adapter_arg, add_model_path_args, load_engine
from .errors import UserError

TYPES = ("f32", "f16", "q8_0", "q4_0")  # as models/gguf_export.TYPES (torch-free here, for --help)


def _merged_engine(model: str | None, template: str, adapter: str | None):
    """The float32 reference of `model`, with `adapter` folded into its weights when given."""
    engine = load_engine(model, template, "float32", adapter)
    if getattr(getattr(engine.model, "cfg", None), "arch", None) not in ("llama", "gpt2"):
        raise UserError(f"{model}: only llama and gpt2 models can be exported to GGUF (this one is an RNN)")
    if engine.model.adapter is not None:
        engine.model.adapter.merge_into(engine.model)
    return engine


def export_merged(model: str | None, out: Path, adapter: str | None, template: str = "auto") -> dict:
    """Write `model` with `adapter` folded in as a Hugging Face directory `out`; returns a summary."""
    from .models.loading import save_transformer

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty directory")
    engine = _merged_engine(model, template, adapter)
    tok, tpl = engine.tokenizer, engine.template
    tok.chat_template = tpl.source
    meta = {"template": tpl.name, **tpl.stop_meta(tok), "merged_adapter": engine.meta.get("adapter")}
    save_transformer(out, engine.model, tok, meta)
    return {"out": str(out), "arch": engine.model.cfg.arch, "template": tpl.name, "adapter": engine.meta.get("adapter")}


def export_gguf(model: str | None, out: Path, kind: str = "f16", template: str = "auto",
                adapter: str | None = None) -> dict:
    """Write `model` (a --model value; with `adapter` folded in) as a GGUF file `out`; returns a summary."""
    from .models.gguf_export import write_gguf  # lazily: torch stays out of --help

    if kind not in TYPES:
        raise UserError(f"--type {kind!r} is not one of {', '.join(TYPES)}")
    out = Path(out).expanduser()
    if out.suffix != ".gguf":
        raise UserError(f"{out}: the output file must end in .gguf")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such directory")
    engine = _merged_engine(model, template, adapter)
    cfg = engine.model.cfg
    tok, tpl = engine.tokenizer, engine.template
    n = write_gguf(out, cfg, engine.model.state_dict(), tok, kind, engine.name, tpl.source, tpl.stop_ids(tok))
    return {"out": str(out), "arch": cfg.arch, "type": kind, "template": tpl.name, "tensors": n,
            "bytes": out.stat().st_size}


def export_gguf_lora(model: str | None, out: Path, adapter: str, kind: str = "f16") -> dict:
    """Write the adapter `adapter` (for the base `model`, or the base it names) as a GGUF LoRA `out`."""
    from .models.gguf_lora import gguf_arch, write_gguf_lora
    from .models.loading import load_adapter

    out = Path(out).expanduser()
    if out.suffix != ".gguf":
        raise UserError(f"{out}: the output file must end in .gguf")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such directory")
    lora = load_adapter(model, adapter)
    n = write_gguf_lora(out, lora, kind, Path(adapter).expanduser().resolve().name)
    return {"out": str(out), "arch": gguf_arch(lora.cfg), "type": kind, "r": lora.settings.r,
            "alpha": lora.settings.alpha, "tensors": n, "bytes": out.stat().st_size}


def cmd_export(args) -> int:
    if sum(x is not None for x in (args.gguf, args.merge, args.gguf_lora)) != 1:
        raise UserError("give one of --gguf OUT.gguf, --merge OUT_DIR or --gguf-lora OUT.gguf")
    if args.gguf is None and args.adapter is None:
        what = "--merge folds an adapter into its base" if args.merge else "--gguf-lora writes an adapter"
        raise UserError(f"{what}: give --adapter DIR")
    if args.gguf_lora is not None:
        print(json.dumps(export_gguf_lora(args.model, Path(args.gguf_lora), args.adapter, args.type)))
    elif args.merge is not None and Path(args.merge).suffix != ".gguf":
        print(json.dumps(export_merged(args.model, Path(args.merge), args.adapter, args.template)))
    else:
        out = Path(args.gguf if args.gguf is not None else args.merge)
        print(json.dumps(export_gguf(args.model, out, args.type, args.template, args.adapter)))
    return 0


def register(sub):
    p = sub.add_parser("export", help="write a model as a GGUF file for llama.cpp, Ollama, LM Studio, a base "
                       "with a LoRA adapter merged in, or an adapter as a GGUF LoRA",
                       description="Writes a llama or gpt2 model (a checkpoint, a Hugging Face directory, a GGUF "
                                   "file or the default model) as GGUF with its tokenizer and chat template, so "
                                   "llama.cpp can chat with it; with --adapter, the adapter is folded into the "
                                   "weights first. --merge writes such a merged model as a Hugging Face directory; "
                                   "--gguf-lora writes the adapter alone for llama.cpp's --lora.")
    p.add_argument("--gguf", metavar="OUT.gguf", help="the GGUF file to write")
    p.add_argument("--merge", metavar="OUT_DIR", help="write the base with --adapter folded into its weights as a "
                   "Hugging Face directory (transformers, vLLM and dialogen load it), or as GGUF when the name "
                   "ends in .gguf (the same as --gguf with --adapter)")
    p.add_argument("--gguf-lora", metavar="OUT.gguf", help="write --adapter alone as a GGUF LoRA file for "
                   "llama.cpp (llama-server --lora OUT.gguf, beside the base's GGUF file); --type f32 or f16")
    add_model_path_args(p, "the model to export (default: the embedded model; with --adapter, the base it names)",
                        "the chat template written into the file (default: the model's own, as dialogen chats with it)")
    add_adapter_arg(p)
    p.add_argument("--type", default="f16", choices=TYPES, help="how matrices are stored: f32, f16, or llama.cpp's "
                   "block types Q8_0 (8 bits and a scale per 32) and Q4_0 (4 bits and a scale per 32) "
                   "(default: %(default)s)")
    p.set_defaults(func=cmd_export)
