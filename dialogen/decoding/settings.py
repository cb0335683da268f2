"""The decode settings a user chooses, validated (errors name the flag), and their flags.

Torch-free, so that building the command line (`dialogen --help`) does not load torch.
`Sampling` drives one reply (temperature, top-k/p, penalties, length, seed, stops); `Decoding`
the search around it (beam, candidates, the reranker and its models).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import UserError
from ..textio import load_json, read_file

SCORER_NAMES = ("logprob", "mmi", "discriminator")  # the rerankers of `rerank.SCORERS`
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a signed 64-bit seed (torch takes any 64-bit value)
MAX_STOP_CHARS = 500_000  # all stop strings of one reply together, in characters
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs
MAX_BIAS = 100  # OpenAI's limit on a logit_bias value; -100 bans the token


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class SettingError(UserError):
    """A decode setting out of its range. `field` names it (the server's error `param`); the
    message names settings as flags, and `say(spell)` as another caller spells them."""

    def __init__(self, field: str, say):
        self.field, self.say = field, say
        super().__init__(say(flag))


CANDIDATE_SOURCES = ("beam", "sample")
# field -> (valid?, the rule): the one place a decode setting's range is written (Sampling, Decoding,
# beam.BeamSettings; the server's request schema has the same bounds in pydantic's words)
RULES = {
    "logprobs": (lambda v: v is None or 0 <= v <= MAX_TOP_LOGPROBS, f"in 0..{MAX_TOP_LOGPROBS}"),
    "temperature": (lambda v: v >= 0, ">= 0"),
    "top_k": (lambda v: v >= 0, ">= 0"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "> 0"),
    "frequency_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2] (negative: favour repeats)"),
    "presence_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2] (negative: favour repeats)"),
    "no_repeat_ngram": (lambda v: v >= 0, ">= 0"),
    "max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "seed": (lambda v: v is None or SEED_MIN <= v <= SEED_MAX, "in [-2**63, 2**63 - 1]"),
    "beam_size": (lambda v: v >= 1, ">= 1"),
    "num_candidates": (lambda v: v >= 1, ">= 1"),
    "min_new_tokens": (lambda v: v >= 0, ">= 0"),
    "block_context_ngram": (lambda v: v >= 0, ">= 0"),
    "mmi_weight": (lambda v: v >= 0, ">= 0"),
    "candidates": (lambda v: v in CANDIDATE_SOURCES, f"one of {', '.join(CANDIDATE_SOURCES)}"),
    "scorer": (lambda v: v is None or v in SCORER_NAMES, f"one of {', '.join(SCORER_NAMES)}"),
    "logit_bias": (lambda v: isinstance(v, dict) and all(
        isinstance(k, int) and not isinstance(k, bool) and k >= 0 and isinstance(x, (int, float))
        and not isinstance(x, bool) and -MAX_BIAS <= x <= MAX_BIAS for k, x in v.items()),
        f"a map of token ids (>= 0) to biases in [-{MAX_BIAS}, {MAX_BIAS}]"),
}


def check(settings):
    """A SettingError for the first field of `settings` (a dataclass) outside its rule in RULES."""
    for f in dataclasses.fields(settings):
        ok, rule = RULES.get(f.name, (None, None))
        value = getattr(settings, f.name)
        if ok is not None and not ok(value):
            raise SettingError(f.name, lambda spell, n=f.name: f"{spell(n)} must be {rule}, got {value!r}")  # noqa: B023 (raised)


@dataclass
class Sampling:
    temperature: float = 0.3  # 0 -> greedy
    top_k: int = 40  # 0 -> off
    top_p: float = 0.9  # 1 -> off
    repetition_penalty: float = 1.1  # 1 -> off; over the last `penalty_window` tokens
    frequency_penalty: float = 0.0  # in [-2, 2]: subtracted once per earlier occurrence in the reply
    presence_penalty: float = 0.0  # in [-2, 2]: subtracted once if the token occurred in the reply
    no_repeat_ngram: int = 0  # 0 -> off; never emit an n-gram that already occurred
    penalty_window: int = 64
    max_new_tokens: int = 256
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None -> off; k -> each token's log-probability and the k most likely (<= 20)
    constraint: object | None = None  # a `constrain.Grammar` the reply must match (e.g. a JSON schema)
    logit_bias: dict = field(default_factory=dict)  # token id -> added to its logit, in [-100, 100]; -100 bans it

    def __post_init__(self):
        check(self)
        total = sum(len(s) for s in self.stop)
        if total > MAX_STOP_CHARS:
            raise SettingError("stop", lambda spell: f"{spell('stop')}: the stop strings are {total} characters in all; "
                                                     f"the limit is {MAX_STOP_CHARS}")

    def replace(self, **changes) -> "Sampling":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def check_token_ids(bias: dict, vocab_size: int, spell=flag):
    """A SettingError when a logit_bias key is not a token of a vocabulary of `vocab_size`."""
    bad = next((k for k in bias if k >= vocab_size), None)
    if bad is not None:
        raise SettingError("logit_bias", lambda sp: f"{sp('logit_bias')}: token id {bad} is not in the vocabulary "
                                                    f"(0..{vocab_size - 1})")


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
        check(self)
        if self.candidates == "sample" and self.beam_size > 1:
            raise SettingError("candidates", lambda spell: f"{spell('candidates')} sample draws samples; it does not "
                                                           f"combine with {spell('beam_size')} > 1")

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
    g.add_argument("--scorer", choices=list(SCORER_NAMES), default=None,
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


def add_sampling_args(p):
    d = Sampling()
    g = p.add_argument_group("decoding")
    g.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=d.top_k, help="keep the k most likely tokens; 0 = off (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass in (0, 1] (default: %(default)s)")
    g.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help="> 1 discourages tokens seen in the last 64 tokens; 1 = off (default: %(default)s)")
    g.add_argument("--frequency-penalty", type=float, default=d.frequency_penalty,
                   help="subtracted per earlier use of a token in the reply, -2 to 2; negative favours repeats "
                        "(default: %(default)s)")
    g.add_argument("--presence-penalty", type=float, default=d.presence_penalty,
                   help="subtracted once if a token was used in the reply, -2 to 2 (default: %(default)s)")
    g.add_argument("--no-repeat-ngram", type=int, default=d.no_repeat_ngram,
                   help="never repeat an n-gram of this size within a reply; 0 = off (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="reply length limit (default: %(default)s)")
    g.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--system", "--persona", dest="system", default=None,
                   help="persona: the system message, or a preset: virtual-assistant, friendly-chatbot, customer-service")
    g.add_argument("--max-context-tokens", type=int, default=None,
                   help="prompt budget; the oldest turns are dropped beyond it (default: model context - max new tokens, "
                        "and at least half the context)")


def add_constraint_args(p):
    g = p.add_argument_group("structured output")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--json-schema", metavar="FILE", default=None,
                   help="every reply is JSON matching this JSON schema (a token mask at each step; needs "
                        "pip install 'dialogen[json]')")
    x.add_argument("--json", dest="json_object", action="store_true", help="every reply is a JSON object")


def sampling_from(args) -> Sampling:
    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                    presence_penalty=args.presence_penalty, no_repeat_ngram=args.no_repeat_ngram,
                    max_new_tokens=args.max_new_tokens, seed=args.seed, stop=args.stop,
                    constraint=constraint_from(args))


def constraint_from(args):
    """The grammar of --json-schema FILE or --json (None without them)."""
    if not getattr(args, "json_schema", None) and not getattr(args, "json_object", False):
        return None  # (eval's own --json, for its output, is another flag)
    from .constrain import Grammar  # lazily: numpy and torch stay out of --help

    if args.json_object:
        return Grammar.json_object()
    try:
        return Grammar.json_schema(load_json(read_file(args.json_schema), args.json_schema))
    except UserError as e:
        msg = str(e)
        raise UserError(msg if msg.startswith(args.json_schema) else f"--json-schema {args.json_schema}: {msg}") from None
