"""An `Engine`: a loaded model with its tokenizer and chat template, and the model flags that build one.

Everything that replies (a session, the searches and rerankers, the server, `dialogen eval`)
drives an Engine. `engine_from_args` is the one place the command line turns `--model`,
`--template` and `--dtype` into one. Torch-free at import, so that `dialogen --help` builds its
flags from here without loading torch: `load_engine` imports the model code when it runs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from ..chat.templates import Template, default_template_name, get_template
from .settings import Sampling

DTYPES = ("auto", "int4", "int8", "float16", "bfloat16", "float32")  # as models/loading.DTYPES (torch-free here)


@dataclass
class Engine:
    """A loaded model with its tokenizer and chat template."""

    model: object  # a models.family.Generator (a torch module)
    tokenizer: object
    template: Template
    context_length: int
    name: str = "dialogen"
    meta: dict = field(default_factory=dict)  # the checkpoint's dialogen.json

    def stops(self, s: Sampling) -> tuple[Sampling, set[int]]:
        """The one place a reply's stops are merged: `s` with the template's stop strings added, and
        the template's stop ids."""
        tpl, tok = self.template, self.tokenizer
        return s.replace(stop=s.stop + tpl.stop_strings(tok)), tpl.stop_ids(tok)


def load_engine(model: str | None = None, template: str = "auto", dtype="float32", adapter: str | None = None) -> Engine:
    """`dtype`: the decode weights swapped in at load (see `models.native.swap_in`); `adapter`: a
    LoRA adapter directory or GGUF LoRA file added to the model's products (`models/lora.py`)."""
    from ..models.loading import load  # here: torch loads with the model, not with --help

    loaded = load(model, dtype, adapter)
    cfg = loaded.model.cfg
    name = default_template_name(loaded.meta, loaded.tokenizer, cfg.arch) if template in (None, "auto") else template
    return Engine(loaded.model, loaded.tokenizer, get_template(name, loaded.tokenizer), cfg.max_seq_len,
                  loaded.path.name, loaded.meta)


def adapter_engine(base: Engine, directory, template: str = "auto") -> Engine:
    """The engine of the LoRA adapter in `directory` when it is served on `base`'s model by name: its
    tokenizer and template are those `load_engine(adapter=directory)` picks (a `dialogen train
    --lora-r` checkpoint's own, else the base's)."""
    from pathlib import Path

    from ..errors import UserError
    from ..models.loading import adapter_chat  # here: torch loads with the model, not with --help

    where = Path(directory).expanduser()
    own = adapter_chat(where)
    if own is None:
        tok, meta = base.tokenizer, base.meta
    else:
        tok, meta = own
        if tok.vocab_size != base.tokenizer.vocab_size:
            raise UserError(f"{where}: the adapter's tokenizer has {tok.vocab_size} tokens, the base's "
                            f"{base.tokenizer.vocab_size}: it is for another base")
    if own is None and template in (None, "auto"):
        tpl = base.template
    else:
        tpl = get_template(default_template_name(meta, tok, base.model.cfg.arch) if template in (None, "auto")
                           else template, tok)
    return Engine(base.model, tok, tpl, base.context_length, where.name, meta)


# --- the command-line edge -------------------------------------------------------------------
def add_model_path_args(p, model_help: str = "model path or 'default' (default: %(default)s)",
                        template_help: str = "chat template (default: the model's own)"):
    """--model and --template: the model a command reads."""
    p.add_argument("--model", default="default", help=model_help)
    p.add_argument("--template", default="auto", help=template_help)


def add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    add_model_path_args(g, "a .gguf file, a Hugging Face model directory (llama or gpt2 type) or a dialogen "
                        "checkpoint; default: the embedded SmolLM2-135M-Instruct",
                        "chat template: chatml, llama2, dialogpt, jinja (the model's own); default: the model's "
                        "own if it has one")
    add_adapter_arg(g)
    g.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights swapped in for inference (training and saving use the float32 reference). "
                        "auto: a GGUF file's own Q4_0/Q4_1/Q8_0 blocks, else int8; int8: Q8_0 blocks (a scale per "
                        "32 weights); int4: Q4_1 blocks (scale and minimum per 32); both need a C compiler for the "
                        "native kernels (built once). float16/bfloat16: a copy for decode steps; float32: none "
                        "(default: %(default)s)")
    g.add_argument("--no-kernels", action="store_true",
                   help="run the reference torch model, without the native kernels (fused decode step, block "
                        "products); slower, for comparison or a machine without a C compiler. "
                        "Same as DIALOGEN_KERNELS=0")


def add_adapter_arg(p):
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter (PEFT's adapter_config.json and adapter_model.safetensors, e.g. a "
                        "`dialogen train --lora-r` checkpoint, or a GGUF LoRA file) on the model; without --model, "
                        "the base it names")


def engine_from_args(args, dtype=None) -> Engine:
    """The Engine of the flags of `add_model_args` (or `add_model_path_args` and a `dtype`)."""
    return load_engine(args.model, args.template, dtype or args.dtype, getattr(args, "adapter", None))
