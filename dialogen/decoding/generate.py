"""The incremental decoding loop, streaming UTF-8-safe text deltas.

Any model family plugs in through one step: `model(ids (B, T), cache) -> logits (B, T, V)`,
with `model.new_cache(batch)` making the cache the step appends to.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .processors import Sampling, next_token


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


@torch.inference_mode()
def step(model, ids: list[int], cache) -> torch.Tensor:
    """Feed `ids` after what the cache holds; return the next-token logits (V,)."""
    return model(torch.tensor([ids], dtype=torch.long), cache)[0, -1]


class Generation:
    """Iterate to get text deltas; afterwards `text`, `tokens` and `finish_reason` hold the reply.

    A delta never ends inside a multi-byte character and never shows a prefix of a stop string.
    """

    def __init__(self, model, tokenizer, feed: list[int], cache, sampling: Sampling, stop_ids: set[int],
                 history: list[int] | None = None, on_finish=None):
        self.model, self.tokenizer, self.feed, self.cache = model, tokenizer, feed, cache
        self.s, self.stop_ids = sampling, stop_ids
        self.history = list(history if history is not None else feed)
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.on_finish = on_finish
        self._iter = self._run()

    def __iter__(self) -> Iterator[str]:
        return self._iter

    def __next__(self) -> str:
        return next(self._iter)

    def close(self):
        self._iter.close()

    def run(self) -> "Generation":
        for _ in self:
            pass
        return self

    def _run(self):
        g = make_generator(self.s.seed)
        try:
            logits = step(self.model, self.feed, self.cache)
            for _ in range(self.s.max_new_tokens):
                tok = next_token(logits, self.s, g, self.history, self.tokens)
                if tok in self.stop_ids:
                    self.finish_reason = "stop"
                    break
                self.tokens.append(tok)
                self.history.append(tok)
                delta, stopped = self._delta()
                if delta:
                    yield delta
                if stopped:
                    self.finish_reason = "stop"
                    break
                if len(self.tokens) < self.s.max_new_tokens:
                    logits = step(self.model, [tok], self.cache)
            else:
                self.finish_reason = "length"
            tail, _ = self._delta(final=True)
            if tail:
                yield tail
        finally:
            if self.finish_reason is None:
                self.finish_reason = "interrupted"
            if self.on_finish is not None:
                self.on_finish(self)

    def _delta(self, final: bool = False) -> tuple[str, bool]:
        full = self.tokenizer.decode(self.tokens)
        stopped = False
        for s in self.s.stop:
            if s and s in full:
                full, stopped = full[: full.index(s)], True
        if not stopped and not final:
            if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                return "", False
            hold = max((k for s in self.s.stop for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
            full = full[: len(full) - hold]
        if final:
            full = full.rstrip("\ufffd")
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text = full if full.startswith(self.text) else self.text
        return delta, stopped
