"""`dialogen inspect-data`: what the model sees and where the loss is taken.

For N examples of a dataset split rendered with a model's tokenizer and template it prints the
table of the chat fine-tuning recipe (context seen, next token, loss on/off), the example's text
with the trained tokens highlighted (green on a terminal, [[...]] otherwise), then the counts of
the whole split.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..chat.messages import read_messages
from ..chat.templates import default_template_name, get_template
from ..decoding.engine import add_model_path_args
from ..errors import UserError
from . import load_split
from .dataset import IGNORE_INDEX, Example, build_examples
from .options import add_data_args
# torch, the model code and the extras are imported inside the commands: building `--help` stays torch-free

GREEN, DIM, RESET = "\033[32;1m", "\033[2m", "\033[0m"


def _show(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]  # newlines etc. visible, one line


def table(tokenizer, ex: Example, rows: int, width: int = 44) -> list[str]:
    """One line per predicted token: the context before it, the token, whether it has loss.
    With a row limit the table starts a little before the first trained token."""
    lines = [f"  {'context seen by the model':>{width}} | {'next token':<16} | loss"]
    first = next((i for i, x in enumerate(ex.labels) if x != IGNORE_INDEX), 1)
    start = max(1, first - rows // 3) if rows else 1
    end = min(len(ex.ids), start + rows) if rows else len(ex.ids)
    if start > 1:
        lines.append(f"  ... {start - 1} rows before")
    for i in range(start, end):
        context = _show(tokenizer.decode(ex.ids[max(0, i - 16):i]))[-width:]
        token = _show(tokenizer.decode([ex.ids[i]]))
        lines.append(f"  {context:>{width}} | {token:<16} | {'YES' if ex.labels[i] != IGNORE_INDEX else 'no'}")
    if end < len(ex.ids):
        lines.append(f"  ... {len(ex.ids) - end} more rows (--rows 0 shows all)")
    return lines


def highlighted(tokenizer, ex: Example, color: bool) -> str:
    """The example's text, trained runs marked."""
    out, run, on = [], [], False
    for tok_id, label in [*zip(ex.ids, ex.labels), (None, None)]:
        now = label is not None and label != IGNORE_INDEX
        if tok_id is None or now != on:
            if run:
                text = tokenizer.decode(run)
                if color:
                    out.append(f"{GREEN if on else DIM}{text}{RESET}")
                else:
                    out.append(f"[[{text}]]" if on else text)
            run, on = [], now
        if tok_id is not None:
            run.append(tok_id)
    return "".join(out)


def tokenizer_and_template(model: str, template: str):
    """(tokenizer, template, name) of a --model value, reading no weights: a .gguf file's metadata,
    or a directory with a tokenizer (config.json and weights are optional)."""
    from ..models.gguf_file import read_gguf
    from ..models.loading import default_model_path
    from ..models.tokenizer import Tokenizer

    path = default_model_path() if model in ("", "default") else Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        _, gguf_meta = read_gguf(path)
        tokenizer, meta, arch = Tokenizer.from_gguf(gguf_meta, path), {}, gguf_meta.get("general.architecture", "llama")
    elif path.is_dir():
        tokenizer = Tokenizer.from_dir(path)
        meta = _json(path / "dialogen.json")
        arch = _json(path / "config.json").get("model_type", "llama")
    else:
        raise UserError(f"{path}: no such .gguf file or model directory")
    name = template if template != "auto" else default_template_name(meta, tokenizer, arch)
    return tokenizer, get_template(name, tokenizer), name


def _json(path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def cmd_inspect(args) -> int:
    if args.n < 0 or args.rows < 0 or args.max_len < 1:
        raise UserError("-n and --rows must be >= 0, --max-len >= 1")
    convs = load_split(args.data, args.split, args.format, args.split_seed, args.skip_bad)
    tokenizer, template, name = tokenizer_and_template(args.model, args.template)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    shown, _ = build_examples(convs[: args.n], tokenizer, template, args.max_len, args.train_on, args.reverse)
    for k, ex in enumerate(shown[: args.n]):
        print(f"example {k + 1}: {len(ex.ids)} tokens, {ex.trained()} with loss "
              f"(template {name}, train on {args.train_on}{', reverse' if args.reverse else ''})")
        print("\n".join(table(tokenizer, ex, args.rows)))
        print("  text (" + ("trained tokens in green" if color else "trained tokens in [[ ]]") + "):")
        print("  " + highlighted(tokenizer, ex, color).replace("\n", "\n  "))
        print()
    _, stats = build_examples(convs, tokenizer, template, args.max_len, args.train_on, args.reverse)
    s = stats
    print(f"{args.data} [{args.split}]: {s.conversations} conversations, {s.turns} turns "
          f"({s.trained_turns} trained), {s.windows} examples, {s.tokens} tokens, {s.trained_tokens} trained "
          f"tokens ({100 * s.trained_tokens / max(1, s.tokens):.1f}%), {s.split_conversations} conversations "
          f"cut into windows, {s.truncated} truncated windows (--max-len {args.max_len})")
    return 0


def cmd_render(args) -> int:
    messages = read_messages(args.messages)
    tokenizer, template, name = tokenizer_and_template(args.model, args.template)
    gen = {"yes": True, "no": False}.get(args.generation_prompt, not messages or messages[-1].role != "assistant")
    tools = getattr(messages, "tools", None)
    shown, shown_tools, _ = template.prepare(messages, tools)
    text = template.layout(tokenizer, shown, gen, shown_tools)[0]
    ids, mask = template.render(tokenizer, messages, gen, tools=tools)
    if args.json:
        print(json.dumps({"text": text, "ids": ids, "mask": mask}, ensure_ascii=False))
        return 0
    print(f"template {name}, {len(messages)} messages, generation prompt {'on' if gen else 'off'}: "
          f"{len(ids)} tokens, {sum(mask)} trained")
    print("text:")
    print("  " + text.replace("\n", "\n  "))
    print("tokens (index, id, token, trained):")
    for k, (i, m) in enumerate(zip(ids, mask)):
        print(f"  {k:>5} {i:>7}  {_show(tokenizer.decode([i])):<24} {'YES' if m else 'no'}")
    return 0


def register(sub):
    p = sub.add_parser("render", help="show what the model sees for a list of messages: text, ids, mask",
                       description='Renders a JSON list of {"role", "content"} messages (or {"messages": [...], '
                                   '"tools": [...]}, OpenAI\'s shape with tool calls) with a model\'s chat '
                                   "template and tokenizer, tokenized as the model sees it, and prints the text, "
                                   "each token id and whether training puts loss on it. Reads no weights: a "
                                   "tokenizer directory or a .gguf file is enough.")
    p.add_argument("--messages", default="-", help="messages JSON file (default: stdin)")
    add_model_path_args(p, "a .gguf file or a directory with a tokenizer (default: the embedded model)",
                        "chat template: chatml, llama2, dialogpt, jinja (default: the model's own)")
    p.add_argument("--generation-prompt", default="auto", choices=["auto", "yes", "no"],
                   help="append the assistant's turn opening; auto: unless the last message is the "
                        "assistant's (default: %(default)s)")
    p.add_argument("--json", action="store_true", help='print {"text", "ids", "mask"} as one JSON line')
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("inspect-data", help="show examples of a dataset as the model sees them, with the loss mask",
                       description="Renders N examples with a model's tokenizer and chat template and prints, for "
                                   "each token, the context seen, the next token and whether it carries loss; then "
                                   "counts for the whole split.")
    add_data_args(p, split_default="train")
    add_model_path_args(p, "whose tokenizer: a model path or 'default' (default: %(default)s)")
    p.add_argument("--reverse", action="store_true", help="show backward (reply -> context) examples")
    p.add_argument("-n", type=int, default=2, help="examples to show (default: %(default)s)")
    p.add_argument("--rows", type=int, default=60, help="table rows per example; 0 = all (default: %(default)s)")
    p.add_argument("--color", default="auto", choices=["auto", "always", "never"], help="(default: %(default)s)")
    p.set_defaults(func=cmd_inspect)
