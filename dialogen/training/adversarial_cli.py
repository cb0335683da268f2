"""`dialogen train-discriminator` and `dialogen train-adversarial`."""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from ..data import load_split
from ..data.options import add_data_source_args
from ..decoding.engine import load_engine
from ..errors import UserError
# torch, the model code and the extras are imported inside the commands: building `--help` stays torch-free


def register(sub):
    p = sub.add_parser("train-discriminator", help="train a discriminator: human replies vs a generator's samples",
                       description="Trains a model that reads (context, reply) and outputs P(human-written), on "
                                   "the human replies of a dataset (label 1) and replies sampled from --generator "
                                   "for the same contexts (label 0); with several --generator flags the updates "
                                   "take turns among them. Prints a JSON summary.")
    _common(p, several=True)
    p.add_argument("--out", required=True, help="discriminator checkpoint directory to write")
    p.add_argument("--steps", type=int, default=200, help="updates (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    g = p.add_argument_group("discriminator")
    g.add_argument("--cell", default="gru", choices=("gru", "lstm"))
    g.add_argument("--emb-dim", type=int, default=128)
    g.add_argument("--hidden", type=int, default=128, help="per direction (default: %(default)s)")
    g.add_argument("--layers", type=int, default=1)
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--max-context", type=int, default=192, help="newest context tokens read (default: %(default)s)")
    p.set_defaults(func=cmd_train_discriminator)

    p = sub.add_parser("train-adversarial", help="adversarial training of a generator against a discriminator",
                       description="Li et al. 2017: d-steps on human vs sampled replies, REINFORCE g-steps with "
                                   "reward D(c, r) minus a baseline, interleaved teacher-forced MLE steps. Logs "
                                   "D accuracy, mean reward and validation perplexity per round (JSONL + PNG).")
    _common(p)
    p.add_argument("--discriminator", default=None, help="pretrained discriminator (dialogen train-discriminator)")
    p.add_argument("--out", required=True, help="generator checkpoint directory to write")
    p.add_argument("--discriminator-out", default=None, help="where the updated discriminator goes "
                   "(default: OUT-discriminator)")
    p.add_argument("--log", default=None, help="per-round JSONL log (default: OUT-adversarial.jsonl; plot beside it)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--d-steps", type=int, default=1, help="discriminator updates per round (default: %(default)s)")
    p.add_argument("--g-steps", type=int, default=1, help="REINFORCE updates per round (default: %(default)s)")
    p.add_argument("--mle-steps", type=int, default=1, help="teacher-forced updates per round (default: %(default)s)")
    p.add_argument("--g-lr", type=float, default=1e-4)
    p.add_argument("--d-lr", type=float, default=1e-4)
    p.add_argument("--baseline-decay", type=float, default=0.9, help="running-mean decay of the reward baseline")
    p.set_defaults(func=cmd_train_adversarial)


def _common(p: argparse.ArgumentParser, several: bool = False):
    p.add_argument("--generator", default=None, action="append" if several else "store",
                   help="an MLE-trained generator checkpoint (RNN or transformer)" + (" (repeatable)" if several else ""))
    g = p.add_argument_group("data")
    add_data_source_args(g)
    g.add_argument("--max-conversations", type=int, default=2000,
                   help="a seeded sample of the training split; 0 = all (default: %(default)s)")
    g.add_argument("--valid-pairs", type=int, default=100, help="validation pairs scored (default: %(default)s)")
    g.add_argument("--turns", type=int, default=3, help="context turns before each reply (default: %(default)s)")
    g = p.add_argument_group("sampling and batches")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--max-new-tokens", type=int, default=32, help="sampled reply length limit (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=1.0, help="of the generator's samples (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0)


def _positive(args, names):
    for name in names:
        v = getattr(args, name)
        if v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def load_generator(spec, flag: str = "--generator"):
    """(model, tokenizer, template, meta) of an MLE-trained generator, in float32 for training."""
    if not spec:
        raise UserError(f"{flag} is required: an MLE-trained generator checkpoint (RNN or transformer; "
                        "make one with `dialogen train`)")
    try:
        engine = load_engine(spec, "auto", "float32")
    except UserError as e:
        raise UserError(f"{flag}: {e}") from None
    return engine.model, engine.tokenizer, engine.template, engine.meta


def load_pairs(args, models, tokenizer, template):
    """(train pairs, validation pairs) from the data splits; prompts keep the newest tokens that
    leave room for a sampled reply within the positions of every generator in `models`."""
    from .replies import make_pairs

    for flag, value, low in (("--turns", args.turns, 1), ("--max-conversations", args.max_conversations, 0),
                             ("--valid-pairs", args.valid_pairs, 0)):
        if value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    max_prompt = 256
    positions = min((m.max_positions for m in models if m.max_positions), default=None)
    if positions is not None:
        max_prompt = min(max_prompt, positions - args.max_new_tokens)
        if max_prompt < 8:
            raise UserError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a context in the "
                            f"{positions} positions of a --generator")
    train = load_split(args.data, "train", args.format, args.split_seed, args.skip_bad)
    if args.max_conversations:
        train = random.Random(args.seed).sample(train, min(args.max_conversations, len(train)))
    valid = load_split(args.data, "valid", args.format, args.split_seed, args.skip_bad)
    train_pairs = make_pairs(train, tokenizer, template, turns=args.turns, max_prompt=max_prompt,
                             max_reply=args.max_new_tokens)
    valid_pairs = make_pairs(valid, tokenizer, template, turns=args.turns, max_prompt=max_prompt,
                             max_reply=args.max_new_tokens)
    valid_pairs = random.Random(args.seed + 1).sample(valid_pairs, min(args.valid_pairs, len(valid_pairs)))
    if not train_pairs:
        raise UserError(f"{args.data}: no context/reply pairs in the training split")
    return train_pairs, valid_pairs


def cmd_train_discriminator(args) -> int:
    import torch

    from ..models.discriminator import DiscConfig, Discriminator, accuracy, save_discriminator
    from .adversarial import Adversarial, AdversarialSettings, human_pairs, machine_pairs

    _positive(args, ["steps", "batch_size", "max_new_tokens", "emb_dim", "hidden", "layers", "max_context"])
    if not 0 <= args.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {args.dropout}")
    if not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    settings = AdversarialSettings(rounds=1, batch_size=args.batch_size, d_lr=args.lr, temperature=args.temperature,
                                   max_new_tokens=args.max_new_tokens, seed=args.seed)
    specs = args.generator or [None]
    generators = [load_generator(spec) for spec in specs]
    model, tok, template, _ = generators[0]
    for spec, (_, other, other_template, _) in zip(specs[1:], generators[1:]):
        if other.fingerprint() != tok.fingerprint() or other_template.name != template.name:
            raise UserError(f"--generator {spec}: its tokenizer or chat template differs from the first "
                            f"--generator's ({specs[0]}); the generators must share both")
    stop = template.stop_ids(tok)
    train, valid = load_pairs(args, [g[0] for g in generators], tok, template)
    torch.manual_seed(args.seed)
    disc = Discriminator(DiscConfig(vocab_size=tok.vocab_size, sep_id=sorted(stop)[0] if stop else tok.pad_id,
                                    cell=args.cell, emb_dim=args.emb_dim, hidden=args.hidden, n_layer=args.layers,
                                    dropout=args.dropout, max_context=args.max_context,
                                    max_reply=args.max_new_tokens))
    state = Adversarial(model, disc, tok, stop, settings)
    for step in range(1, args.steps + 1):
        state.g = generators[(step - 1) % len(generators)][0]  # one D and optimiser; the samplers take turns
        loss, acc = state.d_step(state.batch(train))
        if step % 20 == 0 or step == args.steps:
            print(f"dialogen: step {step}/{args.steps} loss {loss:.4f} accuracy {acc:.3f}", file=sys.stderr, flush=True)
    summary = {"out": str(args.out), "steps": args.steps, "train_pairs": len(train)}
    if valid:
        human = human_pairs(disc, tok, valid, stop)
        per = []
        for g in generators:
            state.g = g[0]
            per.append(accuracy(disc, human, machine_pairs(disc, tok, valid, state.sample(valid), stop)))
        summary["valid_accuracy"] = sum(per) / len(per)
        summary["valid_accuracy_per_generator"] = per
    meta = {"generator": specs[0] if len(specs) == 1 else specs, "valid_accuracy": summary.get("valid_accuracy"),
            "train": {k: v for k, v in vars(args).items() if k != "func"}}
    save_discriminator(Path(args.out), disc.eval(), tok, meta)
    print(json.dumps(summary))
    return 0


def cmd_train_adversarial(args) -> int:
    from ..models.discriminator import check_tokenizer, load_discriminator, save_discriminator
    from ..models.loading import save_checkpoint
    from .adversarial import AdversarialSettings, plot_log, settings_dict, train_adversarial

    _positive(args, ["batch_size", "max_new_tokens", "rounds"])
    settings = AdversarialSettings(
        rounds=args.rounds, d_steps=args.d_steps, g_steps=args.g_steps, mle_steps=args.mle_steps,
        batch_size=args.batch_size, g_lr=args.g_lr, d_lr=args.d_lr, temperature=args.temperature,
        max_new_tokens=args.max_new_tokens, baseline_decay=args.baseline_decay, seed=args.seed)
    if not args.discriminator:
        raise UserError("--discriminator is required: a pretrained discriminator (make one with "
                        "`dialogen train-discriminator --generator ...`)")
    model, tok, template, meta = load_generator(args.generator)
    disc, disc_tok, _ = load_discriminator(args.discriminator)
    check_tokenizer(disc_tok, tok)
    train, valid = load_pairs(args, [model], tok, template)
    out = Path(args.out)
    log = Path(args.log) if args.log else out.with_name(out.name + "-adversarial.jsonl")

    def show(row):
        keys = ("d_accuracy", "mean_reward", "valid_ppl")
        parts = [f"{k} {row[k]:.4g}" for k in keys if row.get(k) is not None]
        print(f"dialogen: round {row['round']}/{args.rounds} " + " ".join(parts), file=sys.stderr, flush=True)

    rows = train_adversarial(model, disc, tok, template.stop_ids(tok), train, valid, settings, log, show)
    plot = plot_log(rows, log.with_suffix(".png"), f"adversarial training of {args.generator}")
    tok.chat_template = template.source  # the saved generator carries its template, as a trained model does
    meta = {**meta, "template": template.name, **template.stop_meta(tok),
            "adversarial": {"from": str(args.generator), "discriminator": str(Path(args.discriminator).resolve()),
                            "settings": settings_dict(settings), "log": str(log)}}
    save_checkpoint(out, model.eval(), tok, meta)  # in the generator's own family's format
    d_out = Path(args.discriminator_out) if args.discriminator_out else out.with_name(out.name + "-discriminator")
    save_discriminator(d_out, disc.eval(), tok, {"adversarial_of": str(out.resolve())})
    print(json.dumps({"out": str(out), "discriminator_out": str(d_out), "log": str(log), "plot": str(plot),
                      "last": rows[-1]}))
    return 0
