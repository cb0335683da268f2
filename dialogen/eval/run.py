"""`dialogen eval`: a model and one or more decoding configs on a dataset split -> metric table.

Examples: every assistant turn of the split's conversations that follows a user turn, with up to
`--context-turns` turns before it as context, is one example; `--examples N` of them are drawn
with `--sample-seed` (a fixed, stated sample). Each config replies to every example; the table
has BLEU-2/4 against the reference reply, Dist-1/2, Entropy-4 and average length (see
`dialogen.eval.metrics`), and the model's perplexity on the reference replies given the same
contexts. `--compare` runs several named configs over the same examples and prints one table.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..chat.messages import Message
from ..chat.personas import resolve_persona
from ..data import load_split
from ..data.dataset import render_turns, to_example
from ..data.options import add_data_source_args
from ..decoding.engine import add_model_args, engine_from_args
from ..decoding.settings import Decoding, Sampling, add_decoding_args, add_sampling_args, decoding_from, sampling_from
from ..errors import UserError
from ..paths import write_text
from .adversarial import Evaluator, add_evaluator_args
from .metrics import avg_length, distinct_n, entropy_n, reply_metrics
from .perplexity import examples_perplexity
# torch, the model code and the extras are imported inside the commands: building `--help` stays torch-free

# name -> (sampling changes, decoding changes), applied on top of the command's flags
CONFIGS = {
    "greedy": ({"temperature": 0.0}, {}),
    "top-p": ({"temperature": 1.0, "top_k": 0, "top_p": 0.9}, {}),
    "beam5": ({"temperature": 0.0}, {"beam_size": 5, "scorer": "logprob"}),
    "beam5-mmi": ({"temperature": 0.0}, {"beam_size": 5, "scorer": "mmi"}),
    "sample-rank": ({"temperature": 1.0, "top_k": 0, "top_p": 0.9},
                    {"num_candidates": 8, "candidates": "sample", "scorer": "logprob"}),
}


@dataclass
class EvalExample:
    context: list[Message]  # oldest first, ends with the user turn the reply answers
    reference: str


def eval_examples(conversations: list[list[Message]], n: int, seed: int, context_turns: int) -> list[EvalExample]:
    """`n` (assistant turn, context) pairs drawn with `seed`, in dataset order."""
    spots = []
    for ci, conv in enumerate(conversations):
        for ti, m in enumerate(conv):
            if m.role == "assistant" and ti > 0 and conv[ti - 1].role == "user" and m.content.strip():
                spots.append((ci, ti))
    if not spots:
        raise UserError("the split has no assistant turn that answers a user turn: nothing to evaluate")
    picked = sorted(random.Random(seed).sample(spots, min(n, len(spots))))
    out = []
    for ci, ti in picked:
        turns = [m for m in conversations[ci][:ti] if m.role != "system"][-context_turns:]
        out.append(EvalExample(turns, conversations[ci][ti].content))
    return out


def with_persona(context: list[Message], persona: str | None) -> list[Message]:
    return ([Message("system", persona)] if persona else []) + context


def reference_perplexity(engine, examples: list[EvalExample], persona: str | None, batch_size: int) -> dict:
    """Perplexity of the reference replies (content and end-of-turn tokens) given their contexts."""
    rows = []
    for ex in examples:
        msgs = with_persona(ex.context, persona) + [Message("assistant", ex.reference)]
        ids, mask = render_turns(engine.template, engine.tokenizer, msgs, [False] * (len(msgs) - 1) + [True])
        rows.append(to_example(ids[: engine.context_length], mask[: engine.context_length]))
    return examples_perplexity(engine.model, rows, engine.tokenizer.pad_id, batch_size)


def run_config(engine, decoder, prompts: list[list[int]], contexts: list[list[Message]], s: Sampling,
               d: Decoding, batch_size: int) -> list[str]:
    """The reply to every prompt under one decoding config."""
    from ..decoding.batch import generate_batch

    if d.searches:
        replies = []
        for k, (p, c) in enumerate(zip(prompts, contexts)):
            cands, winner = decoder.candidates(p, c, s.replace(seed=None if s.seed is None else s.seed + k), d)
            replies.append(cands[winner].text)
        return replies
    eng = engine
    s, stop_ids = eng.stops(s)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: little padding
    replies: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        seed = None if s.seed is None else s.seed + start  # example k of the run samples with seed + k
        outs = generate_batch(eng.model, [prompts[i] for i in idx], s.replace(seed=seed), stop_ids,
                              eng.tokenizer, eng.tokenizer.pad_id)
        for i, c in zip(idx, outs):
            replies[i] = c.text
    return replies


def resolve_configs(names: list[str] | None, s: Sampling, d: Decoding, explicit: bool = True):
    """[(name, sampling, decoding)] and [(name, why skipped)]; no names: the flags' own config."""
    if names is None:
        return [(describe(s, d), s, d)], []
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise UserError(f"--compare: unknown config {unknown[0]!r}; known: {', '.join(CONFIGS)}")
    out, skipped = [], []
    for name in names:
        sc, dc = CONFIGS[name]
        search = {"beam_size": 1, "num_candidates": 1, "candidates": "beam", "scorer": None, **dc}
        cd = dataclasses.replace(d, **search)
        if cd.scorer_name == "mmi" and not cd.mmi_model:
            if explicit:
                raise UserError(f"--compare {name} needs --mmi-model PATH (a reverse model: dialogen train --reverse)")
            skipped.append((name, "no --mmi-model given (no reverse model)"))
            continue
        out.append((name, s.replace(**sc), cd))
    return out, skipped


def describe(s: Sampling, d: Decoding) -> str:
    if d.candidates == "sample" and d.num_candidates > 1:
        return f"sample x{d.num_candidates} + {d.scorer_name} (T={s.temperature:g}, top-p={s.top_p:g})"
    if d.searches:
        width = max(d.beam_size, d.num_candidates)
        return f"beam {width}" + (f" + {d.scorer_name}" if d.scorer_name != "logprob" else "")
    if s.temperature == 0:
        return "greedy"
    return f"sample (T={s.temperature:g}, top-k={s.top_k}, top-p={s.top_p:g})"


def evaluate(engine, examples: list[EvalExample], configs, persona: str | None = None, batch_size: int = 8,
             perplexity: bool = True, log=None, evaluator=None) -> dict:
    """Every config over the same examples -> the result dict (metrics, replies, timings)."""
    from ..decoding.strategy import Decoder

    contexts = [with_persona(ex.context, persona) for ex in examples]
    prompts = [engine.template.render(engine.tokenizer, c, add_generation_prompt=True)[0] for c in contexts]
    too_long = [len(p) for p in prompts if len(p) >= engine.context_length]
    if too_long:
        raise UserError(f"a prompt of {too_long[0]} tokens does not fit the model's {engine.context_length}; "
                        f"lower --context-turns")
    refs = [[ex.reference] for ex in examples]
    result = {"model": engine.name, "examples": len(examples), "configs": []}
    if perplexity:
        result["perplexity"] = reference_perplexity(engine, examples, persona, batch_size)
    decoder = Decoder(engine, Decoding())
    for name, s, d in configs:
        start = time.perf_counter()
        replies = run_config(engine, decoder, prompts, contexts, s, d, batch_size)
        seconds = time.perf_counter() - start
        entry = {"name": name, "sampling": _plain(s), "decoding": d.to_dict(), "seconds": seconds,
                 "metrics": reply_metrics(replies, refs), "replies": replies}
        if evaluator is not None:  # adversarial success: replies the evaluator judges human
            entry["metrics"]["adv_success"] = evaluator.success(contexts, replies)
        result["configs"].append(entry)
        if log is not None:
            print(f"dialogen eval: {name}: {len(examples)} replies in {seconds:.1f} s", file=log)
    human = [ex.reference for ex in examples]
    result["human"] = {"dist1": distinct_n(human, 1), "dist2": distinct_n(human, 2),
                       "entropy4": entropy_n(human, 4), "avg_len": avg_length(human)}
    if evaluator is not None:
        result["human"]["adv_success"] = evaluator.success(contexts, human)
    result["data"] = [{"context": [m.to_dict() for m in ex.context], "reference": ex.reference} for ex in examples]
    return result


def _plain(s: Sampling) -> dict:
    return {k: v for k, v in s.__dict__.items() if k != "stop"}


COLUMNS = [("BLEU-2", "bleu2", "{:.2f}"), ("BLEU-4", "bleu4", "{:.2f}"), ("Dist-1", "dist1", "{:.3f}"),
           ("Dist-2", "dist2", "{:.3f}"), ("Entropy-4", "entropy4", "{:.2f}"), ("avg len", "avg_len", "{:.1f}")]


def markdown_table(result: dict) -> str:
    ppl = result.get("perplexity", {}).get("ppl")
    columns = COLUMNS + ([("AdvSuc", "adv_success", "{:.3f}")] if "adv_success" in result["human"] else [])
    head = ["config", "decoding", "ppl"] + [c[0] for c in columns] + ["s/reply"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    n = max(result["examples"], 1)
    for entry in result["configs"]:
        m = entry["metrics"]
        cells = [entry["name"], describe(Sampling(**entry["sampling"]), Decoding(**entry["decoding"])),
                 "-" if ppl is None else f"{ppl:.2f}"]
        cells += [fmt.format(m[key]) for _, key, fmt in columns] + [f"{entry['seconds'] / n:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    h = result["human"]
    cells = ["human", "reference replies", "-"] + [fmt.format(h[key]) if key in h else "-" for _, key, fmt in columns]
    lines.append("| " + " | ".join(cells + ["-"]) + " |")
    for name, why in result.get("skipped", []):
        lines.append(f"\n(skipped {name}: {why})")
    return "\n".join(lines)


def write_json(path: Path, data: dict):
    """Written to a temporary file beside the target, then renamed: never a half-written file."""
    try:
        write_text(path, json.dumps(data, ensure_ascii=False, indent=1))
    except OSError as e:
        raise UserError(f"--output {path}: cannot write ({e.strerror})") from None


# --- the command ------------------------------------------------------------------------------
def register(sub):
    p = sub.add_parser("eval", help="evaluate decoding configs on a dataset split: perplexity, BLEU, Dist-n, Entropy-4",
                       description=__doc__.split("\n\n", 1)[1])
    add_model_args(p)
    p.set_defaults(dtype="float32")  # batched decoding is matrix-matrix work: fp32 is the fast path on CPU
    g = p.add_argument_group("data")
    add_data_source_args(g, split_default="test")
    g.add_argument("--examples", type=int, default=100, help="examples drawn from the split (default: %(default)s)")
    g.add_argument("--sample-seed", type=int, default=0, help="seed of the example draw (default: %(default)s)")
    g.add_argument("--context-turns", type=int, default=4, help="context turns before each reply (default: %(default)s)")
    add_sampling_args(p)
    add_decoding_args(p)
    g = p.add_argument_group("evaluation")
    g.add_argument("--compare", nargs="?", const=",".join(CONFIGS), default=None,
                   help=f"comma-separated configs to compare (alone: all): {', '.join(CONFIGS)}; "
                        "each overrides the decoding flags it names")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per batch for sampling and greedy (default: %(default)s)")
    g.add_argument("--no-ppl", dest="ppl", action="store_false", help="skip the perplexity of the reference replies")
    g.add_argument("--output", default=None, help="write the full result (metrics, replies, examples) as JSON here")
    g.add_argument("--json", action="store_true", help="print the JSON result instead of the Markdown table")
    add_evaluator_args(g)
    p.set_defaults(func=cmd_eval)


def _adversary_of(evaluator: Path, evaluator_meta: dict, model: Path) -> bool:
    """True when the evaluator is the discriminator the model was trained against: the one its
    `train-adversarial` run started from, or the one that run wrote."""
    if evaluator_meta.get("adversarial_of") and Path(evaluator_meta["adversarial_of"]).resolve() == model.resolve():
        return True
    try:
        meta = json.loads((model / "dialogen.json").read_text())
    except (OSError, ValueError):
        return False
    against = (meta.get("adversarial") or {}).get("discriminator") if isinstance(meta, dict) else None
    return bool(against) and Path(against).resolve() == evaluator.resolve()


def cmd_eval(args) -> int:
    for flag, value in (("--examples", args.examples), ("--context-turns", args.context_turns),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    names = [n.strip() for n in args.compare.split(",") if n.strip()] if args.compare else None
    configs, skipped = resolve_configs(names, sampling_from(args), decoding_from(args, strict=names is None),
                                       explicit=args.compare not in (None, ",".join(CONFIGS)))
    if not configs:
        raise UserError("--compare: no config left to run")
    examples = eval_examples(load_split(args.data, args.split, args.format, args.split_seed, args.skip_bad),
                             args.examples, args.sample_seed, args.context_turns)
    evaluator = Evaluator(args.evaluator) if args.evaluator else None  # a bad path fails before the model loads
    if evaluator is not None and args.model and _adversary_of(Path(args.evaluator), evaluator.meta, Path(args.model)):
        raise UserError(f"--evaluator {args.evaluator}: it is the discriminator --model {args.model} was trained "
                        f"against; adversarial success needs one trained apart (dialogen train-discriminator)")
    engine = engine_from_args(args)
    persona = resolve_persona(args.system)
    result = evaluate(engine, examples, configs, persona, args.batch_size, args.ppl, log=sys.stderr,
                      evaluator=evaluator)
    result.update({"dataset": args.data, "split": args.split, "sample_seed": args.sample_seed,
                   "context_turns": args.context_turns, "persona": persona, "skipped": skipped})
    if args.output:
        write_json(Path(args.output), result)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(markdown_table(result))
    return 0
