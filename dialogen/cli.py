"""Command line: argparse subcommands, each handing plain arguments to the library."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .decoding.settings import Sampling, add_decoding_args, decoding_from
from .errors import UserError

DTYPES = ("auto", "int4", "int8", "float16", "bfloat16", "float32")  # as models/loading.DTYPES (torch-free here)


def add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--model", default="default", help="a .gguf file, a Hugging Face model directory "
                   "(llama or gpt2 type) or a dialogen checkpoint; default: the embedded SmolLM2-135M-Instruct")
    g.add_argument("--template", default="auto", help="chat template: chatml, llama2, dialogpt, jinja "
                   "(the model's own); default: the model's own if it has one")
    g.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights used by decode steps (prefill and training stay float32). auto: a GGUF file's "
                        "own Q4_0/Q4_1/Q8_0 blocks, else int8; int8: Q8_0 blocks (a scale per 32 weights); "
                        "int4: Q4_1 blocks (scale and minimum per 32); both need a C compiler for the native "
                        "kernels (built once). float16/bfloat16/float32: plain copies (default: %(default)s)")
    g.add_argument("--no-kernels", action="store_true",
                   help="decode on the plain torch path, without the native kernels (fused decode step, block "
                        "products); slower, for comparison or a machine without a C compiler. "
                        "Same as DIALOGEN_KERNELS=0")


def add_sampling_args(p: argparse.ArgumentParser):
    d = Sampling()
    g = p.add_argument_group("decoding")
    g.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=d.top_k, help="keep the k most likely tokens; 0 = off (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass in (0, 1] (default: %(default)s)")
    g.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help="> 1 discourages tokens seen in the last 64 tokens; 1 = off (default: %(default)s)")
    g.add_argument("--frequency-penalty", type=float, default=d.frequency_penalty,
                   help="subtracted per earlier use of a token in the reply, -2 to 2; negative favours repeats "
                        "(default: %(default)s)")
    g.add_argument("--presence-penalty", type=float, default=d.presence_penalty,
                   help="subtracted once if a token was used in the reply, -2 to 2 (default: %(default)s)")
    g.add_argument("--no-repeat-ngram", type=int, default=d.no_repeat_ngram,
                   help="never repeat an n-gram of this size within a reply; 0 = off (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="reply length limit (default: %(default)s)")
    g.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--system", "--persona", dest="system", default=None,
                   help="persona: the system message, or a preset: virtual-assistant, friendly-chatbot, customer-service")
    g.add_argument("--max-context-tokens", type=int, default=None,
                   help="prompt budget; the oldest turns are dropped beyond it (default: model context - max new tokens, "
                        "and at least half the context)")


def add_constraint_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("structured output")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--json-schema", metavar="FILE", default=None,
                   help="every reply is JSON matching this JSON schema (a token mask at each step; needs "
                        "pip install 'dialogen[json]')")
    x.add_argument("--json", dest="json_object", action="store_true", help="every reply is a JSON object")


def sampling_from(args):
    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                    presence_penalty=args.presence_penalty, no_repeat_ngram=args.no_repeat_ngram,
                    max_new_tokens=args.max_new_tokens, seed=args.seed, stop=args.stop,
                    constraint=constraint_from(args))


def constraint_from(args):
    """The grammar of --json-schema FILE or --json (None without them)."""
    if not getattr(args, "json_schema", None) and not getattr(args, "json_object", False):
        return None  # (eval's own --json, for its output, is another flag)
    from .decoding.constrain import Grammar  # lazily: numpy and torch stay out of --help
    from .textio import load_json, read_file

    if args.json_object:
        return Grammar.json_object()
    try:
        return Grammar.json_schema(load_json(read_file(args.json_schema), args.json_schema))
    except UserError as e:
        msg = str(e)
        raise UserError(msg if msg.startswith(args.json_schema) else f"--json-schema {args.json_schema}: {msg}") from None


def open_session(args):

    from .chat.session import Session, load_engine

    from .chat.personas import resolve_persona
    from .chat.ranked import RankedSession
    from .decoding.strategy import format_candidates

    sampling = sampling_from(args)  # validate flags before the slow model load
    decoding = decoding_from(args)
    engine = load_engine(args.model, args.template, args.dtype)
    if decoding is not None:
        show = (lambda r: print(format_candidates(r), file=sys.stderr)) if args.show_candidates else None
        return RankedSession(engine, decoding, on_reply=show, system=resolve_persona(args.system), sampling=sampling,
                             max_context_tokens=args.max_context_tokens)
    return Session(engine, system=resolve_persona(args.system), sampling=sampling, max_context_tokens=args.max_context_tokens)


def cmd_chat(args) -> int:
    from .chat.repl import run

    session = open_session(args)
    return run(session, interactive=sys.stdin.isatty())


def cmd_generate(args) -> int:
    from .chat.messages import read_messages

    where = args.input if args.input != "-" else "<stdin>"
    sampling_from(args)  # a bad flag is reported before the input is read
    messages = read_messages(args.input)
    if not messages or messages[-1].role != "user":
        raise UserError(f"{where}: the last message must have role 'user'")
    session = open_session(args)
    if messages[0].role == "system":
        session.set_persona(messages[0].content)
        messages = messages[1:]
    session.messages = messages[:-1]
    gen = session.send(messages[-1].content).run()
    out = {"reply": gen.text, "tokens": len(gen.tokens), "finish_reason": gen.finish_reason}
    if getattr(args, "show_candidates", False) and getattr(gen, "candidates", None):
        out["candidates"] = gen.candidates_dicts()
    print(json.dumps(out, ensure_ascii=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dialogen", description="Dialogue generation: chat, train, decode, evaluate, serve.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("chat", help="chat with a model in the terminal (streams; /help inside)",
                       description="Interactive chat. With stdin not a terminal, each input line is one "
                                   "user turn and each reply is printed on its own line.")
    add_model_args(p)
    add_sampling_args(p)
    add_constraint_args(p)
    add_decoding_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="reply to a JSON list of messages; prints JSON",
                       description='Reads [{"role": "user", "content": "..."}, ...] from a file or stdin and '
                                   'prints {"reply": ..., "tokens": N}.')
    p.add_argument("input", nargs="?", default="-", help="messages JSON file (default: stdin)")
    add_model_args(p)
    add_sampling_args(p)
    add_constraint_args(p)
    add_decoding_args(p)
    p.set_defaults(func=cmd_generate)
    from .serve.cli import register as _r; _r(sub)
    from .training.cli import register as _r; _r(sub)
    from .data.inspect import register as _r; _r(sub)
    from .eval.perplexity import register as _r; _r(sub)
    from .training.adversarial_cli import register as _r; _r(sub)
    from .eval.run import register as _r; _r(sub)
    from .export import register as _r; _r(sub)
    return parser


def main(argv=None) -> int:
    from .textio import lone_surrogate

    given = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(given):
        if lone_surrogate(arg) is not None:  # bytes that were not UTF-8 in the command line
            after = f" (after {given[i - 1]})" if i and lone_surrogate(given[i - 1]) is None else ""
            print(f"dialogen: error: argument {i + 1}{after} is not valid UTF-8 text", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    if getattr(args, "no_kernels", False):
        os.environ["DIALOGEN_KERNELS"] = "0"  # models/kernels.py reads it
    try:
        return args.func(args)
    except UserError as e:
        print(f"dialogen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
