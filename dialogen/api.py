"""The Python entry point: `dialogen.load(...)` -> a `ChatModel` that chats, streams, batches,
searches, scores and keeps sessions, on the same engine as the CLI and the server.

>>> import dialogen
>>> model = dialogen.load()                      # the embedded SmolLM2-135M-Instruct
>>> model.chat("What is the capital of France?", temperature=0)
'The capital of France is Paris.'

(The outputs shown are the default model's, greedy, 2 threads, on the machine this was written on;
near-ties can go the other way elsewhere.)

Messages are a string (one user turn), or a list of `{"role", "content"}` dicts (or `Message`s)
ending with the user's turn, optionally starting with a system message. A list that ends with an
assistant message is a prefill: the reply continues that message (transformers'
`continue_final_message`) and is the new text only. Sampling options are
`Sampling`'s fields as keywords: `temperature` (0 = greedy), `top_k`, `top_p`,
`repetition_penalty`, `frequency_penalty`, `presence_penalty`, `no_repeat_ngram`,
`max_new_tokens`, `seed`, `stop`, `logit_bias` ({token id: bias in [-100, 100]}, -100 bans).
Mistakes in them raise `dialogen.errors.UserError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from .chat.functions import call_function, function_tool
from .chat.messages import Message, parse_messages
from .chat.toolformat import openai_calls, parse_calls, parse_tools
from .chat.personas import resolve_persona
from .chat.ranked import RankedSession
from .chat.session import Engine, Session, load_engine
from .data import load_split
from .decoding.batch import generate_batch
from .decoding.settings import Decoding, Sampling, check_token_ids
from .decoding.toolgrammar import tool_grammar
from .errors import UserError
from .eval.perplexity import assistant_perplexity


def as_messages(messages, where: str = "messages") -> list[Message]:
    """A string (one user turn), a list of {"role", "content"} dicts or of Messages -> Messages."""
    if isinstance(messages, str):
        return [Message("user", messages)]
    if isinstance(messages, (list, tuple)) and all(isinstance(m, Message) for m in messages):
        return list(messages)
    return parse_messages(list(messages) if isinstance(messages, tuple) else messages, where)


def as_tools(tools) -> tuple[list[dict], dict]:
    """(OpenAI tool dicts, {name: Python function}) of a list of functions and tool dicts."""
    if callable(tools) or isinstance(tools, dict):
        tools = [tools]
    dicts = [function_tool(t) if callable(t) else t for t in tools]
    functions = {d["function"]["name"]: t for t, d in zip(tools, dicts) if callable(t)}
    return parse_tools(dicts), functions


class ChatModel:
    """A loaded model with its tokenizer and chat template (see `dialogen.load`)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._session: Session | None = None  # reused by chat/stream, so a growing chat reuses its KV cache

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def template(self) -> str:
        return self.engine.template.name

    def __repr__(self) -> str:
        return f"ChatModel({self.engine.name!r}, template={self.template!r})"

    # --- one reply --------------------------------------------------------------------------
    def _turn(self, messages, sampling: dict, session: Session | None = None, tools: list[dict] | None = None):
        msgs = as_messages(messages)
        if not msgs or msgs[-1].role not in ("user", "assistant", "tool"):
            raise UserError("messages: the last message must have role 'user' (or 'tool' after calls, or "
                            "'assistant', to continue it)")
        system = msgs[0].content if msgs[0].role == "system" else None
        history = msgs[1:] if system is not None else msgs
        if session is None:
            if self._session is None:
                self._session = Session(self.engine)
            session = self._session
        session.reset()
        session.set_persona(system)
        session.sampling = Sampling().replace(**sampling)
        session.tools = tools
        check_token_ids(session.sampling.logit_bias, self.engine.tokenizer.vocab_size)
        if history[-1].role in ("assistant", "tool"):  # a prefill the reply continues, or tools' results
            session.messages = list(history)
            return session.respond()
        session.messages = list(history[:-1])
        return session.send(history[-1].content)

    def chat(self, messages, tools=None, tool_choice="auto", parallel_tool_calls: bool = True, **sampling):
        """The assistant's reply to `messages`.

        >>> model.chat([{"role": "system", "content": "You are a pirate."},
        ...             {"role": "user", "content": "Hello!"}], temperature=0, max_new_tokens=12)
        "Good day, mate! I'm Captain Blackwood, the"

        With `tools` (Python functions, their schemas built from type hints and docstrings, or
        OpenAI tool dicts) the reply is an OpenAI message dict: `{"role": "assistant", "content":
        text}`, or `{"role": "assistant", "content": None, "tool_calls": [...]}` whose calls name
        one of the tools with arguments valid for its schema (decoding is constrained to it).
        `tool_choice`: "auto", "required", "none" or a tool's name. See docs/tools.md.
        """
        if tools is None:
            return self._turn(messages, sampling).run().text
        offered, _ = as_tools(tools)
        style = self.engine.template.tool_style
        if tool_choice != "none":
            grammar = tool_grammar(offered, style, tool_choice, parallel_tool_calls, self.tokenizer.control_ids)
            sampling = {**sampling, "constraint": grammar}
        text = self._turn(messages, sampling, tools=offered).run().text
        calls = parse_calls(text, style) if tool_choice != "none" else None
        if not calls:
            return {"role": "assistant", "content": text}
        return {"role": "assistant", "content": None, "tool_calls": openai_calls(calls, style)}

    def run(self, messages, tools, max_steps: int = 5, tool_choice="auto", **sampling) -> list[dict]:
        """An agent loop: reply, run the tools the reply calls (Python functions) and feed their
        results back, until a reply calls none; at most `max_steps` replies, the last one without
        tools. Returns the conversation (OpenAI message dicts) from `messages` on, ending with
        the assistant's answer.

        >>> def lookup_order(order_id: int) -> dict:
        ...     "An order's status."
        ...     return {"order_id": order_id, "status": "shipped"}
        >>> model.run("Where is my order 1182?", tools=[lookup_order])[-1]["content"]  # doctest: +SKIP
        """
        offered, functions = as_tools(tools)
        if max_steps < 1:
            raise UserError(f"max_steps must be >= 1, got {max_steps}")
        conversation = [m.to_dict() for m in as_messages(messages)]
        for step in range(max_steps):
            last = step == max_steps - 1
            reply = self.chat(conversation, offered, "none" if last else tool_choice, **sampling)
            conversation.append(reply)
            if not reply.get("tool_calls"):
                break
            for call in reply["tool_calls"]:
                name = call["function"]["name"]
                if name not in functions:
                    raise UserError(f"tools: {name!r} was called but is not a Python function to run")
                result = call_function(functions[name], json.loads(call["function"]["arguments"]))
                conversation.append({"role": "tool", "tool_call_id": call["id"], "name": name, "content": result})
        return conversation

    def stream(self, messages, **sampling) -> Iterator[str]:
        """The reply as it is generated: pieces of text that join into what `chat` returns.

        >>> for piece in model.stream("Tell me a joke.", temperature=0):
        ...     print(piece, end="", flush=True)
        What's that? A joke about a person who can't remember their own name.
        """
        yield from self._turn(messages, sampling)

    def generate_batch(self, conversations: Iterable, **sampling) -> list[str]:
        """One reply per conversation, all decoded together in one batch (equal to one by one;
        with a `seed`, conversation i samples with seed + i).

        >>> model.generate_batch(["Hi!", "Name a colour."], temperature=0, max_new_tokens=8)
        ['Hello! How can I assist you today', 'The most obvious color is indeed red,']
        """
        eng = self.engine
        s, stop_ids = eng.stops(Sampling().replace(**sampling))
        check_token_ids(s.logit_bias, eng.tokenizer.vocab_size)
        prompts = []
        for i, conv in enumerate(conversations):
            msgs = as_messages(conv, f"conversations[{i}]")
            if not msgs or msgs[-1].role != "user":
                raise UserError(f"conversations[{i}]: the last message must have role 'user'")
            ids = eng.template.render(eng.tokenizer, msgs, add_generation_prompt=True)[0]
            if len(ids) >= eng.context_length:
                raise UserError(f"conversations[{i}]: the prompt needs {len(ids)} tokens; the model's context "
                                f"is {eng.context_length}")
            prompts.append(ids)
        if not prompts:
            return []
        replies = generate_batch(eng.model, prompts, s, stop_ids, eng.tokenizer, eng.tokenizer.pad_id)
        return [r.text for r in replies]

    def candidates(self, messages, beam_size: int = 5, scorer: str = "logprob", num_candidates: int | None = None,
                   source: str = "beam", mmi_model: str | None = None, mmi_weight: float = 0.5,
                   discriminator: str | None = None, length_penalty: float = 1.0, **sampling) -> list[dict]:
        """Several replies, best first by `scorer` (logprob, mmi with `mmi_model`, discriminator
        with `discriminator`): from beam search's n-best (`source="beam"`) or from samples
        (`source="sample"`). Each is `{"text", "score", "scores", "tokens", "finish_reason"}`.

        >>> best = model.candidates("Any plans for the weekend?", beam_size=4, max_new_tokens=16)
        >>> [round(c["score"], 2) for c in best]
        [-0.71, -0.74, -0.77, -0.8]
        >>> best[0]["text"]
        "I'm sorry for any misunderstanding, but as a chatbot designed to assist with"
        """
        n = num_candidates or (beam_size if source == "beam" else 4)
        decoding = Decoding(beam_size=beam_size if source == "beam" else 1, num_candidates=n, candidates=source,
                            scorer=scorer, mmi_model=mmi_model, mmi_weight=mmi_weight, discriminator=discriminator,
                            length_penalty=length_penalty)
        session = RankedSession(self.engine, decoding)
        reply = self._turn(messages, sampling, session).run()
        ranked = sorted(reply.candidates, key=lambda c: c.scores["score"], reverse=True)
        return [{"text": c.text, "score": c.scores["score"], "scores": dict(c.scores),
                 "tokens": len(c.tokens), "finish_reason": c.finish_reason} for c in ranked]

    # --- scores and sessions ----------------------------------------------------------------
    def perplexity(self, conversations, max_len: int | None = None, batch_size: int = 8,
                   train_on: str = "assistant") -> dict:
        """Perplexity on the assistant turns of `conversations` (content and end of turn, as
        trained; an assistant message of weight 0 is left out): `{"ppl", "nll", "tokens", "bpc", ...}`.
        `conversations` is a list of message lists, or a data file (every conversation in it).

        >>> r = model.perplexity([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]])
        >>> round(r["ppl"], 1), r["tokens"]
        (224.7, 3)
        >>> model.perplexity("my_chats.jsonl")["ppl"]  # doctest: +SKIP
        """
        if isinstance(conversations, str):
            convs = load_split(conversations, "all")
        else:
            convs = [as_messages(c, f"conversations[{i}]") for i, c in enumerate(conversations)]
        eng = self.engine
        return assistant_perplexity(eng.model, eng.tokenizer, eng.template, convs, max_len, batch_size, train_on)

    def session(self, persona: str | None = None, max_context_tokens: int | None = None, **sampling) -> Session:
        """A conversation that keeps its history and KV cache: `send(text)` returns the reply as a
        stream (iterate it for pieces; `.run().text` for the whole reply). `persona` is a system
        message or a preset name (virtual-assistant, friendly-chatbot, customer-service).

        >>> chat = model.session(persona="friendly-chatbot", temperature=0, max_new_tokens=24)
        >>> chat.send("Hi, I'm Sam.").run().text
        "I'd be happy chatting with you! What brings you here today?"
        >>> for piece in chat.send("What's my name?"):
        ...     print(piece, end="")
        Hello there, Sam. How can I assist you today?
        """
        return Session(self.engine, system=resolve_persona(persona), sampling=Sampling().replace(**sampling),
                       max_context_tokens=max_context_tokens)


def load(model: str | None = None, dtype: str | None = None, template: str | None = None,
         adapter: str | None = None) -> ChatModel:
    """A model ready to chat: `model` is None (the embedded SmolLM2-135M-Instruct), a .gguf file, a
    Hugging Face directory (llama or gpt2) or a dialogen checkpoint; `dtype` the decode weights
    (auto, int8, int4, float16, bfloat16, float32; default auto); `template` the chat template
    (chatml, llama2, dialogpt, jinja; default: the model's own); `adapter` a LoRA adapter directory
    (PEFT's files) or GGUF LoRA file added to the model (with `model` None: on the base the adapter names).

    >>> model = dialogen.load("runs/ft/best", dtype="int8")
    """
    return ChatModel(load_engine(model, template or "auto", dtype or "auto", adapter))
