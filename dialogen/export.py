"""`dialogen export --gguf OUT.gguf`: a model as llama.cpp, Ollama and LM Studio run it;
`dialogen export --merge OUT_DIR --adapter DIR`: a base with a LoRA adapter folded into its weights,
as a Hugging Face directory.

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


def cmd_export(args) -> int:
    if (args.gguf is None) == (args.merge is None):
        raise UserError("give one of --gguf OUT.gguf or --merge OUT_DIR")
    if args.merge is not None:
        if args.adapter is None:
            raise UserError("--merge folds an adapter into its base: give --adapter DIR")
        print(json.dumps(export_merged(args.model, Path(args.merge), args.adapter, args.template)))
        return 0
    print(json.dumps(export_gguf(args.model, Path(args.gguf), args.type, args.template, args.adapter)))
    return 0


def register(sub):
    p = sub.add_parser("export", help="write a model as a GGUF file for llama.cpp, Ollama, LM Studio, or a base "
                       "with a LoRA adapter merged in",
                       description="Writes a llama or gpt2 model (a checkpoint, a Hugging Face directory, a GGUF "
                                   "file or the default model) as GGUF with its tokenizer and chat template, so "
                                   "llama.cpp can chat with it; with --adapter, the adapter is folded into the "
                                   "weights first. --merge writes such a merged model as a Hugging Face directory.")
    p.add_argument("--gguf", metavar="OUT.gguf", help="the GGUF file to write")
    p.add_argument("--merge", metavar="OUT_DIR", help="write the base with --adapter folded into its weights as a "
                   "Hugging Face directory (transformers, vLLM and dialogen load it)")
    add_model_path_args(p, "the model to export (default: the embedded model; with --adapter, the base it names)",
                        "the chat template written into the file (default: the model's own, as dialogen chats with it)")
    add_adapter_arg(p)
    p.add_argument("--type", default="f16", choices=TYPES, help="how matrices are stored: f32, f16, or llama.cpp's "
                   "block types Q8_0 (8 bits and a scale per 32) and Q4_0 (4 bits and a scale per 32) "
                   "(default: %(default)s)")
    p.set_defaults(func=cmd_export)
