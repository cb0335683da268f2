"""A conversation with a model: history, persona, a token budget, and a KV cache kept across turns.

Each turn renders the whole conversation, then feeds the model only the tokens after the
longest prefix it has already seen, so a turn costs its new tokens, not the history. When the
history outgrows the budget, the oldest whole turns go (never the persona, never the newest user
turn), down to three quarters of the budget so the next turns reuse the cache again.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..decoding.engine import Engine, load_engine  # noqa: F401 (load_engine: callers import it from here)
from ..decoding.generate import Generation
from ..decoding.settings import Sampling
from ..errors import UserError
from ..paths import write_text
from ..textio import load_json, read_file
from .messages import Message, parse_messages


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Session:
    def __init__(self, engine: Engine, system: str | None = None, sampling: Sampling | None = None,
                 max_context_tokens: int | None = None):
        self.engine = engine
        self.system = system or None
        self.sampling = sampling or Sampling()
        # by default the prompt gets what the reply limit leaves, and at least half the context: a
        # reply limit as long as the context (a small model's) is then cut at the end of the context
        budget = max(engine.context_length - self.sampling.max_new_tokens, engine.context_length // 2)
        self.max_context_tokens = max_context_tokens or budget
        if self.max_context_tokens < 1 or self.max_context_tokens > engine.context_length:
            raise UserError(f"--max-context-tokens must be in 1..{engine.context_length}, got {self.max_context_tokens}")
        self.messages: list[Message] = []
        self.tools: list[dict] | None = None  # the tools offered (OpenAI's shape), shown by the template
        self.tool_functions: dict = {}  # name -> the Python function that runs it (`chat/toolchat.py`)
        self.tool_choice = "auto"  # "auto", "required" or "none" (`chat/toolchat.py:offer_tools`)
        self.window_start = 0  # index of the oldest message still in the prompt
        self.cache = engine.model.new_cache(1)
        self.cache_ids: list[int] = []
        self.min_feed = 1  # prompt tokens fed anew each turn even when the cache holds them

    # --- conversation state ---------------------------------------------------------------
    def reset(self, messages=()):
        """Start over (from `messages`), the persona kept; the KV cache stays for reuse."""
        self.messages, self.window_start = list(messages), 0

    def share_cache(self, other: "Session"):
        """Start from a copy of `other`'s KV cache (a conversation that shares its prefix)."""
        self.cache, self.cache_ids = other.cache.copy(), list(other.cache_ids)

    def keep_cache(self, tokens: int):
        """Keep only the first `tokens` of the KV cache (e.g. a prompt's, without its reply)."""
        self.cache.truncate(tokens)
        self.cache_ids = self.cache_ids[:tokens]

    def set_persona(self, text: str | None):
        self.system = text or None

    def conversation(self) -> list[Message]:
        head = [Message("system", self.system)] if self.system else []
        return head + self.messages[self.window_start:]

    def prompt_ids(self) -> list[int]:
        """Render the prompt for the next reply, dropping the oldest turns if over budget. When the
        last message is the assistant's (a prefill), the reply continues it."""
        eng = self.engine
        cont = self.continues

        def render():
            return eng.template.render(eng.tokenizer, self.conversation(), add_generation_prompt=True,
                                       continue_final=cont, tools=self.tools)[0]

        ids = render()
        if len(ids) <= self.max_context_tokens:
            return ids
        target = self.max_context_tokens * 3 // 4
        while len(ids) > target:
            # the next whole turn: a user message and the replies after it
            nxt = next((i for i in range(self.window_start + 1, len(self.messages))
                        if self.messages[i].role == "user"), None)
            if nxt is None:
                break
            self.window_start = nxt
            ids = render()
        if len(ids) > self.max_context_tokens:
            raise UserError(f"the message does not fit: the prompt needs {len(ids)} tokens, "
                            f"the budget is {self.max_context_tokens} (--max-context-tokens)")
        return ids

    @property
    def continues(self) -> bool:
        """True when the conversation ends with an assistant message the next reply extends."""
        return bool(self.messages) and self.messages[-1].role == "assistant"

    # --- a turn ---------------------------------------------------------------------------
    def send(self, user_text: str, **overrides) -> Generation:
        """Add a user turn and return the reply's Generation (iterate it to stream)."""
        sampling = self.sampling.replace(**overrides)
        return self._generate(self.user_turn(user_text), sampling)

    def respond(self, **overrides) -> Generation:
        """The reply to the conversation as it stands: after tool results, a new assistant turn; after
        an assistant message (a prefill such as "Sure, here is"), its continuation, the Generation
        holding the new text only (when it ends, the message holds both)."""
        if not self.messages or self.messages[-1].role not in ("assistant", "tool"):
            raise UserError("nothing to respond to: the last message must be the assistant's or a tool's "
                            "(send a user turn with send())")
        return self._generate(self.prompt_ids(), self.sampling.replace(**overrides))

    def user_turn(self, text: str) -> list[int]:
        """Add a user turn and return the prompt of the reply to it (the turn is taken back if the
        prompt does not fit)."""
        self.messages.append(Message("user", text))
        try:
            return self.prompt_ids()
        except UserError:
            self.messages.pop()
            raise

    def _generate(self, ids: list[int], sampling: Sampling) -> Generation:
        eng = self.engine
        self.cache_ids = self.cache_ids[: self.cache.length]
        keep = min(common_prefix(self.cache_ids, ids), max(0, len(ids) - self.min_feed))
        if not eng.model.reuses_prefix:  # an encoder-decoder re-encodes the prompt
            keep = 0
        self.cache.truncate(keep)
        self.cache_ids = ids[:keep]
        sampling, stop_ids = eng.stops(sampling)

        prefill = self.messages[-1] if self.continues else None

        def finish(gen: Generation):
            self.cache_ids = (ids + gen.tokens)[: self.cache.length]
            if prefill is not None:
                self.messages[-1] = Message("assistant", prefill.content + gen.text)
            else:
                self.messages.append(Message("assistant", gen.text))

        return Generation(eng.model, eng.tokenizer, ids[keep:], self.cache, sampling, stop_ids, history=ids,
                          on_finish=finish)

    # --- files ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"system": self.system, "messages": [m.to_dict() for m in self.messages]}

    def save(self, path: str | Path):
        path = Path(path)
        try:
            write_text(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=1))
        except OSError as e:
            raise UserError(f"{path}: cannot write ({e.strerror})") from None

    def load(self, path: str | Path):
        path = Path(path)
        data = load_json(read_file(path), str(path))
        if isinstance(data, list):
            data = {"messages": data}
        if not isinstance(data, dict) or not isinstance(data.get("system", None), (str, type(None))):
            raise UserError(f"{path}: expected {{\"system\": ..., \"messages\": [...]}}")
        msgs = parse_messages(data.get("messages", []), f"{path}: messages")
        system = data.get("system")
        if msgs and msgs[0].role == "system":
            system, msgs = msgs[0].content, msgs[1:]
        self.system, self.messages, self.window_start = system, msgs, 0
