"""Several LoRA adapters on one base, each row of a step taking its own (multi-LoRA serving).

An `AdapterSet` hooks the base's Linears once, as a single `lora.Adapter` does. Before a forward
call, its caller says which adapter each group of rows takes (`AdapterSet.rows`): the base product
runs once over the whole batch, then each adapter adds its low-rank term to its own rows only,

    y[rows_k] += scale_k * (act(norm(x[rows_k])) A_k^T) B_k^T

and rows that take no adapter (the base) get nothing added. Rows are the first dimension of the
Linear's input: a server step's rows (one per new token of each conversation, `CacheBatch`) or the
batch of a plain call, where every row takes the same adapter. A fused native block bypasses its
Linears (and so their hooks): a call where some row takes an adapter runs its reference block
instead (the same products, one by one); a call of the base alone keeps the fused block.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .lora import Adapter, hooked_input, read_adapter
from .transformer import Block, Transformer


class AdapterSet:
    def __init__(self, adapters: dict[str, Adapter]):
        self.adapters = adapters  # name -> adapter, read for this base and not attached on their own
        self._groups: list[tuple[Adapter, torch.Tensor | None]] = []  # the current call's (adapter, rows or None: all)
        self.handles = []
        self._blocks: list[tuple[int, nn.Module, nn.Module]] = []  # (layer, fused block, its reference block)
        self._model: list[Transformer] = []  # the model hooked (in a list: not a child module)

    def attach(self, model: Transformer) -> "AdapterSet":
        """Hook every Linear some adapter adapts, and keep the reference block of each fused one."""
        self._model = [model]
        self._blocks = [(i, b, b.reference()) for i, b in enumerate(model.blocks)
                        if type(b) is not Block and hasattr(b, "reference")]
        targets = dict.fromkeys(ours for a in self.adapters.values() for ours in a.where)
        for ours in targets:
            module = model.get_submodule(ours)
            self.handles.append(module.register_forward_hook(self._hook(ours), with_kwargs=True))
        return self

    @contextmanager
    def rows(self, groups: list[tuple[str | None, int]]):
        """Within the block, forward calls apply adapters by row: `groups` are consecutive (adapter name
        or None for the base, number of rows) pairs covering the rows in order."""
        names = {name for name, n in groups if n}
        if len(names) <= 1:  # one adapter (or none) for every row: no rows picked out
            name = next(iter(names), None)
            self._groups = [] if name is None else [(self.adapters[name], None)]
        else:
            at, picked = 0, {}
            for name, n in groups:
                if name is not None:
                    picked.setdefault(name, []).append(torch.arange(at, at + n))
                at += n
            self._groups = [(self.adapters[name], torch.cat(idx)) for name, idx in picked.items()]
        blocks = self._model[0].blocks if self._blocks else None
        if self._groups and blocks is not None:  # the adapters' hooks run on the reference blocks' Linears
            for i, _, ref in self._blocks:
                blocks[i] = ref
        try:
            yield
        finally:
            self._groups = []
            if blocks is not None:
                for i, fused, _ in self._blocks:
                    blocks[i] = fused

    def _hook(self, ours: str):
        def hook(module, args, kwargs, output):
            if not self._groups:
                return output
            groups = [(adapter, idx) for adapter, idx in self._groups if ours in adapter.where]
            a, width = (hooked_input(args, kwargs) if groups else None), output.shape[-1]  # row by row: once
            for adapter, idx in groups:
                if idx is None:  # every row
                    output = output + adapter.delta(ours, a, width, False)
                else:  # (n, ..., out) added at the group's rows of (R, ..., out)
                    output = output.index_add(0, idx, adapter.delta(ours, a.index_select(0, idx), width, False))
            return output

        return hook


def read_adapter_set(named: list[tuple[str, str]], model: Transformer, base: Path | None) -> AdapterSet:
    """The adapters `named` ((name, directory) pairs) read for `model`, loaded from `base`, and hooked
    onto it. An adapter made for another base is refused in one line naming its directory."""
    if not isinstance(model, Transformer):
        raise UserError(f"LoRA adapters apply to transformer models, not this {type(model).__name__}")
    adapters = {}
    for name, directory in named:
        where = Path(directory).expanduser()
        if not where.is_dir() or not (where / "adapter_config.json").exists():
            raise UserError(f"{where}: not an adapter directory (no adapter_config.json) for the adapter {name!r}")
        adapters[name] = read_adapter(where, model.cfg, base)
    return AdapterSet(adapters).attach(model)
