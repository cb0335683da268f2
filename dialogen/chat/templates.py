"""Chat templates: a conversation -> (token ids, assistant mask), as the model was trained to see it.

Every template is Jinja source, the built-in ones and a model's own alike, rendered in a sandbox
like transformers' `apply_chat_template`: the real text with the contents in it (so `trim` and
`.strip()` act on them), tokenized as one string. A second rendering with a placeholder for each
content gives the template's own text; matching the two gives each content's character span.
The spans are what the mask and the injection guard use: no control token may come from inside a
content (`Tokenizer.encode_chat`), so a user who types `<|im_end|>` gets those characters.

Mask rule: the tokens of a trained message's content are on, and so is the template text after
it up to and including the end-of-turn marker, so the model learns to stop. A token that spans
template text and content (` Hello` after `[/INST]`) counts as the content's.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache

from jinja2 import TemplateError, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import UserError
from .messages import Message

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA2 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set sys = messages[0]['content'] %}{% set msgs = messages[1:] %}"
    "{% else %}{% set sys = none %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}{% if m['role'] == 'assistant' %}{{ ' ' + m['content'] + '</s>' }}"
    "{% else %}{{ '<s>[INST] ' }}{% if loop.first and sys is not none %}"
    "{{ '<<SYS>>\\n' + sys + '\\n<</SYS>>\\n\\n' }}{% endif %}{{ m['content'] + ' [/INST]' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{% endif %}"
)
DIALOGPT = "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"

# name -> (Jinja source or None for the model's own, end-of-turn marker or None for "find it")
TEMPLATES = {
    "chatml": (CHATML, "<|im_end|>"),
    "llama2": (LLAMA2, "</s>"),
    "dialogpt": (DIALOGPT, None),
    "jinja": (None, None),
}

_OPEN, _CLOSE = "\ue000", "\ue001"
_SLOT = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def _raise(msg):
    raise TemplateError(msg)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text in some templates): the body as is."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with its attribute verdicts remembered: each depends only on the
    object's type and the attribute's name, and rendering asks for the same few many times."""
    _verdicts: dict = {}

    def is_safe_attribute(self, obj, attr, value):
        key = (type(obj), attr)
        ok = self._verdicts.get(key)
        if ok is None:
            ok = self._verdicts[key] = super().is_safe_attribute(obj, attr, value)
        return ok


@lru_cache(maxsize=16)
def _compile(source: str):
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise UserError(f"chat template does not compile: {e}") from None


def _trims(content: str) -> list[str]:
    """What a template may make of a content: itself or trimmed (`trim`, `.strip()` and kin)."""
    out = []
    for x in (content, content.strip(), content.lstrip(), content.rstrip()):
        if x not in out:
            out.append(x)
    return out


def _align(text: str, pieces: list[str], contents: list[str]) -> list[tuple[int, int, int]] | None:
    """Content spans (start, end, message index) such that `text` is the template's own text
    (`pieces[0::2]`) with each slot (`pieces[1::2]`) filled by its content, possibly trimmed.
    None when no such filling exists (the template's text depends on the contents)."""
    frame, slots = pieces[0::2], [int(i) for i in pieces[1::2]]
    if len(text) == sum(map(len, frame)) + sum(len(contents[i]) for i in slots):  # likely: contents as they are
        spans, pos = [], len(frame[0])
        for k, i in enumerate(slots):
            spans.append((pos, pos + len(contents[i]), i))
            pos += len(contents[i]) + len(frame[k + 1])
        if "".join(x for k, i in enumerate(slots) for x in (frame[k], contents[i])) + frame[-1] == text:
            return spans
    if not text.startswith(frame[0]):
        return None
    stack = [(0, len(frame[0]), 0)]  # (slot, position in text, next candidate), depth-first
    chosen: list[tuple[int, int, int]] = []
    dead: set[tuple[int, int]] = set()
    while stack:
        k, pos, c = stack.pop()
        del chosen[k:]
        if k == len(slots):
            if pos == len(text):
                return chosen
            continue
        cands = _trims(contents[slots[k]])
        if c >= len(cands) or (k, pos) in dead:
            dead.add((k, pos))
            continue
        stack.append((k, pos, c + 1))
        x, after = cands[c], frame[k + 1]
        end = pos + len(x)
        if text.startswith(x, pos) and text.startswith(after, end):
            chosen.append((pos, end, slots[k]))
            stack.append((k + 1, end + len(after), 0))
    return None


@dataclass
class Template:
    name: str
    source: str
    end_of_turn: str
    _frames: dict = field(default_factory=dict, repr=False, compare=False)  # (roles, prompt) -> placeholder rendering

    def _render(self, tokenizer, messages: list[Message], contents: list[str], add_generation_prompt: bool) -> str:
        data = [{"role": m.role, "content": c} for m, c in zip(messages, contents)]
        tokens = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or "",
                  "pad_token": tokenizer.pad_token or ""}
        try:
            return _compile(self.source).render(messages=data, add_generation_prompt=add_generation_prompt,
                                                tools=None, documents=None, **tokens)
        except Exception as e:  # a template is data: whatever it raises is the template's error
            raise UserError(f"chat template {self.name!r} failed: {e}") from None

    def layout(self, tokenizer, messages: list[Message],
               add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int, int]]]:
        """The rendered text and each content's character span (start, end, message index), in
        text order. A template whose own text depends on the contents (or that changes them
        beyond trimming) gets its placeholder rendering with the contents spliced in whole."""
        key = (tuple(m.role for m in messages), add_generation_prompt, tokenizer.bos_token, tokenizer.eos_token)
        contents = [m.content for m in messages]
        text = self._render(tokenizer, messages, contents, add_generation_prompt)
        pieces = self._frames.get(key)
        spans = None if pieces is None else _align(text, pieces, contents)
        if spans is None:  # no kept frame, or a stale one (a template that prints today's date)
            slots = [f"{_OPEN}{i}{_CLOSE}" for i in range(len(messages))]
            pieces = _SLOT.split(self._render(tokenizer, messages, slots, add_generation_prompt))
            if len(self._frames) > 4096:
                self._frames.clear()
            self._frames[key] = pieces
            spans = _align(text, pieces, contents)
        if spans is None:
            text, spans = pieces[0], []
            for k in range(1, len(pieces), 2):
                i = int(pieces[k])
                spans.append((len(text), len(text) + len(contents[i]), i))
                text += contents[i] + pieces[k + 1]
        return text, spans

    def render(self, tokenizer, messages: list[Message], add_generation_prompt: bool = False,
               train_roles=("assistant",), trained: list[bool] | None = None,
               continue_final: bool = False) -> tuple[list[int], list[int]]:
        """(ids, mask): mask[i] is 1 where token i is one the model is trained to produce.

        The trained messages are those whose role is in `train_roles`, or, when given, those whose
        flag in `trained` (one per message) is true. With `continue_final` (transformers'
        `continue_final_message`), the text ends right after the final message's content, so the
        reply extends it instead of starting a new turn.
        """
        if trained is None:
            trained = [m.role in train_roles for m in messages]
        text, spans = self.layout(tokenizer, messages, add_generation_prompt and not continue_final)
        if continue_final:
            text, spans = _cut_after_final(text, spans, len(messages) - 1)
        ids, offsets = tokenizer.encode_chat(text, [(a, b) for a, b, _ in spans])
        regions = self._trained_regions(text, spans, trained)
        return ids, _mask(offsets, regions)

    def _trained_regions(self, text: str, spans, trained: list[bool]) -> list[tuple[int, int]]:
        """Character ranges trained: a trained content and its end-of-turn marker, in text order."""
        eot = self.end_of_turn
        out = []
        for j, (a, b, i) in enumerate(spans):
            if not trained[i]:
                continue
            nxt = spans[j + 1][0] if j + 1 < len(spans) else len(text)
            cut = text.find(eot, b, nxt) if eot else -1
            out.append((a, b if cut < 0 else cut + len(eot)))
        return out

    def stop_ids(self, tokenizer) -> set[int]:
        ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
        eot = tokenizer.encode_template(self.end_of_turn)
        if len(eot) == 1:
            ids.add(eot[0])
        return ids

    def stop_strings(self, tokenizer) -> list[str]:
        """The end-of-turn marker, when the vocabulary has no single token for it."""
        return [] if len(tokenizer.encode_template(self.end_of_turn)) == 1 else [self.end_of_turn]

    def stop_meta(self, tokenizer) -> dict:
        """Where a reply ends, for a checkpoint's dialogen.json (and its generation_config.json)."""
        return {"stop_ids": sorted(self.stop_ids(tokenizer)), "stop_strings": self.stop_strings(tokenizer)}


def _cut_after_final(text: str, spans, last: int):
    """The text up to the end of message `last`'s content, and the spans within it."""
    end = max((b for a, b, i in spans if i == last), default=None)
    if end is None:
        raise UserError("the final message to continue does not appear in the rendered conversation "
                        "(the chat template leaves it out, or it is empty)")
    return text[:end], [sp for sp in spans if sp[1] <= end]


def _mask(offsets: list[tuple[int, int]], regions: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters overlap a region; both lists in text order."""
    mask = [0] * len(offsets)
    if not regions:
        return mask
    starts = [s for s, _ in offsets]
    ends = [max(e, s + 1) for s, e in offsets]  # an empty token counts as its position's character
    for rs, re_ in regions:
        first, last = bisect_right(ends, rs), bisect_left(starts, re_)
        mask[first:last] = [1] * max(0, last - first)
    return mask


def get_template(name: str, tokenizer) -> Template:
    if name not in TEMPLATES:
        raise UserError(f"unknown template {name!r}; known templates: {', '.join(TEMPLATES)}")
    source, eot = TEMPLATES[name]
    if source is None:
        source = tokenizer.chat_template
        if not source:
            raise UserError("template 'jinja' needs a chat template in the model; this model has none "
                            f"(choose one of: {', '.join(n for n in TEMPLATES if n != 'jinja')})")
    tpl = Template(name, source, eot or tokenizer.eos_token or "")
    if eot is None:
        tpl.end_of_turn = _find_end_of_turn(tpl, tokenizer)
    return tpl


def _find_end_of_turn(tpl: Template, tokenizer) -> str:
    """The special token a template writes right after an assistant's content."""
    msgs = [Message("user", "u"), Message("assistant", "a")]
    text = tpl._render(tokenizer, msgs, [f"{_OPEN}{i}{_CLOSE}" for i in range(2)], False)
    after = text.split(f"{_OPEN}1{_CLOSE}", 1)[-1].lstrip()
    specials = sorted(tokenizer.control_ids, key=len, reverse=True)
    return next((s for s in specials if after.startswith(s)), tokenizer.eos_token or "")


def default_template_name(meta: dict, tokenizer, arch: str) -> str:
    if meta.get("template") in TEMPLATES and (meta["template"] != "jinja" or tokenizer.chat_template):
        return meta["template"]
    if tokenizer.chat_template:
        return "jinja"
    if "<|im_start|>" in tokenizer.control_ids:
        return "chatml"
    return "dialogpt" if arch == "gpt2" else "chatml"
