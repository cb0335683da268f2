"""Beam search over the shared decode step, the beams riding as rows of one batch.

The search uses only `model(ids (B, T), cache) -> logits (B, T, V)`, `model.new_cache(batch)` and
`cache.reorder(index)`, so every model family runs it unchanged. The prompt is encoded once on a
batch-1 cache, which `reorder` then copies into every beam row.

Scores (what the n-best list is sorted by):
    score = logprob / length ** length_penalty
where `length` counts the reply tokens plus the stop token when the reply ended on one, and
`logprob` is the sum of the log-probabilities of those tokens under the distribution the search
ranked: the model's log-softmax after the repetition penalty (none when it is 1) and logit_bias, with blocked
tokens removed. `Candidate.logprob` is always the plain model log-likelihood of the same tokens,
penalty or not, so rerankers see the model's own probability.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from .generate import room
from .processors import banned_ngram_tokens, bias_logits, repetition_penalty
from .settings import SettingError, check


@dataclass
class Candidate:
    """One finished reply. `tokens` excludes the stop token; `stop_token` is None when cut at max length."""

    tokens: list[int]
    logprob: float  # model log-likelihood of tokens (+ the stop token)
    score: float = 0.0  # the generator's own ranking score
    finish_reason: str = "stop"
    stop_token: int | None = None
    text: str = ""
    scores: dict = field(default_factory=dict)  # filled by rerankers: name -> value

    @property
    def length(self) -> int:
        return len(self.tokens) + (self.stop_token is not None)


@dataclass
class BeamSettings:
    beam_size: int = 5
    max_new_tokens: int = 64
    min_new_tokens: int = 0  # stop tokens are blocked before this many reply tokens
    length_penalty: float = 1.0  # 0 = rank by the plain sum; > 0 favours longer replies
    early_stopping: bool = True  # stop once beam_size replies are finished
    no_repeat_ngram: int = 0  # within the reply
    block_context_ngram: int = 0  # never repeat an n-gram of the context
    repetition_penalty: float = 1.0
    penalty_window: int = 64
    logit_bias: dict = field(default_factory=dict)  # token id -> bias, as in `Sampling` (the search's ranking only)

    def __post_init__(self):
        check(self)
        if self.min_new_tokens > self.max_new_tokens:
            raise SettingError("min_new_tokens", lambda spell: f"{spell('min_new_tokens')} must be at most "
                                                               f"{spell('max_new_tokens')}, got {self.min_new_tokens}")


def context_ngram_table(segments: list[list[int]], n: int) -> dict[tuple, set[int]]:
    """(n-1)-token prefix -> the tokens that follow it somewhere in the context.

    The context comes as segments (one per message) so no n-gram spans two messages.
    """
    table: dict[tuple, set[int]] = {}
    if n <= 0:
        return table
    for seg in segments:
        for i in range(len(seg) - n + 1):
            table.setdefault(tuple(seg[i:i + n - 1]), set()).add(seg[i + n - 1])
    return table


def blocked_tokens(reply: list[int], s: BeamSettings, table: dict[tuple, set[int]]) -> set[int]:
    """Tokens that would complete an n-gram already in the reply or in the context."""
    banned = set(banned_ngram_tokens(reply, s.no_repeat_ngram))
    n = s.block_context_ngram
    if n > 0 and len(reply) >= n - 1:
        banned |= table.get(tuple(reply[len(reply) - n + 1:]) if n > 1 else (), set())
    return banned


class _Finished:
    """The best `size` finished replies seen so far."""

    def __init__(self, size: int):
        self.size, self.items = size, []

    def add(self, cand: Candidate):
        if len(self.items) < self.size or cand.score > self.worst():
            self.items.append(cand)
            self.items.sort(key=lambda c: c.score, reverse=True)
            del self.items[self.size:]

    def worst(self) -> float:
        return self.items[-1].score if self.items else float("-inf")

    def full(self) -> bool:
        return len(self.items) >= self.size


def _step_logprobs(logits, beams: list[list[int]], prompt: list[int], s: BeamSettings, table, stop: list[int],
                   t: int, grammars=None):
    """(search log-probs, model log-probs), both (B, V), for the next token of every beam; with
    `grammars` (a matcher per beam), tokens outside the grammar are at -inf in the search's."""
    logits = logits.float()
    raw = torch.log_softmax(logits, dim=-1)
    logits = bias_logits(logits, s.logit_bias)
    rows = []
    for b, reply in enumerate(beams):
        row = logits[b]
        if s.repetition_penalty != 1.0:
            history = prompt + reply
            window = history[-s.penalty_window:] if s.penalty_window > 0 else history
            row = repetition_penalty(row, window, s.repetition_penalty)
        rows.append(row)
    shaped = s.repetition_penalty != 1.0 or s.logit_bias
    search = torch.log_softmax(torch.stack(rows), dim=-1) if shaped else raw.clone()
    for b, reply in enumerate(beams):
        banned = blocked_tokens(reply, s, table)
        if banned:
            search[b, sorted(banned)] = float("-inf")
    if t < s.min_new_tokens and stop:
        search[:, stop] = float("-inf")
    if grammars is not None:  # within a margin of the budget, only the closing path (see constrain.py)
        left = s.max_new_tokens - t
        search.masked_fill_(~torch.stack([g.allowed(left, margin=4) for g in grammars]), float("-inf"))
    return search, raw


def _advance(grammars: list, parents: list[int], tokens: list[int]) -> list:
    """Each new beam's matcher: its parent's (a copy when the parent has several children), after its token."""
    left = {p: parents.count(p) for p in parents}
    out = []
    for p, tok in zip(parents, tokens):
        left[p] -= 1
        g = grammars[p].copy() if left[p] else grammars[p]  # the last child takes the parent's own
        g.accept(tok)
        out.append(g)
    return out


def _bound(running_sums: list[float], s: BeamSettings, cur_len: int) -> float:
    """The best score any running beam could still reach (log-probs only fall as replies grow)."""
    best = max(running_sums)
    length = s.max_new_tokens if s.length_penalty > 0 else cur_len
    return best / length ** s.length_penalty


def _select(total, raw, beams, raw_sums, s: BeamSettings, stop_ids: set[int], k: int, t: int, done: _Finished):
    """The next beams from the k best moves (B, V): finished replies go to `done`.

    Returns (parents, tokens, search sums, model log-likelihood sums), one entry per new beam.
    """
    V = total.shape[-1]
    top_scores, top_idx = total.view(-1).topk(k)
    parents, tokens, sums, raws = [], [], [], []
    for rank in range(k):
        score = float(top_scores[rank])
        if score == float("-inf"):
            break
        row, tok = divmod(int(top_idx[rank]), V)
        if tok in stop_ids:
            if rank < s.beam_size:  # a stop token only counts among the beam_size best moves
                done.add(Candidate(list(beams[row]), raw_sums[row] + float(raw[row, tok]),
                                   score / (t + 1) ** s.length_penalty, "stop", tok))
            continue
        parents.append(row)
        tokens.append(tok)
        sums.append(score)
        raws.append(raw_sums[row] + float(raw[row, tok]))
        if len(parents) == s.beam_size:
            break
    return parents, tokens, sums, raws


@torch.inference_mode()
def beam_search(model, prompt: list[int], s: BeamSettings, stop_ids: set[int],
                context: list[list[int]] | None = None, grammar=None) -> list[Candidate]:
    """The n-best replies to `prompt` (at most `beam_size`), best first.

    `context` holds the token segments `block_context_ngram` blocks against, e.g. the encoded
    text of each earlier message (default: the whole prompt as one segment). `grammar(V)` makes a
    `constrain.Matcher` for a vocabulary of V tokens: every beam then stays within the grammar
    (a beam that splits copies its matcher), and a beam ends on a stop token only where it is complete.
    """
    if not prompt:
        raise UserError("beam search needs a non-empty prompt")
    s = dataclasses.replace(s, max_new_tokens=room(model, len(prompt), s.max_new_tokens))
    stop = sorted(stop_ids)
    table = context_ngram_table([prompt] if context is None else context, s.block_context_ngram)
    cache = model.new_cache(1)
    logits = model(torch.tensor([prompt], dtype=torch.long), cache)[:, -1]  # (1, V)
    beams: list[list[int]] = [[]]
    sums, raw_sums = [0.0], [0.0]
    done = _Finished(s.beam_size)
    rows_in_cache = 1
    k = (len(stop) + 1) * s.beam_size  # enough moves that beam_size of them can keep running
    grammars = [grammar(logits.shape[-1])] if grammar is not None else None
    for t in range(s.max_new_tokens):
        search, raw = _step_logprobs(logits, beams, prompt, s, table, stop, t, grammars)
        total = torch.tensor(sums)[:, None] + search  # (B, V)
        parents, tokens, sums, raw_sums = _select(total, raw, beams, raw_sums, s, stop_ids,
                                                  min(k, total.numel()), t, done)
        if not parents:
            break
        beams = [beams[p] + [tok] for p, tok in zip(parents, tokens)]
        if grammars is not None:
            grammars = _advance(grammars, parents, tokens)
        if done.full() and (s.early_stopping or _bound(sums, s, t + 1) <= done.worst()):
            break
        if t + 1 == s.max_new_tokens:
            for reply, sm, rw in zip(beams, sums, raw_sums):
                done.add(Candidate(reply, rw, sm / len(reply) ** s.length_penalty, "length", None))
            break
        if parents != list(range(rows_in_cache)):  # beams moved, split or died: rows follow them
            cache.reorder(torch.tensor(parents, dtype=torch.long))
            rows_in_cache = len(parents)
        logits = model(torch.tensor(tokens, dtype=torch.long)[:, None], cache)[:, -1]
    return done.items
