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
from .toolformat import calls_text, data_spans, merge_spans, response_text, style_of, tools_prompt

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
    """What a template may make of a content: itself, trimmed (`trim`, `.strip()` and kin), or
    written as a JSON string (`tojson`, the quotes being the template's)."""
    out = []
    for x in (content, content.strip(), content.lstrip(), content.rstrip(), json.dumps(content, ensure_ascii=False)[1:-1]):
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

    @property
    def tool_style(self) -> str:
        """How this template's model writes tool calls (`toolformat.style_of`)."""
        return style_of(self.source)

    def _render(self, tokenizer, messages: list[Message], contents: list, add_generation_prompt: bool,
                tools: list[dict] | None = None) -> str:
        data = [m.template_dict(c) for m, c in zip(messages, contents)]
        tokens = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or "",
                  "pad_token": tokenizer.pad_token or ""}
        try:
            return _compile(self.source).render(messages=data, add_generation_prompt=add_generation_prompt,
                                                tools=tools, documents=None, **tokens)
        except Exception as e:  # a template is data: whatever it raises is the template's error
            raise UserError(f"chat template {self.name!r} failed: {e}") from None

    def prepare(self, messages: list[Message], tools, trained=None):
        """(messages, tools, trained flags) as rendered: a template without tool support gets the
        generic format (`toolformat`), the tools in the system message and calls in contents."""
        if self.tool_style != "generic" or not (tools or any(m.tool_calls or m.role == "tool" for m in messages)):
            return messages, tools or None, trained
        out = [Message(m.role, m.content) for m in messages]
        for i, m in enumerate(messages):
            if m.tool_calls:
                calls = calls_text(m.tool_calls)
                out[i] = Message("assistant", f"{m.content}\n{calls}" if m.content else calls)
            elif m.role == "tool":
                out[i] = Message("user", response_text(m.content))
        if tools:
            if out and out[0].role == "system":
                out[0] = Message("system", f"{out[0].content}\n\n{tools_prompt(tools)}")
            else:
                out.insert(0, Message("system", tools_prompt(tools)))
                trained = None if trained is None else [False, *trained]
        return out, None, trained

    def layout(self, tokenizer, messages: list[Message], add_generation_prompt: bool = False,
               tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int, int]]]:
        """The rendered text and each content's character span (start, end, message index), in
        text order. A template whose own text depends on the contents (or that changes them
        beyond trimming) gets its placeholder rendering with the contents spliced in whole.
        (Messages as given: `render` applies the generic tool format first.)"""
        key = (tuple(m.role for m in messages), add_generation_prompt, tokenizer.bos_token, tokenizer.eos_token)
        contents = _contents(messages)
        if tools or any(m.tool_calls or m.tool_call_id for m in messages):  # the frame depends on them too
            key += (json.dumps([tools, [(m.tool_calls, m.tool_call_id, m.name, c is None)
                                        for m, c in zip(messages, contents)]], sort_keys=True),)
        text = self._render(tokenizer, messages, contents, add_generation_prompt, tools)
        pieces = self._frames.get(key)
        spans = None if pieces is None else _align(text, pieces, contents)
        if spans is None:  # no kept frame, or a stale one (a template that prints today's date)
            slots = [None if c is None else f"{_OPEN}{i}{_CLOSE}" for i, c in enumerate(contents)]
            pieces = _SLOT.split(self._render(tokenizer, messages, slots, add_generation_prompt, tools))
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
               continue_final: bool = False, tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
        """(ids, mask): mask[i] is 1 where token i is one the model is trained to produce.

        The trained messages are those whose role is in `train_roles`, or, when given, those whose
        flag in `trained` (one per message) is true; an assistant's tool calls are trained with it,
        tool results and the tool list never. With `continue_final` (transformers'
        `continue_final_message`), the text ends right after the final message's content, so the
        reply extends it instead of starting a new turn. `tools` are passed to the template as
        transformers' `apply_chat_template(tools=...)` does.
        """
        if trained is None:
            trained = [m.role in train_roles for m in messages]
        messages, tools, trained = self.prepare(messages, tools, trained)
        gen = add_generation_prompt and not continue_final
        text, spans = self.layout(tokenizer, messages, gen, tools)
        calls = self._call_regions(tokenizer, text, messages, trained, tools, gen)
        if continue_final:
            text, spans = _cut_after_final(text, spans, len(messages) - 1)
        made = [m.tool_calls for m in messages if m.tool_calls]
        protected = merge_spans([(a, b) for a, b, _ in spans] + data_spans(text, made, tools, tokenizer.control_ids))
        ids, offsets = tokenizer.encode_chat(text, protected)
        regions = self._trained_regions(text, spans, trained)
        regions += calls
        return ids, _mask(offsets, sorted(regions))

    def _call_regions(self, tokenizer, text: str, messages: list[Message], trained, tools,
                      add_generation_prompt: bool) -> list[tuple[int, int]]:
        """The text of each trained assistant message with tool calls: where the rendering differs
        from one without that message, after the generation prompt, up to its end-of-turn marker."""
        out = []
        for i, m in enumerate(messages):
            if not (m.tool_calls and trained[i]):
                continue
            rest = messages[:i] + messages[i + 1:]
            try:
                other = self._render(tokenizer, rest, _contents(rest), add_generation_prompt, tools)
            except UserError:
                continue
            a = _common_prefix(text, other)
            b = len(text) - _common_prefix(text[a:][::-1], other[a:][::-1])
            prompt = self._generation_prompt(tokenizer, messages[:i], tools)
            at = text.find(prompt, max(0, a - len(prompt)), b) if prompt else -1
            if 0 <= at <= a:
                a = at + len(prompt)
            cut = text.find(self.end_of_turn, a, b + len(self.end_of_turn)) if self.end_of_turn else -1
            out.append((a, cut + len(self.end_of_turn) if cut >= 0 else b))
        return out

    def _generation_prompt(self, tokenizer, messages: list[Message], tools) -> str:
        """What the template adds for a reply after `messages` ("" when that cannot be told)."""
        try:
            on = self._render(tokenizer, messages, _contents(messages), True, tools)
            off = self._render(tokenizer, messages, _contents(messages), False, tools)
        except UserError:
            return ""
        return on[len(off):] if on.startswith(off) else ""

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


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _contents(messages: list[Message]) -> list:
    """Each message's content as the template gets it: None for an assistant's calls without text."""
    return [None if m.tool_calls and not m.content else m.content for m in messages]


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
    """The special token a template writes right after an assistant's content (a template that
    renders only with tools, such as Hermes-2-Pro's tool-use one, is asked with one)."""
    msgs = [Message("user", "u"), Message("assistant", "a")]
    slots = [f"{_OPEN}{i}{_CLOSE}" for i in range(2)]
    try:
        text = tpl._render(tokenizer, msgs, slots, False)
    except UserError:
        probe = {"type": "function", "function": {"name": "f", "description": "f",
                                                  "parameters": {"type": "object", "properties": {}}}}
        try:
            text = tpl._render(tokenizer, msgs, slots, False, [probe])
        except UserError:
            return tokenizer.eos_token or ""
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
