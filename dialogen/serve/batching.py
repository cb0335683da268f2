"""One decode step for many conversations at once, each with its own KV cache.

The server keeps one KV cache per conversation, of different lengths. The step runs the model's
own forward pass over all of them as one batch (`CacheBatch`): the projections and MLPs multiply
all rows together, and one native attention call per layer lets each row attend to its own cache
in place, without copying caches into a padded batch. The result equals B separate
`model(ids (1, 1), cache)` calls.

Works for the transformer families (llama, gpt2) of `models/transformer.py` where the native
kernels are built; other models are stepped one row at a time by the worker (`can_batch` says which).
"""

from __future__ import annotations

import torch

from ..models import kernels
from ..models.transformer import CacheBatch, Transformer


def can_batch(model) -> bool:
    return isinstance(model, Transformer) and kernels.enabled()


@torch.inference_mode()
def next_logits(model: Transformer, ids: list[int], cache) -> torch.Tensor:
    """Feed `ids` after a batch-1 cache; the next-token logits (V,)."""
    return model.next_logits(torch.tensor([ids], dtype=torch.long), cache)[0]


@torch.inference_mode()
def decode_rows(model: Transformer, tokens: list[int], caches: list) -> torch.Tensor:
    """Feed token i after caches[i] (each a batch-1 KVCache); return next-token logits (B, V)."""
    ids = torch.tensor(tokens, dtype=torch.long)[:, None]  # (B, 1)
    return model(ids, CacheBatch(caches))[:, -1]
