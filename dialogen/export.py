"""`dialogen export --gguf OUT.gguf`: a model as llama.cpp, Ollama and LM Studio run it.

The model is loaded as dialogen chats with it (its template included) and written by
`models.gguf_export.write_gguf`. Reading it back with dialogen (`--model OUT.gguf`) gives the same
logits within the stored type's rounding."""

from __future__ import annotations

import json
from pathlib import Path

from .decoding.engine import add_model_path_args, load_engine
from .errors import UserError

TYPES = ("f32", "f16", "q8_0", "q4_0")  # as models/gguf_export.TYPES (torch-free here, for --help)


def export_gguf(model: str | None, out: Path, kind: str = "f16", template: str = "auto") -> dict:
    """Write `model` (a --model value) as a GGUF file `out`; returns a summary."""
    from .models.gguf_export import write_gguf  # lazily: torch stays out of --help

    if kind not in TYPES:
        raise UserError(f"--type {kind!r} is not one of {', '.join(TYPES)}")
    out = Path(out).expanduser()
    if out.suffix != ".gguf":
        raise UserError(f"{out}: the output file must end in .gguf")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such directory")
    engine = load_engine(model, template, "float32")
    cfg = engine.model.cfg
    if cfg.arch not in ("llama", "gpt2"):
        raise UserError(f"{model}: only llama and gpt2 models can be exported to GGUF (this one is an RNN)")
    tok, tpl = engine.tokenizer, engine.template
    n = write_gguf(out, cfg, engine.model.state_dict(), tok, kind, engine.name, tpl.source, tpl.stop_ids(tok))
    return {"out": str(out), "arch": cfg.arch, "type": kind, "template": tpl.name, "tensors": n,
            "bytes": out.stat().st_size}


def cmd_export(args) -> int:
    print(json.dumps(export_gguf(args.model, Path(args.gguf), args.type, args.template)))
    return 0


def register(sub):
    p = sub.add_parser("export", help="write a model as a GGUF file for llama.cpp, Ollama, LM Studio",
                       description="Writes a llama or gpt2 model (a checkpoint, a Hugging Face directory, a GGUF "
                                   "file or the default model) as GGUF with its tokenizer and chat template, so "
                                   "llama.cpp can chat with it.")
    p.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    add_model_path_args(p, "the model to export (default: the embedded model)",
                        "the chat template written into the file (default: the model's own, as dialogen chats with it)")
    p.add_argument("--type", default="f16", choices=TYPES, help="how matrices are stored: f32, f16, or llama.cpp's "
                   "block types Q8_0 (8 bits and a scale per 32) and Q4_0 (4 bits and a scale per 32) "
                   "(default: %(default)s)")
    p.set_defaults(func=cmd_export)
