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
    """Feed `ids` after what the cache holds; return the next-token logits (V,). A model with
    `next_logits` (the transformer) applies its head at the last position only."""
    ids = torch.tensor([ids], dtype=torch.long)
    last = getattr(model, "next_logits", None)
    return last(ids, cache)[0] if last is not None else model(ids, cache)[0, -1]


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
            self.finish()

    def finish(self):
        """End the reply (once): `finish_reason` becomes "interrupted" if it did not finish, and
        `on_finish(self)` runs. Iterating does this itself; whoever drives a reply step by step
        (the server's model thread) calls it when done."""
        if getattr(self, "_finished", False):
            return
        self._finished = True
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
        logits = step(self.model, self.feed, self.cache)
        while True:
            deltas = self.advance(logits)
            yield from deltas
            if self.done:
                return
            logits = step(self.model, self.tokens[-1:], self.cache)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def advance(self, logits: torch.Tensor) -> list[str]:
        """One step: take the next-token logits (V,) (after `feed`, then after each new token) and
        return the text deltas it settles. Then either `done` is set, or `tokens[-1]` is the token to
        feed next. Iterating the Generation runs this loop; the server's model thread runs it for
        many replies at once."""
        if not hasattr(self, "_g"):
            self._g = make_generator(self.s.seed)
            self._limit = room(self.model, len(self.history), self.s.max_new_tokens)
            self._grammar = matcher_for(self.s, self.tokenizer, logits.shape[-1], self.stop_ids)
        left, grammar = self._limit - len(self.tokens), self._grammar
        shaped = shape_logits(logits, self.s, self.history, self.tokens,
                              grammar.allowed(left) if grammar is not None else None)
        tok = draw(shaped, self.s, self._g)
        if grammar is not None:  # closed in time: the rest of the grammar fits in the tokens left
            tok = grammar.fit(tok, left)
        if tok in self.stop_ids:
            return self._end("stop", [])
        if grammar is not None:
            grammar.accept(tok)
        if self.s.logprobs is not None:
            self.logprobs.append(token_logprobs(shaped, tok, self.s.logprobs))
        self.tokens.append(tok)
        self.history.append(tok)
        delta, stopped = self._delta()
        deltas = [delta] if delta else []
        if stopped:
            return self._end("stop", deltas)
        if len(self.tokens) >= self._limit:
            return self._end("length", deltas)
        return deltas

    def _end(self, reason: str, deltas: list[str]) -> list[str]:
        tail, _ = self._delta(final=True)
        self.finish_reason = reason
        return deltas + [tail] if tail else deltas

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
