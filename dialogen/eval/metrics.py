"""Reply metrics, as the DialoGPT paper reports them: pure functions of texts.

- BLEU-n: sacrebleu's corpus BLEU (13a tokenizer, lowercased, its default smoothing) with up to
  n-gram precisions; any number of references per reply (multi-reference), 0-100.
- Dist-n: distinct n-grams / all n-grams over every reply of the corpus (Li et al. 2016).
- Entropy-n: entropy (natural log) of the corpus' n-gram frequency distribution (Zhang et al. 2018).
- avg_len: mean number of words per reply.

Dist, entropy and length count words as `words()` splits them: lowercased, runs of letters or
digits, and every punctuation mark on its own.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from ..errors import UserError

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def ngram_counts(replies: list[str], n: int) -> Counter:
    counts: Counter = Counter()
    for r in replies:
        counts.update(ngrams(words(r), n))
    return counts


def distinct_n(replies: list[str], n: int) -> float:
    counts = ngram_counts(replies, n)
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


def entropy_n(replies: list[str], n: int = 4) -> float:
    counts = ngram_counts(replies, n)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0


def avg_length(replies: list[str]) -> float:
    return sum(len(words(r)) for r in replies) / len(replies) if replies else 0.0


def _sacrebleu():
    try:
        from sacrebleu.metrics import BLEU
    except ImportError:
        raise UserError("BLEU needs sacrebleu: pip install 'dialogen[eval]' (or pip install sacrebleu)") from None
    return BLEU


def bleu(replies: list[str], references: list[list[str]], max_order: int = 4) -> float:
    """Corpus BLEU; `references[i]` holds every reference for `replies[i]` (one or more)."""
    if len(replies) != len(references):
        raise ValueError(f"{len(replies)} replies but {len(references)} reference lists")
    if any(not refs for refs in references):
        raise ValueError("every reply needs at least one reference")
    width = max(len(refs) for refs in references)
    # sacrebleu wants reference streams; a reply with fewer references pads its streams with None
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    metric = _sacrebleu()(max_ngram_order=max_order, lowercase=True)
    return float(metric.corpus_score(list(replies), streams).score)


def reply_metrics(replies: list[str], references: list[list[str]]) -> dict:
    """Every metric of the table for one decoding run."""
    return {
        "bleu2": bleu(replies, references, 2),
        "bleu4": bleu(replies, references, 4),
        "dist1": distinct_n(replies, 1),
        "dist2": distinct_n(replies, 2),
        "entropy4": entropy_n(replies, 4),
        "avg_len": avg_length(replies),
    }
