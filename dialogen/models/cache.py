"""KV caches of the transformer, laid out for both decode paths.

`KVCache` keeps one buffer for all layers, (2, L, B, n_kv_head, capacity, head_dim), grown in chunks, so
each row's keys of a layer are one contiguous block: the plain torch path slices it, and the native
kernel attends to it in place through `KernelTable`'s addresses. `CacheBatch` steps many batch-1
caches (the server's conversations) as one batch without copying them.
"""

from __future__ import annotations

import torch

CHUNK = 256  # positions: a cache grows to at least its need rounded up to a multiple of this


class KVCache:
    """Keys and values of every layer for a batch, grown in chunks; `length` tokens are valid.

    Each layer's buffer is (B, n_kv_head, capacity, head_dim), so a row's keys are one contiguous
    block: the native decode kernel attends to them in place through `table()`'s pointers."""

    def __init__(self, cfg, batch: int = 1, dtype=torch.float32, capacity: int = 256):  # cfg: transformer.Config
        self.cfg, self.batch, self.dtype = cfg, batch, dtype
        self.length = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        # the token ids, kept for a model that recomputes its cache at some length (LongRoPE's switch)
        self.ids = torch.zeros(batch, 0, dtype=torch.long) if cfg.rope.get("rope_type") == "longrope" else None
        self._alloc(capacity)

    def _alloc(self, capacity: int):
        cfg = self.cfg
        kv = torch.zeros(2, cfg.n_layer, self.batch, cfg.n_kv_head, capacity, cfg.head_dim, dtype=self.dtype)
        if self.k:
            kv[..., : self.length, :] = self.kv[..., : self.length, :]
        self.kv, self.capacity = kv, capacity  # one buffer: a reorder is one copy for all layers
        if self.ids is not None:
            ids = torch.zeros(self.batch, capacity, dtype=torch.long)
            ids[:, : self.length] = self.ids[:, : self.length]
            self.ids = ids
        self._views()
        self._table = self._rows = None

    def _views(self):
        """Per layer (B, n_kv_head, capacity, head_dim) views of the buffer (plain selects: writable)."""
        L = self.cfg.n_layer
        self.k, self.v = [self.kv[0, i] for i in range(L)], [self.kv[1, i] for i in range(L)]

    def reserve(self, n_new: int):
        need = self.length + n_new
        if need > self.capacity:  # by half again at least (the copies stay amortized)
            self._alloc(max(-(-need // CHUNK) * CHUNK, self.capacity + self.capacity // 2))

    def advance(self, n_new: int):
        self.length += n_new

    def truncate(self, length: int):
        self.length = min(length, self.length)

    def positions(self, batch: int, n_new: int) -> torch.Tensor:
        """(B, T) positions of the next n_new tokens of every row."""
        return torch.arange(self.length, self.length + n_new).expand(batch, n_new)

    def reorder(self, index: torch.Tensor):
        """Select batch rows (beam search): row i becomes old row index[i]."""
        if len(index) == self.batch:  # in place, valid tokens only: the buffers (and their addresses) stay
            moved = (index != torch.arange(self.batch)).nonzero().flatten()  # rows that take another's tokens
            if len(moved):  # the right side is gathered (copied) before the write
                self.kv[:, :, moved, :, : self.length] = self.kv[:, :, index[moved], :, : self.length]
                if self.ids is not None:
                    self.ids[moved] = self.ids[index[moved]]
            return
        self.kv = self.kv.index_select(2, index)
        if self.ids is not None:
            self.ids = self.ids.index_select(0, index)
        self._views()
        self.batch = len(index)
        self._table = self._rows = None

    def table(self) -> "KernelTable":
        if self._table is None:
            self._table = KernelTable([self])
        self._table.slots.fill_(self.length)
        return self._table

    def row_addresses(self) -> list[tuple[list[int], list[int]]]:
        """Per row, the addresses of its keys and of its values in every layer."""
        if self._rows is None:
            step = [t.stride(0) * t.element_size() for t in self.k]
            self._rows = [([t.data_ptr() + b * s for t, s in zip(self.k, step)],
                           [t.data_ptr() + b * s for t, s in zip(self.v, step)]) for b in range(self.batch)]
        return self._rows

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def copy(self) -> "KVCache":
        """A new cache holding this one's valid tokens; the two grow apart from here."""
        out = KVCache(self.cfg, self.batch, self.dtype, capacity=max(self.length, 256))
        out.kv[..., : self.length, :] = self.kv[..., : self.length, :]
        if self.ids is not None:
            out.ids[:, : self.length] = self.ids[:, : self.length]
        out.length = self.length
        return out


class KernelTable:
    """Where each row's keys and values live, for the native attention kernel: per layer, one
    address per row (int64 (L, B)), each row's capacity and the slot its token goes to. A cache
    fed several tokens at once gives one row per token, at consecutive slots of the same cache."""

    def __init__(self, caches: list[KVCache], counts: list[int] | None = None):
        counts = counts or [1] * len(caches)
        rows = [r for c, n in zip(caches, counts) for r in c.row_addresses() for _ in range(n)]
        self.k = torch.tensor([k for k, _ in rows]).T.contiguous()  # (L, rows)
        self.v = torch.tensor([v for _, v in rows]).T.contiguous()
        self.caps = torch.tensor([c.capacity for c, n in zip(caches, counts) for _ in range(c.batch * n)])
        self.slots = torch.tensor([c.length + j for c, n in zip(caches, counts) for _ in range(c.batch)
                                   for j in range(n)])


class CacheBatch:
    """Many conversations' batch-1 caches stepped together (the server), `counts[i]` new tokens for
    cache i (one each by default): a decode row is one token, a prompt (or a chunk of it) several.

    `model(ids (R, 1), CacheBatch(caches, counts))`, R = sum(counts), the tokens of each cache in
    order, equals separate `model(ids[rows of i].view(1, -1), caches[i])` calls: every token is a
    row of one native step, attending to its own cache up to its own slot (the keys and values of
    all rows are written before any row attends), so a prompt's tokens see each other causally.
    The caches are read and written in place, never copied into a padded batch."""

    def __init__(self, caches: list[KVCache], counts: list[int] | None = None):
        self.caches, self.counts = caches, counts or [1] * len(caches)
        self.batch = sum(self.counts)
        self.dtype = caches[0].dtype

    @property
    def ends(self) -> list[int]:
        """The row of each cache's last new token."""
        out, at = [], -1
        for n in self.counts:
            at += n
            out.append(at)
        return out

    def reserve(self, n_new: int):
        for c, n in zip(self.caches, self.counts):
            c.reserve(n * n_new)

    def advance(self, n_new: int):
        for c, n in zip(self.caches, self.counts):
            c.length += n * n_new

    def positions(self, batch: int, n_new: int) -> torch.Tensor:
        return torch.tensor([[c.length + j] for c, n in zip(self.caches, self.counts) for j in range(n)])

    def table(self) -> KernelTable:
        return KernelTable(self.caches, self.counts)
