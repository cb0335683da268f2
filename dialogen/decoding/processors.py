"""Pure logits -> logits functions, and the sampler. Every random draw takes a torch.Generator."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..errors import UserError


@dataclass
class Sampling:
    temperature: float = 0.3  # 0 -> greedy
    top_k: int = 40  # 0 -> off
    top_p: float = 0.9  # 1 -> off
    repetition_penalty: float = 1.1  # 1 -> off; over the last `penalty_window` tokens
    frequency_penalty: float = 0.0  # subtracted once per earlier occurrence in the reply
    presence_penalty: float = 0.0  # subtracted once if the token occurred in the reply
    no_repeat_ngram: int = 0  # 0 -> off; never emit an n-gram that already occurred
    penalty_window: int = 64
    max_new_tokens: int = 256
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self):
        checks = [
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_k", self.top_k >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("frequency_penalty", self.frequency_penalty >= 0, ">= 0"),
            ("presence_penalty", self.presence_penalty >= 0, ">= 0"),
            ("no_repeat_ngram", self.no_repeat_ngram >= 0, ">= 0"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise UserError(f"--{name.replace('_', '-')} must be {rule}, got {getattr(self, name)}")

    def replace(self, **changes) -> "Sampling":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def repetition_penalty(logits, history: list[int], penalty: float):
    """Positive logits divided by the penalty, negative ones multiplied (CTRL's rule)."""
    if penalty == 1.0 or not history:
        return logits
    idx = torch.tensor(sorted(set(history)), dtype=torch.long)
    picked = logits[idx]
    logits = logits.clone()
    logits[idx] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def frequency_presence(logits, reply: list[int], frequency: float, presence: float):
    if not reply or (frequency == 0 and presence == 0):
        return logits
    counts = torch.bincount(torch.tensor(reply), minlength=logits.shape[-1]).to(logits.dtype)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def banned_ngram_tokens(ids: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in `ids`."""
    if n <= 0 or len(ids) < n:
        return []
    prefix = tuple(ids[len(ids) - n + 1:]) if n > 1 else ()
    return [ids[i + n - 1] for i in range(len(ids) - n + 1) if tuple(ids[i:i + n - 1]) == prefix]


def top_k_filter(logits, k: int):
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p: float):
    """Keep the smallest set of tokens whose probability reaches p (always at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) >= p  # mass before this token already reaches p
    drop[..., 0] = False
    mask = torch.zeros_like(drop).scatter(-1, order, drop)
    return logits.masked_fill(mask, float("-inf"))


def next_token(logits, s: Sampling, generator: torch.Generator | None, history: list[int], reply: list[int]) -> int:
    """One decoding step on (V,) logits."""
    logits = logits.float()
    window = history[-s.penalty_window:] if s.penalty_window > 0 else history
    logits = repetition_penalty(logits, window, s.repetition_penalty)
    logits = frequency_presence(logits, reply, s.frequency_penalty, s.presence_penalty)
    banned = banned_ngram_tokens(reply, s.no_repeat_ngram)
    if banned:
        logits = logits.clone()
        logits[banned] = float("-inf")
    if s.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / s.temperature
    if 0 < s.top_k < logits.shape[-1]:  # sample among the k best: top-p then sorts k values, not the vocabulary
        values, index = torch.topk(logits, s.top_k)
        values = top_p_filter(values, s.top_p)
        return int(index[torch.multinomial(values.softmax(-1), 1, generator=generator)])
    logits = top_p_filter(logits, s.top_p)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
