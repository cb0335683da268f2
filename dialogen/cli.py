"""Command line: argparse subcommands, each handing plain arguments to the library."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .decoding.engine import add_model_args, engine_from_args
from .decoding.settings import add_constraint_args, add_decoding_args, add_sampling_args, decoding_from, sampling_from
from .errors import UserError
# torch, the model code and the extras are imported inside the commands: building `--help` stays torch-free


def open_session(args):
    from .chat.personas import resolve_persona
    from .chat.ranked import RankedSession
    from .chat.session import Session
    from .decoding.strategy import format_candidates

    sampling = sampling_from(args)  # validate flags before the slow model load
    decoding = decoding_from(args)
    engine = engine_from_args(args)
    if decoding is not None:
        show = (lambda r: print(format_candidates(r), file=sys.stderr)) if args.show_candidates else None
        return RankedSession(engine, decoding, on_reply=show, system=resolve_persona(args.system), sampling=sampling,
                             max_context_tokens=args.max_context_tokens)
    return Session(engine, system=resolve_persona(args.system), sampling=sampling, max_context_tokens=args.max_context_tokens)


def cmd_chat(args) -> int:
    from .chat.repl import run
    from .chat.toolchat import load_tools_file, offer_tools

    tools = load_tools_file(args.tools) if args.tools else None  # before the slow model load
    if tools is None and args.tool_choice is not None:
        raise UserError("--tool-choice needs --tools")
    check_tool_choice(args.tool_choice, tools[0] if tools else [], "")
    if tools is not None and decoding_from(args).searches:
        raise UserError("--tools are answered by one sampled (or greedy) reply: drop --beam-size/--num-candidates")
    session = open_session(args)
    if tools is not None:
        offer_tools(session, *tools, args.tool_choice or "auto")
    return run(session, interactive=sys.stdin.isatty())


def cmd_generate(args) -> int:
    from .chat.messages import read_messages
    from .chat.toolchat import offer_tools
    from .chat.toolformat import openai_calls, parse_calls

    where = args.input if args.input != "-" else "<stdin>"
    sampling_from(args)  # a bad flag is reported before the input is read
    messages = read_messages(args.input)
    tools = getattr(messages, "tools", None)
    choice = args.tool_choice or "auto"
    if not tools and args.tool_choice is not None:
        raise UserError(f'{where}: --tool-choice needs tools: give {{"messages": [...], "tools": [...]}}')
    check_tool_choice(args.tool_choice, tools, f"{where}: ")
    if not messages or messages[-1].role == "system":
        raise UserError(f"{where}: the last message must have role 'user' (or 'tool', or 'assistant' to continue it)")
    session = open_session(args)
    if messages[0].role == "system":
        session.set_persona(messages[0].content)
        messages = messages[1:]
    if tools:
        offer_tools(session, tools, {}, choice)
    if messages[-1].role == "user":
        session.messages = messages[:-1]
        gen = session.send(messages[-1].content).run()
    else:  # tools' results to answer, or an assistant message to continue
        session.messages = list(messages)
        gen = session.respond().run()
    out = {"reply": gen.text, "tokens": len(gen.tokens), "finish_reason": gen.finish_reason}
    calls = parse_calls(gen.text, session.engine.template.tool_style) if tools and choice != "none" else None
    if calls:
        out.update(reply=None, tool_calls=openai_calls(calls, session.engine.template.tool_style),
                   finish_reason="tool_calls")  # as the server's reply says
    if getattr(args, "show_candidates", False) and getattr(gen, "candidates", None):
        out["candidates"] = gen.candidates_dicts()
    print(json.dumps(out, ensure_ascii=False))
    return 0


TOOL_CHOICES = ("auto", "none", "required")


def add_tool_choice_arg(p, offered: str):
    p.add_argument("--tool-choice", metavar="auto|none|required|NAME", default=None,
                   help=f"with {offered}: auto (default) a reply is text or calls, required calls only, NAME "
                        "calls of that tool only, none text only (the tools still shown); see docs/tools.md")


def check_tool_choice(choice: str | None, tools: list[dict], where: str):
    """--tool-choice is auto, none, required or the name of an offered tool (before the model loads)."""
    from .chat.toolformat import tool_names

    if choice is not None and choice not in TOOL_CHOICES and choice not in tool_names(tools):
        raise UserError(f"{where}--tool-choice {choice!r} is none of {', '.join(TOOL_CHOICES)} "
                        f"or the tools ({', '.join(tool_names(tools))})")


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
    p.add_argument("--tools", metavar="FILE", default=None,
                   help="tools the model may call: a JSON list of tools (OpenAI's shape; you type each result) or "
                        "a Python file whose functions are run when called (see docs/tools.md)")
    add_tool_choice_arg(p, "--tools")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="reply to a JSON list of messages; prints JSON",
                       description='Reads [{"role": "user", "content": "..."}, ...] from a file or stdin and '
                                   'prints {"reply": ..., "tokens": N}.')
    p.add_argument("input", nargs="?", default="-", help="messages JSON file (default: stdin)")
    add_model_args(p)
    add_sampling_args(p)
    add_constraint_args(p)
    add_decoding_args(p)
    add_tool_choice_arg(p, "the messages file's tools")
    p.set_defaults(func=cmd_generate)
    from .serve.cli import register as _r; _r(sub)
    from .serve.feedback_export import register as _r; _r(sub)
    from .training.cli import register as _r; _r(sub)
    from .data.inspect import register as _r; _r(sub)
    from .eval.perplexity import register as _r; _r(sub)
    from .training.adversarial_cli import register as _r; _r(sub)
    from .eval.run import register as _r; _r(sub)
    from .export import register as _r; _r(sub)
    for p in (parser, *sub.choices.values()):  # `--max-tokens` must not quietly mean `--max-tokens-limit`
        p.allow_abbrev = False
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
        os.environ["DIALOGEN_KERNELS"] = "0"  # models/kernels/library.py reads it
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
