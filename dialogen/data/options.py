"""The data flags every command shares (`--data`, `--format`, `--skip-bad`, `--split`,
`--split-seed`; and `--train-on`, `--max-len` where examples are built), so each command reads
data the same way. Torch-free: building `--help` is instant."""

from __future__ import annotations

import argparse

from .dataset import TRAIN_ON
from .formats import FORMATS
from .splits import ALL, SPLITS

MAX_LEN = 512  # tokens per training example (a window of a conversation)
DATA_HELP = ("'chitchat' (built in) or a data file: .jsonl (OpenAI chat {\"messages\": [...]}, weight 0 = not "
             "trained; or ShareGPT {\"conversations\": [{\"from\", \"value\"}]}), .json (an array of those), "
             ".parquet / .csv (a messages or conversations column), .tsv (DialoGPT 'context EOS ... <TAB> "
             "response'), .txt (a turn per line, blank line between dialogues)")


def add_data_source_args(g, split_default: str | None = None, skip_bad: bool = True, split_seed: int = 0):
    """--data (with the hidden alias --dataset), --format, --skip-bad, --split-seed and, when
    `split_default` is given, --split (train, valid, test or all)."""
    g.add_argument("--data", default="chitchat", help=f"{DATA_HELP} (default: %(default)s)")
    g.add_argument("--dataset", dest="data", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # its old name in eval
    g.add_argument("--format", default=None, help=f"{', '.join(FORMATS)}; default: from the extension")
    if skip_bad:
        g.add_argument("--skip-bad", action="store_true", help="skip (and count) bad lines instead of stopping")
    if split_default is not None:
        g.add_argument("--split", default=split_default, choices=[*SPLITS, ALL],
                       help="a split by conversation, or all: every conversation of the file, in order "
                            "(default: %(default)s)")
    g.add_argument("--split-seed", type=int, default=split_seed,
                   help="seed of the train/valid/test split by conversation (default: %(default)s)")


def add_data_args(p: argparse.ArgumentParser, split_default: str | None = None):
    """The data source, and how its conversations become training examples."""
    g = p.add_argument_group("data")
    add_data_source_args(g, split_default)
    g.add_argument("--train-on", default=TRAIN_ON[0], choices=TRAIN_ON,
                   help="trained turns: the assistant's, or every turn after the first (DialoGPT) (default: %(default)s)")
    g.add_argument("--max-len", type=int, default=MAX_LEN,
                   help="tokens per example; longer conversations are cut into windows at turns (default: %(default)s)")
