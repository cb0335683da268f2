"""A session whose replies may come from beam search or sample-and-rank.

With one beam and one candidate it is a plain `Session` (streamed replies, KV cache kept across
turns). Otherwise each reply is a `Reply` from the `Decoder` (`searched_reply`, which the server uses
too): the search encodes the prompt on a cache of its own, so the session's cache is left as it was
and stays valid for later turns.
"""

from __future__ import annotations

from ..decoding.settings import Decoding, Sampling
from ..decoding.strategy import Decoder, Reply
from .messages import Message
from .session import Engine, Session


class RankedSession(Session):
    def __init__(self, engine: Engine, decoding: Decoding | None = None, on_reply=None, **kw):
        """`on_reply(reply)` is called after every searched reply (e.g. to print candidates)."""
        super().__init__(engine, **kw)
        self.decoder = Decoder(engine, decoding or Decoding())
        self.on_reply = on_reply
        self.last_reply: Reply | None = None

    def _generate(self, ids: list[int], sampling: Sampling):
        if not self.decoder.decoding.searches:
            return super()._generate(ids, sampling)

        def then(reply: Reply):
            self.last_reply = reply
            if self.on_reply is not None and reply.candidates:
                self.on_reply(reply)

        return searched_reply(self, self.decoder, ids, sampling, then=then)


def searched_reply(session: Session, decoder: Decoder, ids: list[int], sampling: Sampling,
                   decoding: Decoding | None = None, then=None) -> Reply:
    """The reply to the prompt `ids` of the session's conversation, from a search (the decoder's
    own `Decoding` unless one is given); once chosen it joins the session's messages, then
    `then(reply)` is called. The search runs on caches of its own: the session's stays valid."""

    prefill = session.messages[-1] if session.continues else None

    def finish(reply: Reply):
        if prefill is not None:
            session.messages[-1] = Message("assistant", prefill.content + reply.text)
        else:
            session.messages.append(Message("assistant", reply.text))
        if then is not None:
            then(reply)

    return decoder.reply(ids, session.conversation(), sampling, decoding, on_finish=finish)
