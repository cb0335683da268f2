"""Chat templates: a conversation -> (token ids, assistant mask).

Every template is Jinja source, the built-in ones and a model's own alike, rendered in a
sandbox. Message contents never pass through the template: each is replaced by a private-use
placeholder, the rendered text is split at the placeholders, template text is encoded with its
special tokens and contents are encoded as plain text. So a user who types `<|im_end|>` gets
those characters, and the mask knows exactly which tokens came from which message.

Mask rule: the tokens of a trained message's content are on, and so is the template text after
it up to and including the end-of-turn marker, so the model learns to stop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from jinja2 import TemplateError
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
    "{% if add_generation_prompt %}{{ ' ' }}{% endif %}"
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


@lru_cache(maxsize=16)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise UserError(f"chat template does not compile: {e}") from None


@dataclass
class Template:
    name: str
    source: str
    end_of_turn: str

    def _render_text(self, tokenizer, messages: list[Message], add_generation_prompt: bool) -> str:
        slots = [{"role": m.role, "content": f"{_OPEN}{i}{_CLOSE}"} for i, m in enumerate(messages)]
        try:
            return _compile(self.source).render(
                messages=slots, add_generation_prompt=add_generation_prompt,
                bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "", tools=None)
        except TemplateError as e:
            raise UserError(f"chat template {self.name!r} failed: {e}") from None

    def render(self, tokenizer, messages: list[Message], add_generation_prompt: bool = False,
               train_roles=("assistant",), trained: list[bool] | None = None) -> tuple[list[int], list[int]]:
        """(ids, mask): mask[i] is 1 where token i is one the model is trained to produce.

        The trained messages are those whose role is in `train_roles`, or, when given, those whose
        flag in `trained` (one per message) is true.
        """
        if trained is None:
            trained = [m.role in train_roles for m in messages]
        text = self._render_text(tokenizer, messages, add_generation_prompt)
        ids: list[int] = []
        mask: list[int] = []
        pieces = _SLOT.split(text)  # template text, index, template text, index, ...
        trained_turn_open = False
        for k, piece in enumerate(pieces):
            if k % 2:  # a message's content
                i = int(piece)
                toks = tokenizer.encode_text(messages[i].content)
                trained_turn_open = trained[i]
                ids += toks
                mask += [int(trained_turn_open)] * len(toks)
                continue
            if trained_turn_open and self.end_of_turn in piece:
                cut = piece.index(self.end_of_turn) + len(self.end_of_turn)
                head = tokenizer.encode_template(piece[:cut])
                ids += head
                mask += [1] * len(head)
                piece = piece[cut:]
            trained_turn_open = False
            toks = tokenizer.encode_template(piece)
            ids += toks
            mask += [0] * len(toks)
        return ids, mask

    def stop_ids(self, tokenizer) -> set[int]:
        ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
        eot = tokenizer.encode_template(self.end_of_turn)
        if len(eot) == 1:
            ids.add(eot[0])
        return ids

    def stop_strings(self, tokenizer) -> list[str]:
        """The end-of-turn marker, when the vocabulary has no single token for it."""
        return [] if len(tokenizer.encode_template(self.end_of_turn)) == 1 else [self.end_of_turn]


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
    text = tpl._render_text(tokenizer, [Message("user", "u"), Message("assistant", "a")], False)
    after = text.split(f"{_OPEN}1{_CLOSE}", 1)[-1].lstrip()
    specials = sorted(tokenizer.special_ids, key=len, reverse=True)
    return next((s for s in specials if after.startswith(s)), tokenizer.eos_token or "")


def default_template_name(meta: dict, tokenizer, arch: str) -> str:
    if meta.get("template") in TEMPLATES and (meta["template"] != "jinja" or tokenizer.chat_template):
        return meta["template"]
    if tokenizer.chat_template:
        return "jinja"
    if "<|im_start|>" in tokenizer.special_ids:
        return "chatml"
    return "dialogpt" if arch == "gpt2" else "chatml"
