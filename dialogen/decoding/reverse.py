"""Backward examples for a reverse model P(context | reply), as in DialoGPT's MMI reranking.

The exact format. For context turns c_1 .. c_n (oldest first; system messages left out) and a
reply r, the reverse example is the conversation

    [user: r, assistant: c_n, user: c_(n-1), assistant: c_(n-2), ...]

(the reply first, then the context turns newest first, roles alternating) rendered with the
model's chat template. The reply is not trained; every context turn is (its content and its
end-of-turn token). Only the newest `REVERSE_CONTEXT_TURNS` context turns are used, and older
ones are dropped first when the example exceeds `max_len`. The sum of the log-probabilities of
the masked tokens under the reverse model is log P(context | reply): the MMI score.

Training (`dialogen train --reverse`) makes one such example for every trained reply of a
conversation with the context turns before it, and records `{"reverse": {"context_turns": K}}`
in the checkpoint's dialogen.json.
"""

from __future__ import annotations

from ..chat.messages import Message
from ..chat.templates import Template

REVERSE_CONTEXT_TURNS = 3


def reverse_messages(context: list[Message], reply_text: str, max_turns: int) -> list[Message]:
    turns = [m.content for m in context if m.role != "system"][-max_turns:] if max_turns > 0 else []
    out = [Message("user", reply_text)]
    for i, text in enumerate(reversed(turns)):
        out.append(Message("assistant" if i % 2 == 0 else "user", text))
    return out


def reverse_example_ids(tokenizer, template: Template, context_messages: list[Message], reply_text: str,
                        max_turns: int = REVERSE_CONTEXT_TURNS, max_len: int | None = None
                        ) -> tuple[list[int], list[int]]:
    """(ids, mask) of the backward example; mask marks the context tokens to score."""
    ids, mask, _ = _fit(tokenizer, template, context_messages, reply_text, max_turns, max_len)
    return ids, mask


def _fit(tokenizer, template, context, reply_text, max_turns, max_len):
    """(ids, mask, cut inside a turn): drop the oldest context turns until it fits."""
    n = min(max_turns, sum(1 for m in context if m.role != "system"))
    while True:
        msgs = reverse_messages(context, reply_text, n)
        ids, mask = template.render(tokenizer, msgs, trained=[False] + [True] * (len(msgs) - 1))
        if max_len is None or len(ids) <= max_len:
            return ids, mask, False
        if n <= 1:
            return ids[:max_len], mask[:max_len], True
        n -= 1


def reverse_examples(tokenizer, template: Template, conversation: list[Message], flags: list[bool],
                     max_len: int, max_turns: int = REVERSE_CONTEXT_TURNS):
    """One backward example per trained reply that has context; and how many were cut."""
    out, cut = [], 0
    for i, (m, on) in enumerate(zip(conversation, flags)):
        context = [c for c in conversation[:i] if c.role != "system"]
        if not on or not context:
            continue
        ids, mask, was_cut = _fit(tokenizer, template, context, m.content, max_turns, max_len)
        cut += int(was_cut)
        if any(mask):
            out.append((ids, mask))
    return out, cut
