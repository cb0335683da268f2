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
        if h.requires_grad and not any(p.requires_grad for p in model.lm_head.parameters()):
            return FrozenHeadLoss.apply(h[keep], model, targets[keep]), keep.sum()
        logits = model.head(h[keep])  # (N, V)
    else:  # other families: full logits
        logits = model(ids)[:, :-1][keep]
    loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, keep.sum()


HEAD_CHUNK_VALUES = 1 << 22  # logits of one chunk of positions: 16 MB in float32


class FrozenHeadLoss(torch.autograd.Function):
    """sum of -log p(target) under `model.head(h)`, for a head with no trainable weight (a LoRA
    run's base): the logits are made a chunk of positions at a time, and each chunk's gradient with
    respect to h is taken at once, so no (N, V) logits, softmax or logit gradient is ever held whole
    (about 1.5 GB for 1,000 positions of a 128k vocabulary)."""

    @staticmethod
    def forward(ctx, h, model, targets):  # h (N, d), targets (N,)
        chunk = max(1, HEAD_CHUNK_VALUES // model.cfg.vocab_size)
        total, grads = torch.zeros((), device=h.device), []
        for i in range(0, h.shape[0], chunk):
            with torch.enable_grad():
                hc = h[i:i + chunk].detach().requires_grad_()
                loss = F.cross_entropy(model.head(hc).float(), targets[i:i + chunk], reduction="sum")
                grads.append(torch.autograd.grad(loss, hc)[0])
            total += loss.detach()
        ctx.save_for_backward(torch.cat(grads) if grads else torch.zeros_like(h))
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g, None, None


class LossModel(nn.Module):
    """Wraps a model so one forward returns its loss: DistributedDataParallel syncs gradients
    only through its wrapper's forward, so the whole loss computation must be one."""

    def __init__(self, model: nn.Module, adapter: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.adapter = adapter  # hooked into the model's Linears (models/lora.py): a child, so DDP syncs it

    def forward(self, ids, labels, segments=None):
        return nll_sum(self.model, ids, labels, segments)
