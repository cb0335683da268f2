"""Examples -> batches: length buckets or packed rows, right padding, seeded order.

Right padding needs no attention mask for a causal model: padding comes after every real
token, so no real token attends to it; padded positions carry no label.
"""

from __future__ import annotations

import random

import torch

from .dataset import IGNORE_INDEX, Example

BUCKET_SPAN = 50  # batches per length-sorted group


def bucket_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices per batch: shuffled, then sorted by length within groups of
    BUCKET_SPAN batches (little padding), then the batch order shuffled again."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    group = batch_size * BUCKET_SPAN
    batches = []
    for g in range(0, len(order), group):
        chunk = sorted(order[g:g + group], key=lambda i: lengths[i])
        for b in range(0, len(chunk), batch_size):
            batches.append(chunk[b:b + batch_size])
    rng.shuffle(batches)
    return batches


def pack(examples: list[Example], max_len: int, seed: int) -> list[Example]:
    """Examples joined end to end (seeded order) into rows of at most max_len tokens, kept apart:
    each token's segment (`Example.segments`) limits its attention to its own example and restarts
    its positions (`Transformer.trunk`), and an example's first token, which nothing of its own
    precedes, has no label, as alone."""
    order = list(range(len(examples)))
    random.Random(f"pack:{seed}").shuffle(order)
    rows, ids, labels, segments = [], [], [], []
    for i in order:
        ex = examples[i]
        if ids and len(ids) + len(ex.ids) > max_len:
            rows.append(Example(ids, labels, segments))
            ids, labels, segments = [], [], []
        n = segments[-1] + 1 if segments else 0
        ids, labels, segments = ids + ex.ids, labels + [IGNORE_INDEX] + ex.labels[1:], segments + [n] * len(ex.ids)
    if ids:
        rows.append(Example(ids, labels, segments))
    return rows


def collate_segments(examples: list[Example]) -> torch.Tensor | None:
    """The segments (B, T) of packed rows, as `collate` pads them (padding: segment -1), or None."""
    if all(ex.segments is None for ex in examples):
        return None
    T = max(len(ex.ids) for ex in examples)
    segs = torch.full((len(examples), T), -1, dtype=torch.long)
    for b, ex in enumerate(examples):
        segs[b, : len(ex.ids)] = torch.tensor(ex.segments or [0] * len(ex.ids), dtype=torch.long)
    return segs


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels), both (B, T) long, right-padded to the longest example."""
    T = max(len(ex.ids) for ex in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for b, ex in enumerate(examples):
        ids[b, : len(ex.ids)] = torch.tensor(ex.ids, dtype=torch.long)
        labels[b, : len(ex.labels)] = torch.tensor(ex.labels, dtype=torch.long)
    return ids, labels
