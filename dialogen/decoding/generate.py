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


class TokenLoop:
    """The per-token sequence of one reply, shared by `Generation` and batched generation: shape
    the logits (penalties, the grammar's mask) and draw (`choose`), then take the token (`take`):
    a stop id, a stop string or the token limit ends the reply. `history` (the prompt and the reply)
    and `tokens` (the reply) are the caller's lists, grown in place."""

    def __init__(self, model, tokenizer, s: Sampling, stop_ids: set[int], history: list[int], tokens: list[int],
                 vocab_size: int, generator: torch.Generator, stops: StopMatcher | None = None):
        self.tokenizer, self.s, self.stop_ids, self.g = tokenizer, s, stop_ids, generator
        self.history, self.tokens = history, tokens
        self.limit = room(model, len(history), s.max_new_tokens)
        self.grammar = matcher_for(s, tokenizer, vocab_size, stop_ids)  # None without a constraint
        self.stops = stops if stops is not None else StopMatcher(s.stop)
        self.text = ""  # the reply decoded, without a trailing incomplete UTF-8 sequence
        self.cut: int | None = None  # where a stop string starts in `text`

    def choose(self, logits: torch.Tensor) -> tuple[int, torch.Tensor]:
        """(the next token, the shaped logits (V,) it was drawn from) for next-token logits (V,)."""
        left, grammar = self.limit - len(self.tokens), self.grammar
        shaped = shape_logits(logits, self.s, self.history, self.tokens,
                              grammar.allowed(left) if grammar is not None else None)
        tok = draw(shaped, self.s, self.g)
        if grammar is not None:  # closed in time: the rest of the grammar fits in the tokens left
            tok = grammar.fit(tok, left)
        return tok, shaped

    def take(self, tok: int, decode: bool = True) -> str | None:
        """Add `tok` to the reply (a stop id is not added); return the finish reason ("stop",
        "length") when it ends the reply, else None. `decode` keeps `text` and matches stop strings."""
        if tok in self.stop_ids:
            return "stop"
        if self.grammar is not None:
            self.grammar.accept(tok)
        self.tokens.append(tok)
        self.history.append(tok)
        if decode:
            self.text = self.tokenizer.decode(self.tokens).rstrip("\ufffd")  # a partial character waits
            self.cut = self.stops.update(self.text)
            if self.cut is not None:
                return "stop"
        return "length" if len(self.tokens) >= self.limit else None


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

    @property
    def iterating(self) -> bool:
        """True once the reply is being iterated: then only its iterator may step it."""
        return hasattr(self, "_iter")

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
        self._loop: TokenLoop | None = None  # made at the first step, which knows the vocabulary size

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
        if self._loop is None:
            self._loop = TokenLoop(self.model, self.tokenizer, self.s, self.stop_ids, self.history, self.tokens,
                                   logits.shape[-1], make_generator(self.s.seed))
        tok, shaped = self._loop.choose(logits)
        if self.s.logprobs is not None and tok not in self.stop_ids:
            self.logprobs.append(token_logprobs(shaped, tok, self.s.logprobs))
        reason = self._loop.take(tok)
        delta = self._delta() if tok not in self.stop_ids else ""
        deltas = [delta] if delta else []
        return self._end(reason, deltas) if reason is not None else deltas

    def _end(self, reason: str, deltas: list[str]) -> list[str]:
        tail = self._delta(final=True)
        self.finish_reason = reason
        return deltas + [tail] if tail else deltas

    def _delta(self, final: bool = False) -> str:
        """The text settled since the last delta: cut at a stop string, and short of what could still
        begin one (all of it when `final`)."""
        loop = self._loop
        if final:
            settled = self.tokenizer.decode(self.tokens)
            cut = loop.stops.update(settled)
            full = settled[:cut] if cut is not None else settled.rstrip("\ufffd")
        else:
            cut = loop.cut
            full = loop.text[:cut] if cut is not None else loop.text[: len(loop.text) - loop.stops.hold]
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text = full if full.startswith(self.text) else self.text
        return delta
