"""Pure logits -> logits functions, and the sampler. Every random draw takes a torch.Generator."""

from __future__ import annotations

import torch

from .settings import Sampling


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


def bias_logits(logits, bias: dict):
    """OpenAI's logit_bias on (..., V) logits: each bias added to its token's logit; a bias of -100
    bans the token outright (-inf), so no other term can bring it back."""
    if not bias:
        return logits
    idx = torch.tensor(list(bias), dtype=torch.long)
    val = torch.tensor([float(v) for v in bias.values()], dtype=logits.dtype)
    logits = logits.clone()
    logits[..., idx] += val
    banned = idx[val <= -100]
    if len(banned):
        logits[..., banned] = float("-inf")
    return logits


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


MIN_TEMPERATURE = 1e-6  # below it, logits divided by the temperature overflow float32 to inf (then NaN)


def shape_logits(logits, s: Sampling, history: list[int], reply: list[int], allowed=None):
    """(V,) float32 logits as the sampler draws from them: the repetition penalty (over the last
    `penalty_window` tokens of `history`), frequency and presence penalties (over `reply`), banned
    n-grams, `logit_bias` and, with `allowed` (a (V,) bool mask from a constraint), every other token at -inf;
    then divided by the temperature when it is above 0. Their log-softmax is what `logprobs`
    report; top-k and top-p cut the draw afterwards and are not part of it."""
    logits = logits.float()
    window = history[-s.penalty_window:] if s.penalty_window > 0 else history
    logits = repetition_penalty(logits, window, s.repetition_penalty)
    logits = frequency_presence(logits, reply, s.frequency_penalty, s.presence_penalty)
    logits = bias_logits(logits, s.logit_bias)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    banned = banned_ngram_tokens(reply, s.no_repeat_ngram)
    if banned:
        kept = logits.clone()
        kept[banned] = float("-inf")
        if allowed is None or bool(torch.isfinite(kept).any()):  # a grammar's only way on may be banned: it wins
            logits = kept
    if s.temperature > 0:
        logits = logits / max(s.temperature, MIN_TEMPERATURE)
    return logits


def draw(logits, s: Sampling, generator: torch.Generator | None) -> int:
    """A token from shaped (V,) logits: the best at temperature 0, else a sample within top-k and top-p."""
    if s.temperature == 0:
        return int(torch.argmax(logits))
    if 0 < s.top_k < logits.shape[-1]:  # sample among the k best: top-p then sorts k values, not the vocabulary
        values, index = torch.topk(logits, s.top_k)
        values = top_p_filter(values, s.top_p)
        return int(index[torch.multinomial(values.softmax(-1), 1, generator=generator)])
    logits = top_p_filter(logits, s.top_p)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def next_token(logits, s: Sampling, generator: torch.Generator | None, history: list[int], reply: list[int],
               allowed=None) -> int:
    """One decoding step on (V,) logits."""
    return draw(shape_logits(logits, s, history, reply, allowed), s, generator)


def token_logprobs(shaped, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """(log-probability of `token`, the `top` most likely tokens with theirs) under shaped (V,) logits."""
    logp = torch.log_softmax(shaped, dim=-1)
    alternatives = []
    if top > 0:
        values, index = torch.topk(logp, min(top, logp.shape[-1]))
        alternatives = [(int(i), float(v)) for i, v in zip(index, values)]
    return float(logp[token]), alternatives
