"""Deterministic train/valid/test splits by conversation, written once and reused.

A dataset is parsed once, its conversations are shuffled with a seeded generator and cut into
test (5%), valid (5%) and train (the rest); each part is written as JSONL under the cache dir,
keyed by the data file's path and content, format, seed and this module's split version. Every later
run reads the same files, so no test conversation is ever trained on, whichever command asks.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

from ..chat.messages import Message
from ..paths import cache_dir
from ..errors import UserError
from .formats import Turn, read_conversations, resolve_format

SPLITS = ("train", "valid", "test")
ALL = "all"  # every conversation of the file, in file order (to score or inspect a whole small file)
FRACTIONS = {"test": 0.05, "valid": 0.05}
SPLIT_VERSION = 2  # 2: DialoGPT TSV read as DialoGPT's prepro.py reads it


def split_sizes(n: int) -> dict[str, int]:
    """Conversations per split; test and valid get at least one once there are three."""
    sizes = {}
    for name, frac in FRACTIONS.items():
        sizes[name] = max(1, round(n * frac)) if n >= 3 else 0
    sizes["train"] = n - sizes["test"] - sizes["valid"]
    return sizes


def assign(n: int, seed: int) -> dict[str, list[int]]:
    """Conversation indices per split (each list in file order)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    sizes = split_sizes(n)
    test = sorted(order[: sizes["test"]])
    valid = sorted(order[sizes["test"]: sizes["test"] + sizes["valid"]])
    train = sorted(order[sizes["test"] + sizes["valid"]:])
    return {"train": train, "valid": valid, "test": test}


def split_dir(dataset: str, fmt: str | None, seed: int) -> tuple[str, Path, Path]:
    """(format, data file, cache dir of its split)."""
    fmt, path = resolve_format(dataset, fmt)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    # the path too: skipped-line reports name it (the split itself depends on content and seed only)
    digest.update(f"{path.resolve()}:{fmt}:{seed}:{FRACTIONS}:{SPLIT_VERSION}".encode())
    return fmt, path, cache_dir() / "data" / f"{path.stem}-{fmt}-{digest.hexdigest()[:16]}"


def load_split(dataset: str = "chitchat", split: str = "test", fmt: str | None = None, seed: int = 0,
               skip_bad: bool = False) -> list[list[Message]]:
    """The conversations of one split of a dataset name ("chitchat") or a data file; split "all":
    every conversation, in the file's order."""
    if split not in SPLITS and split != ALL:
        raise UserError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}, {ALL}")
    fmt, path, directory = split_dir(dataset, fmt, seed)
    meta = _read_meta(directory)
    if meta is None:
        parsed = read_conversations(str(path), fmt, skip_bad)
        meta = {"source": str(path), "format": fmt, "seed": seed, "skipped": parsed.skipped,
                "sizes": {k: len(v) for k, v in assign(len(parsed.conversations), seed).items()}}
        _write(directory, parsed.conversations, seed, meta)
    skipped = meta["skipped"]
    if skipped and not skip_bad:
        raise UserError(skipped[0])  # the split was made with --skip-bad; this caller did not ask
    if skipped:
        print(f"dialogen: skipped {len(skipped)} bad line(s) in {path} (first: {skipped[0]})", file=sys.stderr)
    if split != ALL:
        return _read_split(directory / f"{split}.jsonl")
    parts = {name: _read_split(directory / f"{name}.jsonl") for name in SPLITS}
    everything: list = [None] * sum(len(p) for p in parts.values())
    for name, idx in assign(len(everything), seed).items():  # where each split's conversations came from
        for i, conv in zip(idx, parts[name]):
            everything[i] = conv
    return everything


def _write(directory: Path, conversations: list[list[Message]], seed: int, meta: dict):
    directory.parent.mkdir(parents=True, exist_ok=True)
    if directory.exists() and not (directory / "meta.json").exists():  # left half-made by a crash
        shutil.rmtree(directory, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        for name, idx in assign(len(conversations), seed).items():
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for i in idx:
                    msgs = [m.to_dict() for m in conversations[i]]
                    f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, directory)
        except OSError:  # another process made the same split first: theirs is identical
            if not (directory / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_meta(directory: Path) -> dict | None:
    try:
        return json.loads((directory / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _read_split(path: Path) -> list[list[Message]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            msgs = []
            for m in json.loads(line)["messages"]:
                w = m.get("weight")
                msgs.append(Message(m["role"], m["content"]) if w is None else Turn(m["role"], m["content"], w))
            out.append(msgs)
    return out
