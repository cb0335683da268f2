"""Decoding beyond one sample: beam search and sample-and-rank, candidates scored by a reranker.

`Decoding` holds the choices (validated; errors name the flag), `Decoder` turns a prompt into a
`Reply` that carries every candidate with its scores and the index of the winner. A `Reply`
iterates like a `Generation` (it yields the winning text once), so the chat loop, the session
and the server treat both alike. With one beam and one candidate nothing is searched: callers
keep streaming a plain `Generation`.
"""

from __future__ import annotations

from .batch import reply_text, sample_replies
from .beam import BeamSettings, Candidate, beam_search
from .constrain import Matcher
from .generate import Stream
from .rerank import make_scorer, rerank
from .settings import Decoding, Sampling


class Reply(Stream):
    """The chosen reply with all candidates; iterates like a `Generation` (one delta: the text).

    The search runs on first iteration (or `run()`), so Ctrl-C in a chat stops it like a stream.
    """

    def __init__(self, compute, on_finish=None):
        self._compute, self.on_finish = compute, on_finish
        self.candidates: list[Candidate] = []
        self.winner = -1
        self.tokens: list[int] = []
        self.text = ""

    def _produce(self):
        self.candidates, self.winner = self._compute()
        best = self.candidates[self.winner]
        self.tokens, self.text, self.finish_reason = best.tokens, best.text, best.finish_reason
        if self.text:
            yield self.text

    def candidates_dicts(self) -> list[dict]:
        return [{"text": c.text, "tokens": len(c.tokens), "finish_reason": c.finish_reason,
                 "scores": c.scores, "winner": i == self.winner} for i, c in enumerate(self.candidates)]


class Decoder:
    """Candidates for a prompt from an engine, ranked by the chosen scorer (built once)."""

    def __init__(self, engine, decoding: Decoding):
        self.engine, self.decoding = engine, decoding
        self._scorers: dict[str, object] = {}
        if decoding.searches:  # load a reverse model or discriminator now: fail before the first turn
            self.scorer(decoding)

    def scorer(self, d: Decoding):
        name = d.scorer_name
        if name not in self._scorers:
            self._scorers[name] = make_scorer(name, self.engine, mmi_model=d.mmi_model, mmi_weight=d.mmi_weight,
                                              discriminator=d.discriminator)
        return self._scorers[name]

    def candidates(self, prompt: list[int], context, s: Sampling, d: Decoding | None = None
                   ) -> tuple[list[Candidate], int]:
        """(candidates, index of the winner) for the prompt rendered from `context`."""
        d = d or self.decoding
        eng = self.engine
        s, stop_ids = eng.stops(s)
        if d.candidates == "sample":
            cands = sample_replies(eng.model, prompt, d.num_candidates, s, stop_ids, eng.tokenizer)
        else:
            settings = beam_settings(s, d)
            segments = [eng.tokenizer.encode_text(m.content) for m in context if m.role != "system"]
            grammar = None if s.constraint is None else (
                lambda vocab: Matcher(s.constraint, eng.tokenizer, vocab, stop_ids))
            cands = beam_search(eng.model, prompt, settings, stop_ids, context=segments or [prompt], grammar=grammar)
            for c in cands:
                c.text = reply_text(eng.tokenizer, c.tokens, s.stop)[0]
        return cands, rerank(self.scorer(d), context, cands)

    def reply(self, prompt: list[int], context, s: Sampling, d: Decoding | None = None, on_finish=None) -> Reply:
        return Reply(lambda: self.candidates(prompt, context, s, d), on_finish)


def beam_settings(s: Sampling, d: Decoding) -> BeamSettings:
    return BeamSettings(beam_size=max(d.beam_size, d.num_candidates), max_new_tokens=s.max_new_tokens,
                        min_new_tokens=min(d.min_new_tokens, s.max_new_tokens), length_penalty=d.length_penalty,
                        early_stopping=d.early_stopping, no_repeat_ngram=s.no_repeat_ngram,
                        block_context_ngram=d.block_context_ngram, repetition_penalty=s.repetition_penalty,
                        penalty_window=s.penalty_window, logit_bias=s.logit_bias)


def format_candidates(reply: Reply) -> str:
    """One line per candidate: a star on the winner, every score, the text."""
    lines = []
    for i, c in enumerate(reply.candidates):
        scores = " ".join(f"{k}={v:.3f}" for k, v in c.scores.items())
        mark = "*" if i == reply.winner else " "
        lines.append(f"{mark}[{i + 1}] {scores} ({c.finish_reason}) {c.text!r}")
    return "\n".join(lines)
