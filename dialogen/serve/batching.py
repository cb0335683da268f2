"""One decode step for many conversations at once, each with its own KV cache.

The server keeps one KV cache per conversation, of different lengths. Stacking them into one
padded batch cache every step would copy every cache every step; instead the projections and
MLPs (where the time goes) run on the whole batch (B, 1, d), and only attention runs row by row
against each row's own cache. The result equals B separate `model(ids (1, 1), cache)` calls.

Works for the transformer families (llama, gpt2) of `models/transformer.py`; other models are
stepped one row at a time by the worker (`can_batch` says which).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.transformer import Transformer, apply_rope, rope_tables


def can_batch(model) -> bool:
    return isinstance(model, Transformer)


def _attend_rows(attn, x, rope, caches):
    """Self-attention of one new token per row, row i against caches[i]. x: (B, 1, d)."""
    cfg = attn.cfg
    B = x.shape[0]
    hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
    q, k, v = attn.qkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    q = q.view(B, 1, nh, hd).transpose(1, 2)  # (B, nh, 1, hd)
    k = k.view(B, 1, nkv, hd).transpose(1, 2)  # (B, nkv, 1, hd)
    v = v.view(B, 1, nkv, hd).transpose(1, 2)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out = []
    for i, cache in enumerate(caches):
        n = cache.length
        cache.k[attn.layer][:, :, n : n + 1] = k[i : i + 1]
        cache.v[attn.layer][:, :, n : n + 1] = v[i : i + 1]
        ki = cache.k[attn.layer][:, :, : n + 1]  # (1, nkv, n+1, hd)
        vi = cache.v[attn.layer][:, :, : n + 1]
        # the query heads sharing a kv head attend together, as a (group, hd) block of queries
        qi = q[i : i + 1].reshape(1, nkv, nh // nkv, hd)
        out.append(F.scaled_dot_product_attention(qi, ki, vi).reshape(1, nh, 1, hd))
    y = torch.cat(out).transpose(1, 2).reshape(B, 1, nh * hd)
    return attn.o_proj(y)


@torch.inference_mode()
def decode_rows(model: Transformer, tokens: list[int], caches: list) -> torch.Tensor:
    """Feed token i after caches[i] (each a batch-1 KVCache); return next-token logits (B, V)."""
    cfg = model.cfg
    ids = torch.tensor(tokens, dtype=torch.long)[:, None]  # (B, 1)
    positions = torch.tensor([c.length for c in caches], dtype=torch.long)[:, None]  # (B, 1)
    x = model.embed(ids)
    rope = None
    if cfg.arch == "gpt2":
        if int(positions.max()) >= cfg.max_seq_len:
            raise ValueError(f"sequence longer than the model's {cfg.max_seq_len} positions")
        x = x + model.pos_embed(positions)
    else:
        rope = rope_tables(cfg, positions)
    for cache in caches:
        cache.reserve(1)
    for block in model.blocks:
        x = x + _attend_rows(block.attn, block.norm1(x), rope, caches)
        x = x + block.mlp(block.norm2(x))
    for cache in caches:
        cache.length += 1
    return model.lm_head(model.norm(x))[:, -1]
