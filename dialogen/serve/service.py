"""What the HTTP layer drives: the engine behind the worker, the session store, the KV-cache LRU.

No web framework here: plain objects that the routes in `completions.py` and `sessions.py` use,
so the serving logic can be read (and tested) without FastAPI.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from ..chat.messages import Message
from ..chat.ranked import searched_reply
from ..chat.session import Engine, Session
from ..decoding.settings import Decoding, Sampling
from ..decoding.strategy import Decoder
from .memory import Trimmer
from .metrics import Metrics
from .store import Store
from .worker import Worker


@dataclass
class Limits:
    max_body_bytes: int = 1_000_000
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    max_n: int = 4
    max_candidates: int = 8  # num_candidates and beam_size
    kv_budget_bytes: int = 1 << 30


@dataclass
class Keys:
    """API keys; a session's owner is a hash of the key that made it ('' when auth is off)."""

    keys: list[str] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def owner(self, authorization: str | None) -> str | None:
        """The owner for an Authorization header, or None if the key is missing or wrong."""
        if not self.keys:
            return ""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        found = False
        for k in self.keys:  # compare with every key, in constant time each
            found |= hmac.compare_digest(k.encode(), token.encode())
        return hashlib.sha256(token.encode()).hexdigest()[:32] if found else None


class Claim:
    """One turn's hold on a session; `job` is the job generating it, once submitted; `holder`
    its claim in the store."""

    job = None
    holder: str | None = None


class SessionCache:
    """Live `Session`s (each holding its KV cache), least recently used first out.

    The budget bounds the bytes of all KV caches; a session being generated is never evicted.
    An evicted session is rebuilt from the store on its next turn (its history is re-encoded).
    """

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self._live: OrderedDict[str, Session] = OrderedDict()
        self._busy: dict[str, Claim] = {}  # session id -> the claim of the turn being generated
        self._lock = threading.Lock()
        self.evictions = 0

    def claim(self, sid: str) -> "Claim | None":
        """Mark a session busy for one turn; None if a turn is already running."""
        with self._lock:
            if sid in self._busy:
                return None
            claim = self._busy[sid] = Claim()
            return claim

    def release(self, sid: str, claim: "Claim"):
        """End a claim (again is harmless: a newer claim on the session is left alone)."""
        with self._lock:
            if self._busy.get(sid) is claim:
                del self._busy[sid]
        self.trim()

    def job(self, sid: str):
        with self._lock:
            claim = self._busy.get(sid)
            return claim.job if claim else None

    def get(self, sid: str) -> Session | None:
        with self._lock:
            s = self._live.get(sid)
            if s is not None:
                self._live.move_to_end(sid)
            return s

    def put(self, sid: str, session: Session):
        with self._lock:
            self._live[sid] = session
            self._live.move_to_end(sid)
        self.trim()

    def drop(self, sid: str):
        with self._lock:
            self._live.pop(sid, None)

    def nbytes(self) -> int:
        with self._lock:
            return sum(_cache_bytes(s) for s in self._live.values())

    def __len__(self) -> int:
        return len(self._live)

    def trim(self):
        with self._lock:
            total = sum(_cache_bytes(s) for s in self._live.values())
            for sid in list(self._live):
                if total <= self.budget:
                    break
                if sid in self._busy:
                    continue
                total -= _cache_bytes(self._live.pop(sid))
                self.evictions += 1


def _cache_bytes(s: Session) -> int:
    nbytes = getattr(s.cache, "nbytes", None)
    return nbytes() if callable(nbytes) else 0


class PrefixPool:
    """Idle sessions of finished stateless requests, kept for their KV caches.

    A stateless client sends the whole conversation with every turn. Among the idle sessions of
    the same owner (API key), the one whose conversation shares the most leading messages with a
    new request (at least one, e.g. the same persona) serves it: lent when the request continues
    its conversation, copied otherwise; the session feeds only the tokens after the common token
    prefix. Another key's prompts are never matched: how much of a prompt was cached would tell
    one client about another's. Nor are another engine's (another LoRA adapter's): its keys and
    values are another model's. Bounded by count and by the bytes of the caches; the oldest goes
    first.
    """

    def __init__(self, budget_bytes: int, max_sessions: int = 8):
        self.budget, self.max_sessions = budget_bytes, max_sessions
        self._idle: list[tuple[str, Session]] = []
        self._lock = threading.Lock()

    def take(self, owner: str, conversation: list[Message], fresh, engine=None) -> Session | None:
        """A session of `engine` for `conversation`: the kept one it continues (taken out of the pool),
        or `fresh()` with a copy of the cache that shares the most leading messages with it (that one
        stays for the conversation it belongs to), or None. `engine` None: any engine's."""
        with self._lock:
            best, best_n = None, 0
            for entry in self._idle:
                mine = entry[0] == owner and (engine is None or entry[1].engine is engine)
                n = _common_messages(entry[1].conversation(), conversation) if mine else 0
                if n > best_n:
                    best, best_n = entry, n
            if best is None:
                return None
            kept = best[1]
            if best_n == len(kept.conversation()):  # the next turn of that conversation
                self._idle.remove(best)
                return kept
            if not kept.engine.model.reuses_prefix:  # an encoder-decoder's cache holds no prefix to share
                return None
            s = fresh()
            s.share_cache(kept)  # under the lock: no one changes kept
            return s

    def give(self, owner: str, session: Session, prompt_tokens: int):
        """Keep the session's cache of its prompt only: the reply's keys and values came from
        decode steps, which with a float16/bfloat16 copy (decode steps only) a fresh request would
        compute in a float32 prompt: kept, they would make a reply differ from a fresh request's by
        more than rounding. (With blocks, prompts and decode steps share the products.)"""
        session.keep_cache(prompt_tokens)
        with self._lock:
            self._idle.append((owner, session))
            total = sum(_cache_bytes(s) for _, s in self._idle)
            while self._idle and (len(self._idle) > self.max_sessions or total > self.budget):
                total -= _cache_bytes(self._idle.pop(0)[1])

    def nbytes(self) -> int:
        with self._lock:
            return sum(_cache_bytes(s) for _, s in self._idle)

    def __len__(self) -> int:
        return len(self._idle)


def _common_messages(a: list[Message], b: list[Message]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class Service:
    def __init__(self, engine: Engine, store: Store, keys: Keys, limits: Limits, sampling: Sampling | None = None,
                 model_name: str | None = None, max_active: int = 32, max_queue: int = 64,
                 decoding: Decoding | None = None, aliases=(), strict_model_names: bool = False,
                 prefill_chunk: int = 256, metrics: bool = True, adapters=None,
                 adapter_engines: dict[str, Engine] | None = None):
        self.worker = Worker(engine.model, max_active=max_active, max_queue=max_queue, prefill_chunk=prefill_chunk,
                             adapters=adapters)
        # sessions see the proxy: their model calls queue on the worker thread
        self.engine = Engine(self.worker.proxy, engine.tokenizer, engine.template, engine.context_length, engine.name)
        # each LoRA adapter (models.lora_set.AdapterSet) served by its name: an engine whose proxy takes it,
        # with the adapter's tokenizer and template (`decoding.engine.adapter_engine`; default: the base's)
        self.adapter_engines = {}
        for name in adapters.adapters if adapters is not None else ():
            own = (adapter_engines or {}).get(name, engine)
            self.adapter_engines[name] = Engine(self.worker.proxy_for(name), own.tokenizer, own.template,
                                                engine.context_length, name, own.meta)
        self.metrics = Metrics(metrics)
        self.store, self.keys, self.limits = self.metrics.timed(store), keys, limits
        self.sampling = sampling or Sampling()
        self.decoding = decoding or Decoding()
        self.decoder = Decoder(self.engine, self.decoding)  # loads a configured scorer (e.g. MMI) once
        self._decoders = {id(self.engine): self.decoder}  # an adapter's searches run on its own engine
        self.model_name = model_name or engine.name
        # extra names listed in /v1/models; with `strict_model_names` only these (and the model's) are served
        self.aliases = [a for a in dict.fromkeys(aliases) if a != self.model_name and a not in self.adapter_engines]
        self.strict_model_names = strict_model_names
        # the KV-cache budget: three quarters for sessions, a quarter for stateless conversations
        self.prefixes = PrefixPool(limits.kv_budget_bytes // 4)
        self.sessions = SessionCache(limits.kv_budget_bytes - self.prefixes.budget)
        self.default_persona: str | None = None
        self.draining = False  # set on SIGTERM/SIGINT: new work gets 503, running replies finish
        self._decoders_lock = threading.Lock()  # job threads make the adapters' decoders on first use
        self.trimmer = Trimmer(busy=lambda: self.worker.load()["running"] > 0,
                               activity=lambda: self.worker.stats["rounds"])

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    @property
    def vocab_size(self) -> int:
        return self.engine.tokenizer.vocab_size

    def model_names(self) -> list[str]:
        """The names /v1/models lists: the model's, its aliases, then its LoRA adapters'."""
        return [self.model_name, *self.aliases, *self.adapter_engines]

    def accepts_model(self, name) -> bool:
        """An adapter's name reaches that adapter; any other name reaches the base model, unless names
        are strict (then only its own, its aliases, 'default' and 'dialogen')."""
        return not self.strict_model_names or name in (None, *self.model_names(), "default", "dialogen")

    def engine_for(self, name: str | None) -> Engine:
        """The engine a request's `model` name is served by: its LoRA adapter's, else the base's."""
        return self.adapter_engines.get(name, self.engine) if isinstance(name, str) else self.engine

    def served_name(self, name: str | None) -> str:
        """The `model` a reply reports: the adapter's name, or the base model's."""
        return name if isinstance(name, str) and name in self.adapter_engines else self.model_name

    def decoder_for(self, engine: Engine) -> Decoder:
        with self._decoders_lock:
            if id(engine) not in self._decoders:
                self._decoders[id(engine)] = Decoder(engine, self.decoding)
            return self._decoders[id(engine)]

    def defaults(self) -> dict:
        """The decoding a request gets for the fields it leaves out (OpenAI names)."""
        s = self.sampling
        return {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                "repetition_penalty": s.repetition_penalty, "frequency_penalty": s.frequency_penalty,
                "presence_penalty": s.presence_penalty, "no_repeat_ngram": s.no_repeat_ngram,
                "max_tokens": s.max_new_tokens, "seed": s.seed, "stop": s.stop}

    def prompt_len(self, messages, continue_final: bool = False, tools: list[dict] | None = None,
                   engine: Engine | None = None) -> int:
        eng = engine or self.engine
        return len(eng.template.render(eng.tokenizer, messages, add_generation_prompt=True,
                                       continue_final=continue_final, tools=tools)[0])

    def new_session(self, persona: str | None, sampling: Sampling, history=(), budget: int | None = None,
                    engine: Engine | None = None) -> Session:
        s = Session(engine or self.engine, system=persona, sampling=sampling, max_context_tokens=budget or self.context_length)
        s.reset(history)
        return s

    def stateless_session(self, owner: str, persona: str | None, sampling: Sampling, history: list[Message],
                          user: str | None, budget: int | None = None, pooled: bool = True,
                          tools: list[dict] | None = None, engine: Engine | None = None) -> Session:
        """A session for one stateless request: an idle one of the owner's sharing a prefix with it,
        else a new one (always a new one without `pooled`, e.g. for a search, which keeps no cache).
        `user` None: the history is the whole conversation (it ends with tools' results, or with an
        assistant message the reply continues). `engine`: an adapter's (`engine_for`); a kept cache of
        another engine is never reused."""
        engine = engine or self.engine
        head = [Message("system", persona)] if persona else []
        tail = [Message("user", user)] if user is not None else []
        s = None
        if pooled:
            s = self.prefixes.take(owner, head + list(history) + tail,
                                   lambda: self.new_session(persona, sampling, history, budget, engine), engine)
        if s is None:
            s = self.new_session(persona, sampling, history, budget, engine)
        else:
            s.set_persona(persona)
            s.reset(history)
            s.sampling, s.max_context_tokens = sampling, budget or self.context_length
        s.tools = tools
        # the prompt's last tokens go through a prompt step (two or more tokens are never a decode step
        # of a float16 copy), as in a fresh request, so the logits match a fresh request's up to rounding
        s.min_feed = 2
        return s

    def reply(self, session: Session, text: str | None, sampling: Sampling, decoding: Decoding):
        """Start the reply to a user turn: (Generation or searched Reply, prompt tokens, cached tokens).
        `text` None: the reply to the session's messages as they are (after tools' results, or
        continuing a final assistant message).

        A plain reply streams and reuses the session's KV cache; a searched one (beam, candidates)
        runs on caches of its own and yields its text once, with every candidate kept on it.
        """
        session.sampling = sampling
        if not decoding.searches:
            gen = session.send(text) if text is not None else session.respond()
            return gen, len(gen.history), len(gen.history) - len(gen.feed)
        ids = session.user_turn(text) if text is not None else session.prompt_ids()
        return searched_reply(session, self.decoder_for(session.engine), ids, sampling, decoding), len(ids), 0

    def begin_shutdown(self, grace: float):
        """Stop taking work (503); replies still running `grace` seconds later are cut, each
        client told so (a session turn cut off is not stored)."""
        from .jobs import ServerShutdown

        if self.draining:
            return
        self.draining = True
        reason = ServerShutdown(f"the server is shutting down and the reply did not finish within the {grace:g} s "
                                "grace period; send the request again")
        timer = threading.Timer(grace, self.worker.cut_all, (reason,))
        timer.daemon = True
        timer.start()

    def close(self):
        self.trimmer.close()
        self.worker.close()
        self.store.close()
