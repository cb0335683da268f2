"""Token-level negative log-likelihood on labelled positions only.

The language-model head is applied only where a label is set: with a 49k vocabulary the full
(B, T, V) logits would cost more memory than the rest of the step, and untrained positions
(the user's turns) need none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.dataset import IGNORE_INDEX
from ..models.family import is_encoder_decoder
from ..models.transformer import Transformer
from .replies import seq2seq_nll_sum


def nll_sum(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor,
            segments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p(label), number of labels) for ids/labels (B, T); label t is predicted
    from the tokens before it (of its own segment, for packed rows: `segments` (B, T))."""
    if is_encoder_decoder(model):  # each labelled run answers what precedes it

        return seq2seq_nll_sum(model, ids, labels)
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX
    if isinstance(model, Transformer):
        h = model.hidden(ids[:, :-1], None if segments is None else segments[:, :-1])  # the last token predicts nothing
        logits = model.head(h[keep])  # (N, V)
    else:  # other families: full logits
        logits = model(ids)[:, :-1][keep]
    loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, keep.sum()


class LossModel(nn.Module):
    """Wraps a model so one forward returns its loss: DistributedDataParallel syncs gradients
    only through its wrapper's forward, so the whole loss computation must be one."""

    def __init__(self, model: nn.Module, adapter: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.adapter = adapter  # hooked into the model's Linears (models/lora.py): a child, so DDP syncs it

    def forward(self, ids, labels, segments=None):
        return nll_sum(self.model, ids, labels, segments)
