"""Recurrent encoder-decoder with attention: the sequence-to-sequence family.

The encoder (GRU or LSTM, optionally bidirectional, stacked, with dropout) reads the context:
the rendered prompt of the last turns. The decoder is Luong's: a stacked RNN whose top state
queries the encoder outputs, the context vector and the state combine into an attentional
vector, which predicts the next token and, with input feeding, joins the next step's input.
Scoring is additive (Bahdanau), dot or general (Luong), always masked to real source tokens.

It plugs into the shared decode step: on an empty cache `model(ids, cache)` encodes `ids` as
the context and returns the logits of the reply's first token (B, 1, V); on a filled cache the
T ids are decoder inputs and the logits are (B, T, V). So sampling, beam search and sessions
drive it like a transformer, except that it cannot extend a cached prompt (`reuses_prefix`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..errors import UserError
from .config_values import config_from_dict
from .family import ENCODER_DECODER
from .files import load_checked, write_checkpoint

CELLS = {"gru": nn.GRU, "lstm": nn.LSTM}
ATTENTIONS = ("additive", "dot", "general")
ALIASES = {"bahdanau": "additive", "luong": "general", "luong-dot": "dot", "luong-general": "general"}
MODEL_TYPE = "dialogen-rnn"


@dataclass
class RNNConfig:
    vocab_size: int
    cell: str = "gru"
    emb_dim: int = 256
    hidden: int = 256  # per encoder direction; the decoder has hidden * directions
    n_layer: int = 1  # encoder and decoder alike
    bidirectional: bool = True
    dropout: float = 0.1
    attention: str = "general"
    input_feeding: bool = True
    tie_embeddings: bool = True
    start_id: int = 0  # the decoder's first input token
    max_seq_len: int = 1024  # context budget a session may render for the encoder
    context_turns: int = 0  # encode only the last K turns of a prompt (0 = all of it) ...
    turn_end_id: int = -1  # ... the turns ending at this token (the template's end-of-turn)

    def __post_init__(self):
        self.attention = ALIASES.get(self.attention, self.attention)
        checks = [
            ("cell", self.cell in CELLS, f"one of {', '.join(CELLS)}"),
            ("attention", self.attention in ATTENTIONS, f"one of {', '.join(ATTENTIONS)} (or bahdanau, luong)"),
            ("vocab_size", self.vocab_size >= 1, ">= 1"),
            ("emb_dim", self.emb_dim >= 1, ">= 1"),
            ("hidden", self.hidden >= 1, ">= 1"),
            ("n_layer", self.n_layer >= 1, ">= 1"),
            ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
            ("start_id", 0 <= self.start_id < self.vocab_size, f"in 0..{self.vocab_size - 1}"),
            ("max_seq_len", self.max_seq_len >= 2, ">= 2"),
            ("context_turns", self.context_turns >= 0, ">= 0"),
            ("turn_end_id", -1 <= self.turn_end_id < self.vocab_size, f"in -1..{self.vocab_size - 1}"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise UserError(f"rnn {name} must be {rule}, got {getattr(self, name)!r}")

    @property
    def arch(self) -> str:
        return "rnn"

    @property
    def d_model(self) -> int:
        return self.hidden * (2 if self.bidirectional else 1)


class Attention(nn.Module):
    """Scores decoder queries against encoder outputs; padding gets exactly zero weight."""

    def __init__(self, kind: str, dim: int):
        super().__init__()
        self.kind = kind
        if kind == "general":
            self.w = nn.Linear(dim, dim, bias=False)
        elif kind == "additive":
            self.w_k = nn.Linear(dim, dim, bias=False)
            self.w_q = nn.Linear(dim, dim)
            self.v = nn.Linear(dim, 1, bias=False)

    def keys(self, memory):
        """The per-source half of the score, computed once per context: (B, S, D)."""
        if self.kind == "general":
            return self.w(memory)
        if self.kind == "additive":
            return self.w_k(memory)
        return memory

    def forward(self, query, memory, keys, mask):
        """query (B, T, D), memory/keys (B, S, D), mask (B, S) -> context (B, T, D), weights (B, T, S)."""
        if self.kind == "additive":
            scores = self.v(torch.tanh(self.w_q(query)[:, :, None] + keys[:, None])).squeeze(-1)
        else:
            scores = query @ keys.transpose(1, 2)
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        weights = scores.softmax(-1)
        return weights @ memory, weights


class RNNState:
    """The decode cache: encoder outputs plus the decoder's recurrent state.

    `length` counts context tokens plus decoder inputs fed, like a transformer cache. The state
    right after encoding is kept, so `truncate(context length)` rewinds to the start of the reply
    (score many replies to one context); any other shorter length empties the cache.
    """

    def __init__(self, batch: int = 1):
        self.batch = batch
        self.reset()

    def reset(self):
        self.length = 0
        self.src_len = 0
        self.memory = self.keys = self.mask = None  # (B, S, D), (B, S, D), (B, S) bool
        self.h: tuple = ()  # (L, B, D) per state tensor: (h,) for a GRU, (h, c) for an LSTM
        self.feed = None  # (B, D): the last attentional vector, for input feeding
        self._base = None  # (h, feed) right after encoding

    def truncate(self, length: int):
        if length >= self.length:
            return
        if self._base is not None and length == self.src_len:
            self.h, self.feed = self._base
            self.length = length
        else:
            self.reset()

    def reorder(self, index: torch.Tensor):
        """Select batch rows (beam search): row i becomes old row index[i]."""
        if self.memory is not None:
            self.memory, self.keys, self.mask = (t.index_select(0, index) for t in (self.memory, self.keys, self.mask))
            self.h = tuple(t.index_select(1, index) for t in self.h)
            self.feed = self.feed.index_select(0, index)
            h0, f0 = self._base
            self._base = (tuple(t.index_select(1, index) for t in h0), f0.index_select(0, index))
        self.batch = len(index)

    def nbytes(self) -> int:
        if self.memory is None:
            return 0
        tensors = [self.memory, self.keys, self.mask, self.feed, *self.h, *self._base[0], self._base[1]]
        unique = {id(t): t for t in tensors}.values()  # dot attention shares keys with memory
        return sum(t.numel() * t.element_size() for t in unique)


class RNNSeq2Seq(nn.Module):
    family = ENCODER_DECODER
    reuses_prefix = False  # a session re-encodes the whole prompt each turn (models/family.py)
    max_positions = None  # no position limit: the encoder reads a prompt of any length

    def __init__(self, cfg: RNNConfig):
        super().__init__()
        self.cfg = cfg
        D, cell = cfg.d_model, CELLS[cfg.cell]
        between = cfg.dropout if cfg.n_layer > 1 else 0.0
        self.embed = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = cell(cfg.emb_dim, cfg.hidden, cfg.n_layer, batch_first=True,
                            bidirectional=cfg.bidirectional, dropout=between)
        self.bridge = nn.ModuleList(nn.Linear(D, D) for _ in range(2 if cfg.cell == "lstm" else 1))
        dec_in = cfg.emb_dim + (D if cfg.input_feeding else 0)
        self.decoder = cell(dec_in, D, cfg.n_layer, batch_first=True, dropout=between)
        self.attn = Attention(cfg.attention, D)
        self.combine = nn.Linear(2 * D, D, bias=False)
        if cfg.tie_embeddings:
            self.out_proj = nn.Linear(D, cfg.emb_dim, bias=False)
        else:
            self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)

    def new_cache(self, batch: int = 1) -> RNNState:
        return RNNState(batch)

    def init_weights(self, seed: int = 0):
        """Unit-variance embeddings (small ones train slowly over a large vocabulary), uniform
        +-1/sqrt(fan_in) elsewhere; the tied head's projection is scaled so that initial logits
        have about unit variance."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("bias"):
                    p.zero_()
                elif name.startswith("embed"):
                    p.copy_(torch.randn(p.shape, generator=g))
                else:
                    bound = p.shape[-1] ** -0.5
                    if name.startswith("out_proj"):
                        bound /= self.cfg.emb_dim ** 0.5
                    p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)

    # --- encoder ------------------------------------------------------------------------
    def encode(self, src, src_mask, state: RNNState):
        """Fill `state` from a context batch src (B, S); src_mask (B, S) marks real tokens."""
        B, S = src.shape
        mask = torch.ones_like(src, dtype=torch.bool) if src_mask is None else src_mask[:, :S].bool()
        mask = self.last_turns(src, mask)
        lengths = mask.sum(1)
        if int(lengths.min()) == 0:
            raise ValueError("every context needs at least one real token")
        # real tokens first, in order: left- and right-padded batches alike
        order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices
        width = int(lengths.max())  # beyond it, after dropped turns and padding, only padding is left
        src = src.gather(1, order)[:, :width]
        mask = torch.arange(width)[None, :] < lengths[:, None]
        packed = pack_padded_sequence(self.drop(self.embed(src)), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        out, final = self.encoder(packed)
        memory = pad_packed_sequence(out, batch_first=True, total_length=width)[0]  # (B, width, D)
        finals = final if isinstance(final, tuple) else (final,)
        dirs = 2 if self.cfg.bidirectional else 1
        h = []
        for k, t in enumerate(finals):  # (L*dirs, B, H) -> (L, B, dirs*H)
            t = t.view(self.cfg.n_layer, dirs, B, self.cfg.hidden).permute(0, 2, 1, 3).reshape(self.cfg.n_layer, B, -1)
            t = self.bridge[k](t)
            h.append(torch.tanh(t) if k == 0 else t)  # an LSTM's cell state is unbounded
        state.memory, state.keys, state.mask = memory, self.attn.keys(memory), mask
        state.h = tuple(h)
        state.feed = memory.new_zeros(B, self.cfg.d_model)
        state.src_len = state.length = S  # what the caller fed, as a transformer cache counts it
        state.batch = B

    def last_turns(self, src, mask):
        """The mask cut to the last `context_turns` turns and what follows them (the generation
        prompt): a token stays when at most K end-of-turn tokens lie at or after it."""
        K = self.cfg.context_turns
        if K == 0 or self.cfg.turn_end_id < 0:
            return mask
        ends = ((src == self.cfg.turn_end_id) & mask).long()
        at_or_after = ends.flip(1).cumsum(1).flip(1)  # (B, S)
        return mask & (at_or_after <= K)

    # --- decoder ------------------------------------------------------------------------
    def _rnn(self, x, h: tuple):
        out, new = self.decoder(x, h if self.cfg.cell == "lstm" else h[0])
        return out, (new if isinstance(new, tuple) else (new,))

    def decode(self, ids, state: RNNState):
        """Decoder inputs ids (B, T) after what `state` holds -> logits (B, T, V); advances state."""
        return self.head(self.decode_features(ids, state))

    def decode_features(self, ids, state: RNNState):
        """Like `decode`, but the attentional vectors (B, T, D) the head reads: training applies the
        head only where a label is (a (B, T, V) tensor of mostly padding costs more than the rest)."""
        emb = self.drop(self.embed(ids))  # (B, T, E)
        if self.cfg.input_feeding:  # each step's input needs the previous step's output
            outs = []
            for t in range(ids.shape[1]):
                x = torch.cat([emb[:, t:t + 1], state.feed[:, None]], dim=-1)
                out, state.h = self._rnn(x, state.h)
                att = self._attend(out, state)
                state.feed = att[:, 0]
                outs.append(att)
            att = torch.cat(outs, dim=1)
        else:
            out, state.h = self._rnn(emb, state.h)
            att = self._attend(out, state)
            state.feed = att[:, -1]
        state.length += ids.shape[1]
        return self.drop(att)

    def _attend(self, out, state: RNNState):
        ctx, _ = self.attn(out, state.memory, state.keys, state.mask)
        return torch.tanh(self.combine(torch.cat([ctx, out], dim=-1)))  # (B, T, D)

    def head(self, att):
        if self.cfg.tie_embeddings:
            return self.out_proj(att) @ self.embed.weight.t()
        return self.lm_head(att)

    def _start(self, state: RNNState):
        """Feed the start token: the first reply token's features (B, 1, D)."""
        start = torch.full((state.batch, 1), self.cfg.start_id, dtype=torch.long)
        feats = self.decode_features(start, state)
        state.length -= 1  # the start token is internal: length counts what callers fed
        state._base = (state.h, state.feed)
        return feats

    # --- the shared decode step and training ---------------------------------------------
    def forward(self, ids, cache: RNNState | None = None, positions=None, key_mask=None):
        """Empty cache: ids is the context -> first reply token's logits (B, 1, V).
        Filled cache: ids are the next decoder inputs -> logits (B, T, V). Positions are unused."""
        if cache is None:
            cache = self.new_cache(ids.shape[0])
        if cache.length == 0:
            self.encode(ids, key_mask, cache)
            return self.head(self._start(cache))
        return self.decode(ids, cache)

    def teacher_forced(self, src, src_mask, tgt):
        """Logits (B, T, V) predicting each tgt token (B, T) from the context and the tokens before it."""
        return self.head(self.teacher_forced_features(src, src_mask, tgt))

    def teacher_forced_features(self, src, src_mask, tgt):
        """The features (B, T, D) under `teacher_forced`'s logits."""
        state = self.new_cache(src.shape[0])
        self.encode(src, src_mask, state)
        first = self._start(state)
        if tgt.shape[1] == 1:
            return first
        return torch.cat([first, self.decode_features(tgt[:, :-1], state)], dim=1)


# --- checkpoints ----------------------------------------------------------------------------
def save_rnn(directory, model: RNNSeq2Seq, tokenizer, meta: dict, more=None) -> Path:
    conf = {"model_type": MODEL_TYPE, "architectures": ["DialogenRNNSeq2Seq"], **asdict(model.cfg)}
    return write_checkpoint(directory, model.state_dict(), conf, tokenizer, meta, more)


def load_rnn(path, config: dict) -> RNNSeq2Seq:
    path = Path(path)
    cfg = config_from_dict(RNNConfig, config, f"{path / 'config.json'}")
    return load_checked(RNNSeq2Seq, cfg, path, str(path))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

