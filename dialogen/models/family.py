"""The two generator families and what callers may ask of a model, instead of probing it.

- `decoder` (models/transformer.py): one token stream; a cache can be extended turn after turn.
- `encoder-decoder` (models/rnn.py): the context is encoded, the reply decoded; a session
  re-encodes the whole prompt each turn (`reuses_prefix` is false), training is teacher-forced.

Each generator class declares `reuses_prefix` and `max_positions`, and the encoder-decoder its
`family` (a model that declares none is a decoder); `family` and `is_encoder_decoder` read it, so
the decoders, losses and checkpoint writers never test for a method's presence.
"""

from __future__ import annotations

from typing import Protocol

DECODER, ENCODER_DECODER = "decoder", "encoder-decoder"


class Generator(Protocol):
    family: str  # DECODER or ENCODER_DECODER
    reuses_prefix: bool  # whether a kept cache can be extended with new tokens
    max_positions: int | None  # prompt plus reply stay within this many positions (None: no limit)

    def new_cache(self, batch: int = 1): ...

    def __call__(self, ids, cache=None): ...


def family(model) -> str:
    return getattr(model, "family", DECODER)  # the transformer is the default family


def is_encoder_decoder(model) -> bool:
    return family(model) == ENCODER_DECODER
