"""One step for many conversations at once, each with its own KV cache.

The server keeps one KV cache per conversation, of different lengths. The step runs the model's
own forward pass over all of them as one batch (`CacheBatch`): every new token is a row (a decode
step's one token, or a prompt's tokens), the projections and MLPs multiply all rows together, and
one native attention call per layer lets each row attend to its own cache in place, without
copying caches into a padded batch. The result equals separate `model(ids, cache)` calls.

Works for the transformers whose native attention was swapped in at load (`models/native.py`,
where the kernels are built and the family's attention is supported); other models are stepped
one row at a time by the worker (`can_batch` says which).
"""

from __future__ import annotations

import torch

from ..models.transformer import CacheBatch, Transformer


def can_batch(model) -> bool:
    """Whether the model's native attention is swapped in (`models.native.swap_in`) and enabled."""
    return isinstance(model, Transformer) and model.native is not None and model.native.can_batch


def prompts_as_rows(model) -> bool:
    """Whether a prompt's tokens join a step as rows (the model multiplies blocks)."""
    return can_batch(model) and model.native.prompts_as_rows


@torch.inference_mode()
def next_logits(model: Transformer, ids: list[int], cache) -> torch.Tensor:
    """Feed `ids` after a batch-1 cache; the next-token logits (V,)."""
    return model.next_logits(torch.tensor([ids], dtype=torch.long), cache)[0]


@torch.inference_mode()
def step_rows(model: Transformer, segments: list[tuple[object, list[int]]]) -> torch.Tensor:
    """One step for many conversations: feed each (cache, token ids) pair's ids after its batch-1
    cache (one id for a decode row, several for a prompt or a chunk of one), all as rows of one
    native step; return each conversation's next-token logits (len(segments), V)."""
    ids = torch.tensor([t for _, tokens in segments for t in tokens], dtype=torch.long)[:, None]  # (R, 1)
    return model.next_logits(ids, CacheBatch([c for c, _ in segments], [len(t) for _, t in segments]))


def decode_rows(model: Transformer, tokens: list[int], caches: list) -> torch.Tensor:
    """Feed token i after caches[i] (each a batch-1 KVCache); return next-token logits (B, V)."""
    return step_rows(model, [(c, [t]) for t, c in zip(tokens, caches)])
