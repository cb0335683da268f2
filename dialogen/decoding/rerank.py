"""Scorers that rank candidate replies; `SCORERS` is a plain registry name -> class.

A scorer is built as `cls(engine, **options)` (it takes the options it needs and ignores the
rest) and `score(context, candidates)` returns, per candidate, a dict whose "score" ranks it
(higher is better) and whose other keys are the parts it was made of, for `--show-candidates`.
`context` is the conversation the reply answers (system message included, newest message last).

- logprob: the length-normalised log-likelihood of the reply under the forward model,
  log P(r | c) / |r|, where |r| counts the reply tokens and the stop token that ended it.
- mmi: log P(r | c) / |r| + weight * log P(c | r) / |c|, with P(c | r) from a reverse model
  (`dialogen train --reverse`; example format in `dialogen.decoding.reverse`). Both terms are mean
  log-probabilities per token, so the weight trades like for like and short replies are not
  favoured for being short.
- discriminator: log P(human-written) from a discriminator (`dialogen train-discriminator`).
"""

from __future__ import annotations

import math

import torch

from ..errors import UserError
from ..models.discriminator import check_tokenizer, load_discriminator
from .beam import Candidate
from .engine import load_engine
from .reverse import REVERSE_CONTEXT_TURNS, reverse_example_ids


@torch.inference_mode()
def masked_logprobs(model, rows: list[tuple[list[int], list[int]]], pad_id: int = 0,
                    batch_size: int = 4) -> list[tuple[float, int]]:
    """Per (ids, mask) row: (sum of log P(ids[t] | ids[:t]) over t where mask[t], count of such t).

    One plain forward pass per right-padded batch, no cache (decoder-only models).
    """
    out: list[tuple[float, int]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for b, (row, _) in enumerate(chunk):
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        logits = model(ids)  # (B, T, V)
        for b, (row, mask) in enumerate(chunk):
            where = [t for t in range(1, len(row)) if mask[t]]
            if not where:
                out.append((0.0, 0))
                continue
            logp = torch.log_softmax(logits[b, [t - 1 for t in where]].float(), dim=-1)  # (n, V)
            picked = logp[torch.arange(len(where)), torch.tensor([row[t] for t in where])]
            out.append((float(picked.sum()), len(where)))
    return out


def mean_logprob(c: Candidate) -> float:
    return c.logprob / max(c.length, 1)


class LogLikelihood:
    """log P(r | c) / |r| under the model that generated the candidates."""

    name = "logprob"

    def __init__(self, engine=None, **_):
        self.engine = engine

    def score(self, context, candidates: list[Candidate]) -> list[dict]:
        return [{"score": mean_logprob(c)} for c in candidates]


class MMI:
    """log P(r | c) / |r| + weight * log P(c | r) / |c| (maximum mutual information reranking)."""

    name = "mmi"

    def __init__(self, engine, mmi_model: str | None = None, mmi_weight: float = 0.5, reverse=None, **_):
        """`reverse` (an Engine) skips loading `mmi_model`, for callers that hold one already."""
        if mmi_weight < 0:
            raise UserError(f"--mmi-weight must be >= 0, got {mmi_weight}")
        if reverse is None:
            if not mmi_model:
                raise UserError("--scorer mmi needs --mmi-model PATH (a reverse model from `dialogen train --reverse`)")
            reverse = load_reverse(mmi_model)
        if not reverse.model.reuses_prefix:
            raise UserError("--mmi-model must be a decoder-only model (it scores whole sequences in one pass)")
        fwd, rev = engine.tokenizer.fingerprint(), reverse.tokenizer.fingerprint()
        if fwd != rev:
            raise UserError(f"--mmi-model: its tokenizer (fingerprint {rev}) differs from the forward model's "
                            f"({fwd}); the reverse model must be trained with the same tokenizer")
        self.engine, self.reverse, self.weight = engine, reverse, mmi_weight
        self.context_turns = (reverse.meta.get("reverse") or {}).get("context_turns")  # as it was trained

    def reverse_logprobs(self, context, candidates: list[Candidate]) -> list[float]:
        """Mean log P(c | r) per context token, for each candidate reply r."""
        rev = self.reverse
        turns = self.context_turns or REVERSE_CONTEXT_TURNS
        max_len = rev.context_length
        rows = [reverse_example_ids(rev.tokenizer, rev.template, context, c.text, turns, max_len) for c in candidates]
        sums = masked_logprobs(rev.model, rows, rev.tokenizer.pad_id)
        return [s / n if n else 0.0 for s, n in sums]

    def score(self, context, candidates: list[Candidate]) -> list[dict]:
        if not any(m.role != "system" for m in context):
            raise UserError("MMI reranking needs a context: at least one message before the reply")
        rev = self.reverse_logprobs(context, candidates)
        out = []
        for c, r in zip(candidates, rev):
            fwd = mean_logprob(c)
            out.append({"score": fwd + self.weight * r, "forward": fwd, "reverse": r})
        return out


class DiscriminatorScore:
    """log P(human-written | c, r) from a trained discriminator."""

    name = "discriminator"

    def __init__(self, engine, discriminator: str | None = None, **_):
        if not discriminator:
            raise UserError("--scorer discriminator needs --discriminator PATH (from `dialogen train-discriminator`)")
        self.disc, tokenizer, _ = load_discriminator(discriminator, flag="--discriminator")
        check_tokenizer(tokenizer, engine.tokenizer, flag="--discriminator", generator_flag="--model")
        self.tokenizer = engine.tokenizer

    def score(self, context, candidates: list[Candidate]) -> list[dict]:
        pairs = [self.disc.encode_pair(self.tokenizer, context, c.text) for c in candidates]
        probs = self.disc.prob_human(pairs)
        return [{"score": math.log(max(p, 1e-12)), "p_human": p} for p in probs]


SCORERS = {
    "logprob": LogLikelihood,
    "mmi": MMI,
    "discriminator": DiscriminatorScore,
}


def make_scorer(name: str, engine, **options):
    if name not in SCORERS:
        raise UserError(f"--scorer: unknown scorer {name!r}; known: {', '.join(SCORERS)}")
    return SCORERS[name](engine, **options)


def load_reverse(path: str, dtype="float32"):
    """A reverse model as an Engine (its dialogen.json says the context turns it was trained on)."""
    try:
        return load_engine(path, "auto", dtype)
    except UserError as e:
        raise UserError(f"--mmi-model: {e}") from None


def rerank(scorer, context, candidates: list[Candidate]) -> int:
    """Score every candidate (into `c.scores`) and return the index of the winner."""
    if not candidates:
        raise ValueError("nothing to rerank")
    results = scorer.score(context, candidates)
    for c, r in zip(candidates, results):
        c.scores = dict(r)
    return max(range(len(candidates)), key=lambda i: candidates[i].scores["score"])
