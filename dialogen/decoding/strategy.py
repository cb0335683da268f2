"""Decoding beyond one sample: beam search and sample-and-rank, candidates scored by a reranker.

`Decoding` holds the choices (validated; errors name the flag), `Decoder` turns a prompt into a
`Reply` that carries every candidate with its scores and the index of the winner. A `Reply`
iterates like a `Generation` (it yields the winning text once), so the chat loop, the session
and the server treat both alike. With one beam and one candidate nothing is searched: callers
keep streaming a plain `Generation`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import UserError
from .batch import reply_text, sample_replies
from .beam import BeamSettings, Candidate, beam_search
from .generate import Stream
from .processors import Sampling
from .rerank import SCORERS, make_scorer, rerank

CANDIDATE_SOURCES = ("beam", "sample")


@dataclass
class Decoding:
    beam_size: int = 1
    length_penalty: float = 1.0
    min_new_tokens: int = 0
    early_stopping: bool = True
    block_context_ngram: int = 0
    num_candidates: int = 1
    candidates: str = "beam"  # where several candidates come from: the beam's n-best, or samples
    scorer: str | None = None  # None: mmi with an --mmi-model, discriminator with a --discriminator, else logprob
    mmi_model: str | None = None
    mmi_weight: float = 0.5
    discriminator: str | None = None

    def __post_init__(self):
        checks = [
            ("beam_size", self.beam_size >= 1, ">= 1"),
            ("num_candidates", self.num_candidates >= 1, ">= 1"),
            ("min_new_tokens", self.min_new_tokens >= 0, ">= 0"),
            ("block_context_ngram", self.block_context_ngram >= 0, ">= 0"),
            ("mmi_weight", self.mmi_weight >= 0, ">= 0"),
            ("candidates", self.candidates in CANDIDATE_SOURCES, f"one of {', '.join(CANDIDATE_SOURCES)}"),
            ("scorer", self.scorer is None or self.scorer in SCORERS, f"one of {', '.join(SCORERS)}"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise UserError(f"--{name.replace('_', '-')} must be {rule}, got {getattr(self, name)!r}")
        if self.candidates == "sample" and self.beam_size > 1:
            raise UserError("--candidates sample draws samples; it does not combine with --beam-size > 1")

    @property
    def scorer_name(self) -> str:
        if self.scorer:
            return self.scorer
        return "mmi" if self.mmi_model else "discriminator" if self.discriminator else "logprob"

    @property
    def searches(self) -> bool:
        """False when a plain streamed sample (or greedy reply) is all that is asked."""
        return self.beam_size > 1 or self.num_candidates > 1

    def replace(self, **changes) -> "Decoding":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
        stop_ids = eng.template.stop_ids(eng.tokenizer)
        s = s.replace(stop=s.stop + eng.template.stop_strings(eng.tokenizer))
        if d.candidates == "sample":
            cands = sample_replies(eng.model, prompt, d.num_candidates, s, stop_ids, eng.tokenizer)
        else:
            settings = beam_settings(s, d)
            segments = [eng.tokenizer.encode_text(m.content) for m in context if m.role != "system"]
            cands = beam_search(eng.model, prompt, settings, stop_ids, context=segments or [prompt])
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
                        penalty_window=s.penalty_window)


def format_candidates(reply: Reply) -> str:
    """One line per candidate: a star on the winner, every score, the text."""
    lines = []
    for i, c in enumerate(reply.candidates):
        scores = " ".join(f"{k}={v:.3f}" for k, v in c.scores.items())
        mark = "*" if i == reply.winner else " "
        lines.append(f"{mark}[{i + 1}] {scores} ({c.finish_reason}) {c.text!r}")
    return "\n".join(lines)


# --- the command-line edge -------------------------------------------------------------------
def add_decoding_args(p):
    d = Decoding()
    g = p.add_argument_group("search and reranking")
    g.add_argument("--beam-size", type=int, default=d.beam_size, help="beam search width; 1 = off (default: %(default)s)")
    g.add_argument("--length-penalty", type=float, default=d.length_penalty,
                   help="beam score = log-likelihood / length ** this; 0 = plain sum (default: %(default)s)")
    g.add_argument("--min-new-tokens", type=int, default=d.min_new_tokens, help="beam search: no stop before this many tokens")
    g.add_argument("--no-early-stopping", dest="early_stopping", action="store_false",
                   help="beam search: go on until no running beam can beat a finished one")
    g.add_argument("--block-context-ngram", type=int, default=d.block_context_ngram,
                   help="beam search: never repeat an n-gram of this size from the conversation; 0 = off")
    g.add_argument("--num-candidates", type=int, default=d.num_candidates,
                   help="generate this many candidate replies and keep the best by --scorer (default: %(default)s)")
    g.add_argument("--candidates", choices=CANDIDATE_SOURCES, default=d.candidates,
                   help="candidates from the beam's n-best or from independent samples (default: %(default)s)")
    g.add_argument("--scorer", choices=list(SCORERS), default=None,
                   help="reranker: logprob (length-normalised log-likelihood), mmi, discriminator "
                        "(default: mmi with --mmi-model, else logprob)")
    g.add_argument("--mmi-model", default=None, help="reverse model P(context | reply) for MMI reranking")
    g.add_argument("--mmi-weight", type=float, default=d.mmi_weight,
                   help="MMI score = log P(r|c)/|r| + this * log P(c|r)/|c| (default: %(default)s)")
    g.add_argument("--discriminator", default=None, help="discriminator checkpoint for --scorer discriminator")
    g.add_argument("--show-candidates", action="store_true", help="print every candidate with its scores and the winner")


def decoding_from(args, strict: bool = True) -> Decoding | None:
    """The search settings of a command that has them (None for one that does not).

    `strict`: search-only flags without a search are an error (not so where configs add one).
    """
    if not hasattr(args, "beam_size"):
        return None
    d = Decoding(beam_size=args.beam_size, length_penalty=args.length_penalty, min_new_tokens=args.min_new_tokens,
                 early_stopping=args.early_stopping, block_context_ngram=args.block_context_ngram,
                 num_candidates=args.num_candidates, candidates=args.candidates, scorer=args.scorer,
                 mmi_model=args.mmi_model, mmi_weight=args.mmi_weight, discriminator=args.discriminator)
    if strict and not d.searches and (args.scorer or args.mmi_model or args.discriminator or args.min_new_tokens
                           or args.block_context_ngram):
        raise UserError("--scorer, --mmi-model, --discriminator, --min-new-tokens and --block-context-ngram "
                        "act on a search: add --beam-size N or --num-candidates N")
    return d
