"""The discriminator: reads (context, reply) and outputs P(the reply was written by a human).

Two bidirectional recurrent encoders with a shared embedding read the context (its turns'
texts, each closed by a separator token) and the reply; each side is max-pooled over its real
tokens and the pair is judged from [c, r, c * r, |c - r|], so a reply is judged both on its own
and against what it answers. It works on the generator's token ids, so it must share the
generator's vocabulary (`Tokenizer.fingerprint()` is stored and checked).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..errors import UserError
from .config_values import config_from_dict
from .files import load_checked, write_checkpoint
from .tokenizer import Tokenizer

MODEL_TYPE = "dialogen-discriminator"
CELLS = {"gru": nn.GRU, "lstm": nn.LSTM}


@dataclass
class DiscConfig:
    vocab_size: int
    sep_id: int  # closes each context turn
    cell: str = "gru"
    emb_dim: int = 128
    hidden: int = 128  # per direction
    n_layer: int = 1
    dropout: float = 0.1
    max_context: int = 192  # the newest context tokens read
    max_reply: int = 64

    def __post_init__(self):
        checks = [
            ("cell", self.cell in CELLS, f"one of {', '.join(CELLS)}"),
            ("vocab_size", self.vocab_size >= 1, ">= 1"),
            ("sep_id", 0 <= self.sep_id < self.vocab_size, f"in 0..{self.vocab_size - 1}"),
            ("emb_dim", self.emb_dim >= 1, ">= 1"),
            ("hidden", self.hidden >= 1, ">= 1"),
            ("n_layer", self.n_layer >= 1, ">= 1"),
            ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
            ("max_context", self.max_context >= 1, ">= 1"),
            ("max_reply", self.max_reply >= 1, ">= 1"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise UserError(f"discriminator {name} must be {rule}, got {getattr(self, name)!r}")


class Discriminator(nn.Module):
    def __init__(self, cfg: DiscConfig):
        super().__init__()
        self.cfg = cfg
        cell = CELLS[cfg.cell]
        between = cfg.dropout if cfg.n_layer > 1 else 0.0
        self.embed = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.context_rnn = cell(cfg.emb_dim, cfg.hidden, cfg.n_layer, batch_first=True, bidirectional=True, dropout=between)
        self.reply_rnn = cell(cfg.emb_dim, cfg.hidden, cfg.n_layer, batch_first=True, bidirectional=True, dropout=between)
        d = 2 * cfg.hidden
        self.judge = nn.Sequential(nn.Linear(4 * d, cfg.hidden), nn.Tanh(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, 1))

    def _read(self, rnn, ids, mask):
        """Max over the real tokens' outputs: (B, S) -> (B, 2H)."""
        lengths = mask.sum(1)
        packed = pack_padded_sequence(self.drop(self.embed(ids)), lengths.cpu(), batch_first=True, enforce_sorted=False)
        out = pad_packed_sequence(rnn(packed)[0], batch_first=True, total_length=ids.shape[1])[0]
        return out.masked_fill(~mask[:, :, None], float("-inf")).amax(1)

    def forward(self, context, context_mask, reply, reply_mask):
        """Right-padded id batches and their masks -> logits (B,) of P(human)."""
        c = self._read(self.context_rnn, context, context_mask.bool())
        r = self._read(self.reply_rnn, reply, reply_mask.bool())
        return self.judge(torch.cat([c, r, c * r, (c - r).abs()], dim=-1)).squeeze(-1)

    # --- texts -> batches -------------------------------------------------------------------
    def encode_pair(self, tokenizer, context, reply: str) -> tuple[list[int], list[int]]:
        """(context ids, reply ids): the context's turn texts each closed by the separator, newest
        `max_context` tokens; the reply's text (an empty reply is the separator alone)."""
        ctx: list[int] = []
        for m in context:
            if m.role != "system":
                ctx += tokenizer.encode_text(m.content) + [self.cfg.sep_id]
        rep = tokenizer.encode_text(reply)[: self.cfg.max_reply] or [self.cfg.sep_id]
        return (ctx[-self.cfg.max_context:] or [self.cfg.sep_id]), rep

    def batch(self, pairs: list[tuple[list[int], list[int]]]):
        """Encoded pairs -> (context, context_mask, reply, reply_mask) tensors."""
        ctx = _pad([c for c, _ in pairs])
        rep = _pad([r for _, r in pairs])
        return ctx[0], ctx[1], rep[0], rep[1]

    @torch.no_grad()
    def prob_human(self, pairs: list[tuple[list[int], list[int]]], batch_size: int = 64) -> list[float]:
        was = self.training
        self.eval()
        out = []
        for s in range(0, len(pairs), batch_size):
            out += torch.sigmoid(self(*self.batch(pairs[s:s + batch_size]))).tolist()
        self.train(was)
        return out


def _pad(rows: list[list[int]]):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return ids, mask


# --- training -------------------------------------------------------------------------------
def d_loss(disc: Discriminator, human: list, machine: list) -> tuple[torch.Tensor, float]:
    """Binary cross-entropy on human (label 1) vs machine (label 0) encoded pairs; and accuracy."""
    logits = disc(*disc.batch(human + machine))
    labels = torch.cat([torch.ones(len(human)), torch.zeros(len(machine))])
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    acc = float(((logits > 0).float() == labels).float().mean())
    return loss, acc


def accuracy(disc: Discriminator, human: list, machine: list, batch_size: int = 64) -> float:
    """Fraction judged right: human pairs P >= 0.5, machine pairs P < 0.5."""
    ph, pm = disc.prob_human(human, batch_size), disc.prob_human(machine, batch_size)
    right = sum(p >= 0.5 for p in ph) + sum(p < 0.5 for p in pm)
    return right / max(len(ph) + len(pm), 1)


# --- checkpoints ----------------------------------------------------------------------------
def save_discriminator(directory, disc: Discriminator, tokenizer, meta: dict) -> Path:
    conf = {"model_type": MODEL_TYPE, "architectures": ["DialogenDiscriminator"], **asdict(disc.cfg),
            "tokenizer_fingerprint": tokenizer.fingerprint()}
    return write_checkpoint(directory, disc.state_dict(), conf, tokenizer, meta)


def load_discriminator(path, flag: str = "--discriminator"):
    """(discriminator, tokenizer, meta) from a checkpoint dir; errors name `flag`."""
    path = Path(path).expanduser()
    conf_path = path / "config.json"
    try:
        conf = json.loads(conf_path.read_text())
    except OSError:
        raise UserError(f"{flag} {path}: not a discriminator checkpoint (no config.json)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{flag} {conf_path}: not valid JSON ({e})") from None
    if conf.get("model_type") != MODEL_TYPE:
        raise UserError(f"{flag} {path}: model_type {conf.get('model_type')!r} is not a discriminator "
                        f"(train one with `dialogen train-discriminator`)")
    if not isinstance(conf, dict):
        raise UserError(f"{flag} {conf_path}: expected a JSON object")
    cfg = config_from_dict(DiscConfig, conf, f"{flag} {conf_path}", required=("vocab_size", "sep_id"))
    disc = load_checked(Discriminator, cfg, path, f"{flag} {path}")
    meta_path = path / "dialogen.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return disc, Tokenizer.from_dir(path), meta


def check_tokenizer(disc_tokenizer, generator_tokenizer, flag: str = "--discriminator", generator_flag: str = "--generator"):
    """The discriminator reads the generator's token ids: their vocabularies must be the same."""
    a, b = disc_tokenizer.fingerprint(), generator_tokenizer.fingerprint()
    if a != b:
        raise UserError(f"{flag}: its tokenizer (fingerprint {a}) does not match the {generator_flag} model's "
                        f"({b}); train the discriminator with that model's tokenizer")
