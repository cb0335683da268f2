"""`dialogen chat`: the interactive loop (a terminal) or one reply per input line (a pipe)."""

from __future__ import annotations

import sys

from ..errors import UserError
from ..textio import EncodingError, check_line, decode
from .personas import resolve_persona
from .session import Session
from .toolchat import reply_with_tools

HELP = """commands:
  /reset           forget the conversation (the persona stays)
  /persona TEXT    set the persona (system message) or a preset: virtual-assistant, friendly-chatbot,
                   customer-service; /persona alone clears it
  /save FILE       save the conversation as JSON
  /load FILE       load a conversation saved with /save (or a JSON list of messages)
  /help            this text
  /exit            quit (Ctrl-D does too; Ctrl-C stops a reply)"""


def command(session: Session, line: str, out=sys.stdout) -> bool:
    """Run a /command; return False when the loop should end."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit", "/bye"):
        return False
    if name == "/reset":
        session.reset()
        print("(conversation cleared)", file=out)
    elif name == "/persona":
        session.set_persona(resolve_persona(arg))  # a preset name or the text itself
        print(f"(persona {'set' if arg else 'cleared'})", file=out)
    elif name in ("/save", "/load"):
        if not arg:
            raise UserError(f"{name} needs a file name")
        if name == "/save":
            session.save(arg)
            print(f"(saved {len(session.messages)} messages to {arg})", file=out)
        else:
            session.load(arg)
            print(f"(loaded {len(session.messages)} messages from {arg})", file=out)
    elif name == "/help":
        print(HELP, file=out)
    else:
        raise UserError(f"unknown command {name}; /help lists them")
    return True


def stream_reply(session: Session, text: str, out=None) -> None:
    out = out or sys.stdout  # looked up now, so a redirected stdout is followed
    if session.tools:  # a tool's result the user types: the next line, at a prompt or from the pipe
        ask = input if sys.stdin.isatty() else (lambda prompt: read_line(False, 0))
        reply_with_tools(session, text, out, ask=ask)
        return
    gen = session.send(text)
    try:
        for delta in gen:
            out.write(delta)
            out.flush()
    except KeyboardInterrupt:
        gen.close()  # the partial reply stays in the conversation
        out.write(" [stopped]")
    out.write("\n")
    out.flush()


def read_line(interactive: bool, lineno: int) -> str:
    """The next input line: typed with line editing, or piped bytes decoded strictly (EOFError at the end)."""
    raw_stdin = getattr(sys.stdin, "buffer", None)
    if interactive or raw_stdin is None:
        return input(">>> " if interactive else "")
    raw = raw_stdin.readline()
    if not raw:
        raise EOFError
    return decode(raw, "<stdin>", lineno).rstrip("\r\n")


def run(session: Session, interactive: bool) -> int:
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"dialogen chat with {session.engine.name} ({session.engine.template.name} template). "
              "/help for commands, Ctrl-D to quit.", file=sys.stderr)
    lineno = 0
    while True:
        try:
            lineno += 1
            line = read_line(interactive, lineno)
        except UnicodeDecodeError as e:  # typed at a terminal whose stdin is decoded strictly
            print(f"dialogen: error: <stdin>:{lineno}: not valid UTF-8 ({e.reason})", file=sys.stderr)
            if not interactive:
                return 2
            continue
        except EOFError:
            if interactive:
                print()
            return 0
        except EncodingError as e:
            print(f"dialogen: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("\n(use /exit or Ctrl-D to quit)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        try:
            check_line(line, f"<stdin>:{lineno}")  # undecodable bytes arrive as lone surrogates
            if line.startswith("/") and interactive:
                if not command(session, line):
                    return 0
                continue
            stream_reply(session, line)
        except UserError as e:
            print(f"dialogen: error: {e}", file=sys.stderr)
            if not interactive:
                return 2
