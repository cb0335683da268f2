"""Conversations -> training examples: token ids and labels (-100 where no loss is taken).

Which turns are trained (`train_on`):
- "assistant": the assistant's turns (the chat recipe);
- "both": every turn after the first, whoever speaks (DialoGPT's recipe for two-speaker chat).
A turn of weight 0 (weighted DialoGPT TSV) is never trained; system messages never are.

The mask of a trained turn covers its content and the template text after it up to and
including the end-of-turn token, so the model learns to stop (same rule as `Template.render`).

A conversation longer than `max_len` tokens is cut into windows at turn boundaries: each window
keeps the system message, starts as early as still fits (context), and trains the turns not yet
trained by an earlier window, so every trained turn is trained exactly once. A single turn that
does not fit even alone is cut at `max_len` (counted as a truncated window).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..chat.messages import Message
from ..chat.templates import Template
from ..decoding.reverse import reverse_examples

IGNORE_INDEX = -100
TRAIN_ON = ("assistant", "both")


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # ids where trained, IGNORE_INDEX elsewhere; same length as ids
    segments: list[int] | None = None  # a packed row: which joined example each token is of

    def trained(self) -> int:
        """Labels that get a loss: not one on the first token, which nothing before it predicts."""
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


@dataclass
class Stats:
    conversations: int = 0
    turns: int = 0
    trained_turns: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    windows: int = 0
    split_conversations: int = 0  # conversations cut into more than one window
    truncated: int = 0  # windows cut at max_len inside a turn

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def trained_flags(messages: list[Message], train_on: str = "assistant") -> list[bool]:
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    flags = []
    seen_turn = False
    for m in messages:
        if m.role in ("system", "tool"):  # a tool's result is the world's, not the model's
            flags.append(False)
            continue
        on = m.role == "assistant" if train_on == "assistant" else seen_turn
        seen_turn = True
        flags.append(on and getattr(m, "weight", 1.0) != 0)
    return flags


def render_turns(template: Template, tokenizer, messages: list[Message], trained: list[bool],
                 add_generation_prompt: bool = False, tools=None) -> tuple[list[int], list[int]]:
    """`Template.render` with the trained messages chosen one by one instead of by role."""
    return template.render(tokenizer, messages, add_generation_prompt, trained=trained, tools=tools)


def to_example(ids: list[int], mask: list[int]) -> Example:
    return Example(list(ids), [t if m else IGNORE_INDEX for t, m in zip(ids, mask)])


def _largest_fitting(lo: int, hi: int, fits) -> int | None:
    """Largest k in [lo, hi] with fits(k), for fits true up to some k and false after."""
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def windows(template: Template, tokenizer, messages: list[Message], trained: list[bool],
            max_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(ids, mask) windows of at most max_len tokens covering every trained turn once; and how
    many of them had to be cut inside a turn. A window's context (the turns before its first
    new trained turn) takes at most half of max_len, so windows overlap by at most that. The
    tools a `Conversation` offers are shown in every window."""
    tools = getattr(messages, "tools", None)
    full = render_turns(template, tokenizer, messages, trained, tools=tools)
    if len(full[0]) <= max_len:
        return [full], 0
    head = messages[:1] if messages[0].role == "system" else []
    body = list(zip(messages[len(head):], trained[len(head):]))
    n = len(body)

    def length(s: int, e: int) -> int:
        return len(render(s, e, e + 1)[0])

    def render(s: int, e: int, first: int):  # body[s..e], training targets from index `first` on
        msgs = head + [m for m, _ in body[s:e + 1]]
        flags = [False] * len(head) + [t and s + j >= first for j, (_, t) in enumerate(body[s:e + 1])]
        return render_turns(template, tokenizer, msgs, flags, tools=tools)

    out, cut = [], 0
    t = next((i for i, (_, on) in enumerate(body) if on), None)
    while t is not None:
        if length(t, t) > max_len:
            ids, mask = render(t, t, t)
            ids, mask, e = ids[:max_len], mask[:max_len], t
            cut += 1
        else:
            # k = t - s: the most context turns within half the budget
            back = _largest_fitting(0, t, lambda k: k == 0 or length(t - k, t) <= max_len // 2)  # noqa: B023 (called here)
            s = t - back
            if body[s][0].role == "assistant" and s < t:  # start on a user turn when possible
                s += 1
            e = _largest_fitting(t, n - 1, lambda k: length(s, k) <= max_len)  # noqa: B023 (called here)
            ids, mask = render(s, e, t)
        if any(mask):
            out.append((ids, mask))
        t = next((i for i in range(e + 1, n) if body[i][1]), None)
    return out, cut


class CachedTokenizer:
    """A tokenizer that remembers its encodings: windows render the same turns many times."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._text: dict[str, list[int]] = {}
        self._template: dict[str, list[int]] = {}

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def encode_text(self, text: str) -> list[int]:
        ids = self._text.get(text)
        if ids is None:
            ids = self._text[text] = self.tokenizer.encode_text(text)
        return ids

    def encode_template(self, text: str) -> list[int]:
        ids = self._template.get(text)
        if ids is None:
            ids = self._template[text] = self.tokenizer.encode_template(text)
        return ids


def build_examples(conversations: list[list[Message]], tokenizer, template: Template, max_len: int,
                   train_on: str = "assistant", reverse: bool = False) -> tuple[list[Example], Stats]:
    """Every conversation rendered, windowed and labelled; with `reverse`, backward examples
    (see `dialogen.decoding.reverse`)."""
    stats = Stats()
    out: list[Example] = []
    tokenizer = tokenizer if isinstance(tokenizer, CachedTokenizer) else CachedTokenizer(tokenizer)
    for conv in conversations:
        flags = trained_flags(conv, train_on)
        stats.conversations += 1
        stats.turns += sum(1 for m in conv if m.role != "system")
        stats.trained_turns += sum(flags)
        if reverse:
            pieces, cut = reverse_examples(tokenizer, template, conv, flags, max_len)
        else:
            pieces, cut = windows(template, tokenizer, conv, flags, max_len)
        stats.truncated += cut
        stats.split_conversations += int(len(pieces) > 1 and not reverse)
        for ids, mask in pieces:
            ex = to_example(ids, mask)
            stats.windows += 1
            stats.tokens += len(ids)
            stats.trained_tokens += ex.trained()
            out.append(ex)
    return out, stats
