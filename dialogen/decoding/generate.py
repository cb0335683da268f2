"""The incremental decoding loop, streaming UTF-8-safe text deltas.

Any model family plugs in through one step: `model(ids (B, T), cache) -> logits (B, T, V)`,
with `model.new_cache(batch)` making the cache the step appends to.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .constrain import matcher_for
from .processors import draw, shape_logits, token_logprobs
from .settings import Sampling
from .stops import StopMatcher


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def room(model, prompt_len: int, limit: int) -> int:
    """New tokens a reply may have: `limit`, or fewer where the model's positions end (prompt plus
    reply within them; at least one). Models without a position limit declare none."""
    positions = getattr(model, "max_positions", None)
    return limit if positions is None else max(1, min(limit, positions - prompt_len))


@torch.inference_mode()
def step(model, ids: list[int], cache) -> torch.Tensor:
    """Feed `ids` after what the cache holds; return the next-token logits (V,)."""
    return model(torch.tensor([ids], dtype=torch.long), cache)[0, -1]


class Stream:
    """A reply produced as it is iterated: text deltas, then `text`, `tokens` and `finish_reason`.

    Subclasses write `_produce()`, a generator of deltas that sets `finish_reason`. However the
    iteration ends (drained, closed, or interrupted by an exception such as Ctrl-C), `on_finish(self)`
    runs once, with `finish_reason` "interrupted" if the reply did not finish.
    """

    on_finish = None
    finish_reason: str | None = None

    def __iter__(self) -> Iterator[str]:
        if not hasattr(self, "_iter"):
            self._iter = self._stream()
        return self._iter

    def __next__(self) -> str:
        return next(iter(self))

    def close(self):
        iter(self).close()

    def run(self):
        for _ in self:
            pass
        return self

    def _stream(self):
        try:
            yield from self._produce()
        finally:
            if self.finish_reason is None:
                self.finish_reason = "interrupted"
            if self.on_finish is not None:
                self.on_finish(self)


class Generation(Stream):
    """A sampled (or greedy) reply, streamed token by token.

    A delta never ends inside a multi-byte character and never shows a prefix of a stop string.
    With `sampling.logprobs` set, `logprobs[i]` is (log-probability, [(token, log-probability)
    of the most likely]) of `tokens[i]` under the distribution it was drawn from (see
    `processors.shape_logits`); with `sampling.constraint`, tokens outside the grammar are masked.
    """

    def __init__(self, model, tokenizer, feed: list[int], cache, sampling: Sampling, stop_ids: set[int],
                 history: list[int] | None = None, on_finish=None):
        self.model, self.tokenizer, self.feed, self.cache = model, tokenizer, feed, cache
        self.s, self.stop_ids = sampling, stop_ids
        self.history = list(history if history is not None else feed)
        self.tokens: list[int] = []
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.text = ""
        self.on_finish = on_finish
        self._stops = StopMatcher(sampling.stop)

    def _produce(self):
        g = make_generator(self.s.seed)
        limit = room(self.model, len(self.history), self.s.max_new_tokens)
        logits = step(self.model, self.feed, self.cache)
        grammar = matcher_for(self.s, self.tokenizer, logits.shape[-1], self.stop_ids)
        for i in range(limit):
            shaped = shape_logits(logits, self.s, self.history, self.tokens,
                                  grammar.allowed(limit - i) if grammar is not None else None)
            tok = draw(shaped, self.s, g)
            if grammar is not None:  # closed in time: the rest of the grammar fits in the tokens left
                tok = grammar.fit(tok, limit - i)
            if tok in self.stop_ids:
                self.finish_reason = "stop"
                break
            if grammar is not None:
                grammar.accept(tok)
            if self.s.logprobs is not None:
                self.logprobs.append(token_logprobs(shaped, tok, self.s.logprobs))
            self.tokens.append(tok)
            self.history.append(tok)
            delta, stopped = self._delta()
            if delta:
                yield delta
            if stopped:
                self.finish_reason = "stop"
                break
            if len(self.tokens) < limit:
                logits = step(self.model, [tok], self.cache)
        else:
            self.finish_reason = "length"
        tail, _ = self._delta(final=True)
        if tail:
            yield tail

    def _delta(self, final: bool = False) -> tuple[str, bool]:
        full = self.tokenizer.decode(self.tokens)
        settled = full if final else full.rstrip("\ufffd")  # an incomplete UTF-8 sequence waits for the next token
        cut = self._stops.update(settled)
        if cut is not None:
            full = settled[:cut]
        else:
            full = settled.rstrip("\ufffd") if final else settled[: len(settled) - self._stops.hold]
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text = full if full.startswith(self.text) else self.text
        return delta, cut is not None
