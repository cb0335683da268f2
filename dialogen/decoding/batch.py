"""Generation for many prompts at once: one batch, one cache, rows dropped as they finish.

Prompts of different lengths are left-padded: `key_mask` hides the padding from attention and
`positions` count real tokens only, so every row decodes exactly as it would alone. Several
replies to one prompt (`sample_replies`) share a single prefill copied into every row.

Each row draws from its own generator (seed + row index), so row i of a batch samples the same
reply as a one-prompt run seeded with seed + i.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .beam import Candidate
from .generate import TokenLoop, make_generator
from .settings import Sampling
from .stops import StopMatcher


def reply_text(tokenizer, tokens: list[int], stops: list[str]) -> tuple[str, bool]:
    """Decoded reply cut at the first stop string; True when a stop string was found."""
    text = tokenizer.decode(tokens) if tokenizer is not None else ""
    cut = False
    for s in stops:
        if s and s in text:
            text, cut = text[: text.index(s)], True
    return text.rstrip("\ufffd"), cut


def _generators(n: int, seed: int | None) -> list[torch.Generator]:
    return [make_generator(None if seed is None else seed + i) for i in range(n)]


def _left_pad(prompts: list[list[int]], pad_id: int):
    """(ids (B, W), key_mask (B, W) or None when all prompts have one length)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    key_mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        key_mask[i, width - len(p):] = True
    if bool(key_mask.all()):
        return ids, None
    return ids, key_mask


@torch.inference_mode()
def generate_batch(model, prompts: list[list[int]], s: Sampling, stop_ids: set[int], tokenizer=None,
                   pad_id: int = 0) -> list[Candidate]:
    """One reply per prompt, in prompt order."""
    if not prompts or any(not p for p in prompts):
        raise UserError("batched generation needs at least one prompt, and no empty prompt")
    ids, key_mask = _left_pad(prompts, pad_id)
    cache = model.new_cache(len(prompts))
    if key_mask is None:
        logits = model(ids, cache)[:, -1]
    else:
        positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = model(ids, cache, positions=positions, key_mask=key_mask)[:, -1]
    return _decode(model, cache, logits, [list(p) for p in prompts], s, stop_ids, key_mask,
                   _generators(len(prompts), s.seed), tokenizer)


@torch.inference_mode()
def sample_replies(model, prompt: list[int], n: int, s: Sampling, stop_ids: set[int],
                   tokenizer=None) -> list[Candidate]:
    """n replies to one prompt, the prompt encoded once."""
    if n < 1:
        raise UserError(f"--num-candidates must be >= 1, got {n}")
    if not prompt:
        raise UserError("generation needs a non-empty prompt")
    cache = model.new_cache(1)
    logits = model(torch.tensor([prompt], dtype=torch.long), cache)[:, -1]  # (1, V)
    if n > 1:
        cache.reorder(torch.zeros(n, dtype=torch.long))
        logits = logits.expand(n, -1)
    return _decode(model, cache, logits, [list(prompt) for _ in range(n)], s, stop_ids, None,
                   _generators(n, s.seed), tokenizer)


def _decode(model, cache, logits, histories: list[list[int]], s: Sampling, stop_ids: set[int], key_mask,
            gens: list[torch.Generator], tokenizer) -> list[Candidate]:
    """The decoding loop shared by both entry points; `histories[i]` is row i's prompt, grown in place."""
    n = len(histories)
    replies: list[list[int]] = [[] for _ in range(n)]
    out: list[Candidate | None] = [None] * n
    logprob = [0.0] * n
    rows = list(range(n))  # cache row r holds example rows[r]
    first = StopMatcher(s.stop)
    stops = [first] + [first.fresh() for _ in range(n - 1)]  # one per row, one set of tables
    loops = [TokenLoop(model, tokenizer, s, stop_ids, histories[i], replies[i], logits.shape[-1], gens[i], stops[i])
             for i in range(n)]
    decode = bool(s.stop) and tokenizer is not None  # the text matters only for stop strings
    for _ in range(max(loop.limit for loop in loops)):
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
        keep, feed = [], []
        for r, i in enumerate(rows):
            tok, _ = loops[i].choose(logits[r])
            logprob[i] += float(logp[r, tok])
            reason = loops[i].take(tok, decode)
            if reason is not None:
                out[i] = Candidate(replies[i], logprob[i], finish_reason=reason,
                                   stop_token=tok if tok in stop_ids else None)
                continue
            keep.append(r)
            feed.append(tok)
        if not keep:
            break
        if keep != list(range(len(rows))):  # finished rows leave the batch
            index = torch.tensor(keep, dtype=torch.long)
            cache.reorder(index)
            key_mask = key_mask.index_select(0, index) if key_mask is not None else None
        rows = [rows[r] for r in keep]
        tokens = torch.tensor(feed, dtype=torch.long)[:, None]  # (B', 1)
        if key_mask is None:
            logits = model(tokens, cache)[:, -1]
        else:
            key_mask = torch.cat([key_mask, torch.ones(len(rows), 1, dtype=torch.bool)], dim=1)
            positions = torch.tensor([[len(histories[i]) - 1] for i in rows])  # real tokens before it
            logits = model(tokens, cache, positions=positions, key_mask=key_mask)[:, -1]
    for i in range(n):
        if out[i] is None:
            out[i] = Candidate(replies[i], logprob[i], finish_reason="length")
        out[i].text = reply_text(tokenizer, out[i].tokens, s.stop)[0]
        out[i].score = out[i].logprob / max(out[i].length, 1)
    return out
