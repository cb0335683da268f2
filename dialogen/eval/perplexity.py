"""Perplexity on the tokens a model is trained to produce: the assistant's turns.

Every conversation is rendered with the chat template; the loss counts the assistant's content
and end-of-turn tokens only, as in training. Conversations longer than `max_len` are cut into
windows at turn boundaries (each assistant turn is scored once, with as much context as fits).
"""

from __future__ import annotations

import json
import math

from ..chat.messages import Message
from ..data import load_split
from ..data.dataset import IGNORE_INDEX, Example, build_examples
from ..data.options import add_data_source_args
from ..decoding.engine import add_adapter_arg, add_model_path_args, engine_from_args
from ..errors import UserError
# torch, the model code and the extras are imported inside the commands: building `--help` stays torch-free


def default_max_len(model, cap: int = 1024) -> int:
    return min(model.cfg.max_seq_len, cap)


def assistant_perplexity(model, tokenizer, template, conversations: list[list[Message]], max_len: int | None = None,
                         batch_size: int = 8, train_on: str = "assistant") -> dict:
    """{"ppl", "nll" (mean nats per token), "tokens" (tokens scored), "examples", "chars", "bpc"}.

    `bpc`, bits per character of the scored text, compares models with different vocabularies
    (perplexity per token does not)."""
    max_len = max_len or default_max_len(model)
    examples, _ = build_examples(conversations, tokenizer, template, max_len, train_on=train_on)
    result = examples_perplexity(model, examples, tokenizer.pad_id, batch_size)
    chars = scored_chars(tokenizer, examples)
    result["chars"] = chars
    result["bpc"] = result["nll"] * result["tokens"] / max(chars, 1) / math.log(2)
    return result


def scored_chars(tokenizer, examples: list[Example]) -> int:
    """Characters of the scored text: each run of labelled tokens decoded, special tokens left out."""
    total = 0
    for ex in examples:
        run: list[int] = []
        for i, label in enumerate(ex.labels[1:] + [IGNORE_INDEX], start=1):
            if label != IGNORE_INDEX:
                run.append(ex.ids[i])
            elif run:
                total += len(tokenizer.decode(run, skip_special=True))
                run = []
    return total


def examples_perplexity(model, examples: list[Example], pad_id: int, batch_size: int = 8) -> dict:
    """Perplexity over the labelled tokens of ready-made examples."""
    import torch

    from ..data.batches import collate
    from ..training.loss import nll_sum

    examples = sorted(examples, key=lambda ex: len(ex.ids))  # batches of similar length: little padding
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(examples), batch_size):
                ids, labels = collate(examples[start:start + batch_size], pad_id)
                loss, n = nll_sum(model, ids.to(device), labels.to(device))
                total += loss.double().cpu()
                count += int(n)
    finally:
        model.train(was_training)
    nll = total.item() / count if count else float("nan")
    return {"ppl": math.exp(nll) if count else float("nan"), "nll": nll, "tokens": count,
            "examples": len(examples)}


def cmd_perplexity(args) -> int:
    if args.conversations < 0 or args.max_len < 1 or args.batch_size < 1:
        raise UserError("--conversations must be >= 0, --max-len and --batch-size >= 1")
    convs = load_split(args.data, args.split, args.format, args.split_seed, args.skip_bad)
    convs = convs[: args.conversations] if args.conversations else convs
    engine = engine_from_args(args, "float32")
    r = assistant_perplexity(engine.model, engine.tokenizer, engine.template, convs, args.max_len, args.batch_size)
    print(json.dumps({"model": args.model, "template": engine.template.name, "data": args.data, "split": args.split,
                      "conversations": len(convs), "max_len": args.max_len, **r}))
    return 0


def register(sub):
    p = sub.add_parser("perplexity", help="perplexity of a model on the assistant turns of a dataset split",
                       description="Renders each conversation with the model's chat template and scores the "
                                   "assistant's tokens (content and end-of-turn), in fp32. Prints JSON: ppl, nll "
                                   "(nats/token), tokens, bpc (bits per character, comparable across vocabularies).")
    add_model_path_args(p)
    add_adapter_arg(p)
    add_data_source_args(p.add_argument_group("data"), split_default="test")
    p.add_argument("--conversations", type=int, default=0,
                   help="score the first N conversations of the split; 0 = all (default: %(default)s)")
    p.add_argument("--max-len", type=int, default=512, help="window length in tokens (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="(default: %(default)s)")
    p.set_defaults(func=cmd_perplexity)
