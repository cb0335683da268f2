"""Constrained decoding: the reply must match a grammar (a JSON schema, or any JSON object).

The grammar engine is llguidance (the Rust library behind guidance, also used by llama.cpp and
vLLM): it compiles a JSON schema to a context-free grammar, and at each step gives the set of
tokens that keep the text a prefix of a sentence of the grammar (docs/benchmarks.md has the
timings). Every other token gets -inf before sampling (or greedy, or a
beam's ranking), so the text always stays inside the grammar; the stop tokens are allowed only
where the grammar is complete, so a reply that stops is a whole sentence of it. JSON comes with
fixed separators (`", "`, `": "`) and no free whitespace: a model cannot loop on blank lines.

A token budget (max_tokens) would still cut a reply inside the grammar. So a matcher also knows
how to close: its closing path is a short way to a complete sentence by a fixed rule (at each
step the allowed token best at closing: `"` followed only by `}` and `]`, else only `}` and `]`,
else also `:` and spaces, else also `0`, else any; longer first), and the reply keeps the invariant "the closing
path fits in the tokens left": a sampled token after which it would not fit is replaced by the
first token of the closing path (`fit`). A reply that runs out of budget thus ends closed, e.g.
`{"city": "Lis"}`, instead of cut. Where the text is complete already (a grammar that accepts
free text, as the tools grammar's plain replies do), the budget may end the reply as it is. Beam
search, which ranks many tokens at once, gets only the closing token once the path needs all but a
margin of the tokens left (`allowed(left, margin)`).

`Grammar` is plain data (what `Sampling.constraint` holds); `Matcher` is one reply's position in
it, made for a tokenizer, a vocabulary size and the stop tokens. Needs `pip install llguidance`
(the `json` extra).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}  # no runs of blank lines


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise UserError("constrained decoding (a JSON schema) needs llguidance: pip install 'dialogen[json]'") from None
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """A JSON schema the reply must match (`{"type": "object"}`: any JSON object), as JSON text;
    or, with `lark`, a grammar in llguidance's Lark syntax (tool calls, `toolgrammar.py`)."""

    schema: str
    lark: bool = False

    @classmethod
    def json_schema(cls, schema) -> "Grammar":
        """From a schema (a dict, or its JSON text); a schema llguidance cannot use is a UserError."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise UserError(f"the JSON schema is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        if not isinstance(schema, (dict, bool)):
            raise UserError(f"a JSON schema must be an object, got {type(schema).__name__}")
        g = cls(json.dumps(schema, ensure_ascii=False))  # key order kept: properties come in schema order
        g.check()
        return g

    @classmethod
    def json_object(cls) -> "Grammar":
        return cls('{"type": "object"}')

    def compiled(self) -> str:
        llg = _llguidance()
        if self.lark:
            return llg.LLMatcher.grammar_from_lark(self.schema)
        return llg.LLMatcher.grammar_from_json_schema(self.schema, overrides=JSON_OPTIONS)

    def check(self):
        llg = _llguidance()
        try:
            error = llg.LLMatcher.validate_grammar(self.compiled())
        except ValueError as e:
            error = str(e)
        if error and not error.startswith("WARNING"):
            what = "grammar" if self.lark else "JSON schema"
            raise UserError(f"the {what} cannot be used: {error.splitlines()[0][:300]}")


# the closing classes, best first: (first bytes allowed, bytes allowed); inside a string `"` always
# wins (it closes it), so `]` as string content is never taken for a bracket
CLOSERS = ((b'"', b'"}]'), (b'}]', b'}]'), (b'"}]: ', b'"}]: '), (b'"}]: 0', b'"}]: 0'))
WATCH = 128  # the closing path is followed once the tokens left are this many or fewer


def _closing_rank(tokenizer, vocab_size: int) -> tuple[torch.Tensor, list[int]]:
    """((V,) int: how good each token is at closing a JSON text, lower is better (see the module doc);
    the tokens of the closing classes, not the "any" class, best first)."""
    cache = tokenizer.__dict__.setdefault("_closing_rank", {})
    if vocab_size not in cache:
        rank = torch.full((vocab_size,), 64 * len(CLOSERS) + 63, dtype=torch.int32)
        for i in range(min(vocab_size, tokenizer.vocab_size)):
            raw = tokenizer.token_bytes(i)
            if not raw:
                continue
            cls = next((k for k, (head, chars) in enumerate(CLOSERS)
                        if raw[0] in head and all(b in chars for b in raw)), len(CLOSERS))
            rank[i] = 64 * cls + 63 - min(len(raw), 63)
        picked = torch.nonzero(rank < 64 * len(CLOSERS)).flatten()
        cache[vocab_size] = rank, picked[torch.argsort(rank[picked], stable=True)].tolist()
    return cache[vocab_size]


def _engine_tokenizer(tokenizer, vocab_size: int, stop_ids: frozenset):
    """llguidance's view of `tokenizer` (built once per vocabulary size and stop set: it takes a while)."""
    cache = tokenizer.__dict__.setdefault("_llguidance", {})
    key = (vocab_size, stop_ids)
    if key not in cache:
        llg = _llguidance()
        cache[key] = llg.LLTokenizer(tokenizer.backend_json(), n_vocab=vocab_size, eos_token=sorted(stop_ids))
    return cache[key]


class Matcher:
    """Where one reply is in a grammar: which tokens may come next, and the token taken."""

    def __init__(self, grammar: Grammar, tokenizer, vocab_size: int, stop_ids, _matcher=None):
        self.grammar, self.tokenizer, self.vocab_size = grammar, tokenizer, vocab_size
        self.stop_ids = frozenset(stop_ids)
        if not self.stop_ids:
            raise UserError("constrained decoding needs a stop token (the template's end of turn, or EOS)")
        if _matcher is None:
            llg = _llguidance()
            _matcher = llg.LLMatcher(_engine_tokenizer(tokenizer, vocab_size, self.stop_ids), grammar.compiled(),
                                     log_level=0)
        self._m = _matcher
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self._stops = torch.tensor(sorted(self.stop_ids), dtype=torch.long)
        self._rank, self._order = _closing_rank(tokenizer, vocab_size)
        self._closing: tuple[int, int] | None = None  # (length, first token) of the closing path, when known
        self._last = b""  # the bytes of the last token taken
        self._raise_on_error()

    def _mask(self, m) -> torch.Tensor:
        m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if m.is_error():
            raise UserError(f"constrained decoding failed: {m.get_error()[:300]}")
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab_size]
        return torch.from_numpy(bits.astype(bool))

    def allowed(self, left: int | None = None, margin: int = 0) -> torch.Tensor:
        """(V,) bool: the tokens that keep the text within the grammar (stop tokens once it is complete).
        With `left` (tokens the reply may still have, this one included): only the closing path's
        token once that path needs more than `left - margin` of them."""
        mask = self._mask(self._m)
        self._closing = None
        if left is None or left > WATCH + margin:
            return mask
        self._closing = self._closing_path()
        length, first = self._closing
        if length + margin < left or length == 1:  # complete already: the budget may end it as it is
            return mask
        only = torch.zeros_like(mask)
        only[first] = True
        return only

    def fit(self, token: int, left: int) -> int:
        """`token`, or the closing path's first token if after `token` the path would not fit in the
        tokens then left (call after `allowed(left)`)."""
        if self._closing is None or token in self.stop_ids:
            return token
        if not self._m.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}, which its mask allowed")
        length = self._closing_path(self.tokenizer.token_bytes(token))[0]
        self._m.rollback(1)
        return token if length <= left - 1 or length == 1 else self._closing[1]

    def _numeric(self) -> torch.Tensor:
        """(V,) bool: tokens that would go on with a number (first byte a digit, `.`, `e`, `E`, `+`, `-`)."""
        cache = self.tokenizer.__dict__.setdefault("_numeric", {})
        if self.vocab_size not in cache:
            table = torch.zeros(self.vocab_size, dtype=torch.bool)
            for i in range(min(self.vocab_size, self.tokenizer.vocab_size)):
                raw = self.tokenizer.token_bytes(i)
                table[i] = bool(raw) and raw[:1] in b"0123456789.eE+-"
            cache[self.vocab_size] = table
        return cache[self.vocab_size]

    def _closing_path(self, after: bytes | None = None, limit: int = 256) -> tuple[int, int]:
        """(tokens to a complete sentence, the stop token included; its first token) from here.
        Walks the matcher along the path and rolls it back; each step tries the few closing tokens
        in order (`validate_tokens` costs microseconds), and computes a whole mask only when none fits."""
        order, numeric = self._order, self._numeric()
        first, n = None, 0
        last = self._last if after is None else after
        try:
            while n < limit and not self._m.is_accepting():
                digit = last[-1:].isdigit()  # after a digit, more digits would only lengthen the number
                tok = next((t for t in order if not (digit and numeric[t]) and self._m.validate_tokens([t]) == 1),
                           None)
                if tok is None:  # no closing character fits (an enum's letters, a required key): what the
                    forced = self._m.compute_ff_tokens()  # grammar forces, else the best allowed token
                    mask = self._mask(self._m) if not forced else None
                    if mask is not None and digit and bool((mask & ~numeric).any()):
                        mask &= ~numeric
                    tok = forced[0] if forced else int(torch.argmin(torch.where(
                        mask, self._rank, torch.iinfo(torch.int32).max)))
                if not self._m.consume_token(tok):
                    return limit + 1, first if first is not None else tok
                first = tok if first is None else first
                last = self.tokenizer.token_bytes(tok)
                n += 1
            if n == 0:  # complete already: the path is the stop token
                return 1, min(self.stop_ids)
            return n + 1, first
        finally:
            if n:
                self._m.rollback(n)

    def accept(self, token: int):
        if token in self.stop_ids:
            return
        self._last = self.tokenizer.token_bytes(token)
        if not self._m.consume_token(token):
            self._raise_on_error()
            raise RuntimeError(f"the grammar refused token {token}, which its mask allowed")

    @property
    def complete(self) -> bool:
        return self._m.is_accepting()

    def copy(self) -> "Matcher":
        """An independent matcher at the same place (a beam that splits)."""
        twin = Matcher(self.grammar, self.tokenizer, self.vocab_size, self.stop_ids, self._m.deep_copy())
        twin._last = self._last
        return twin

    def _raise_on_error(self):
        if self._m.is_error():
            raise UserError(f"constrained decoding failed: {self._m.get_error()[:300]}")


def matcher_for(s, tokenizer, vocab_size: int, stop_ids) -> Matcher | None:
    """The matcher for sampling settings `s` (None when they have no constraint)."""
    if s.constraint is None:
        return None
    return Matcher(s.constraint, tokenizer, vocab_size, stop_ids)
