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
from ..models.kernels import library
from ..models.kernels.grad import low_precision_slices
from ..models.quantized import BlockLinear
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
    (about 1.5 GB for 1,000 positions of a 128k vocabulary). A head of blocks multiplied in bfloat16
    goes by slices of its vocabulary instead (`sliced_head_loss`), each slice dequantized once."""

    @staticmethod
    def forward(ctx, h, model, targets):  # h (N, d), targets (N,)
        head = model.lm_head
        if isinstance(head, BlockLinear) and head.training and head.compute_dtype != torch.float32 \
                and library.enabled():
            total, grad = sliced_head_loss(h, model.cfg, head, targets)
            ctx.save_for_backward(grad)
            return total
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


def sliced_head_loss(h, cfg, head, targets):
    """(sum of -log p(target), its gradient with respect to h) under a head of blocks whose products
    are in bfloat16 (`head.compute_dtype`), in one pass over the vocabulary: each slice of the weight
    that `kernels.grad` makes (at most LOW_PRECISION_VALUES weights) is dequantized once, where a chunk
    of positions through `model.head` would dequantize every slice twice per chunk (80 slices of a
    128k x 2048 head for 150 positions; 8 this way). The log-sum-exp of each position runs over the
    slices (its running maximum rescales the sum and the gradient so far, as flash attention's softmax
    does); the gradient is sum_v p_v dl_v/dh - dl_t/dh, the sum over v != t gathered unnormalised in
    bfloat16 products (h and the logits' weights rounded as `BlockProduct` rounds them) and divided by
    the sum of exponentials at the end, the target's own term in float32."""
    n, d = h.shape
    dtype = head.compute_dtype
    if n and int(targets.max()) >= head.out_features:
        raise IndexError(f"target {int(targets.max())} is outside the head's {head.out_features} rows")
    top, sums = torch.full((n,), -torch.inf), torch.zeros(n)
    acc, picked, own = torch.zeros(n, d), torch.zeros(n), torch.zeros(n, d)  # own: dl_t/dh
    hl = h.detach().to(dtype)
    for s0, s1, w in low_precision_slices(head):
        chunk = max(1, HEAD_CHUNK_VALUES // (s1 - s0))
        for i in range(0, n, chunk):
            j = min(i + chunk, n)
            u = torch.mm(hl[i:j], w.T).float()  # (positions, slice)
            if head.bias is not None:
                u += head.bias[s0:s1]
            logits, slope = _scale_and_cap(u, cfg)
            new_top = torch.maximum(top[i:j], logits.max(dim=1).values)
            kept = torch.exp(top[i:j] - new_top)  # what the sums so far are worth under the new maximum
            e = torch.exp(logits - new_top[:, None])
            sums[i:j] = sums[i:j] * kept + e.sum(dim=1)
            g = e if slope is None else e * slope
            here = ((targets[i:j] >= s0) & (targets[i:j] < s1)).nonzero().squeeze(1)
            if len(here):
                cols = targets[i:j][here] - s0
                picked[i + here] = logits[here, cols]
                row = w[cols].float()
                own[i + here] = row if slope is None else row * slope[here, cols][:, None]
                g[here, cols] = 0  # the target's own term is added in float32 at the end
            acc[i:j] = acc[i:j] * kept[:, None] + torch.mm(g.to(dtype), w).float()
            top[i:j] = new_top
    nll = (top - picked) + sums.log()  # in this order: for a confident target top - picked is exact (0)
    # p_t dl_t/dh - dl_t/dh in float32: for a confident target (p_t near 1) it is a small difference that
    # bfloat16 products would lose
    return nll.sum(), acc / sums[:, None] - (1 - torch.exp(-nll))[:, None] * own


def _scale_and_cap(u, cfg):
    """(logits, d logits / d u or None for 1) of the head's products u: `Transformer.head`'s scale and cap."""
    slope = None
    if cfg.logit_scale != 1:
        u = u * cfg.logit_scale
        slope = torch.full_like(u, cfg.logit_scale)
    if cfg.final_softcap:
        t = torch.tanh(u / cfg.final_softcap)
        u = t * cfg.final_softcap
        slope = (1 - t * t) * (1 if slope is None else slope)
    return u, slope


class LossModel(nn.Module):
    """Wraps a model so one forward returns its loss: DistributedDataParallel syncs gradients
    only through its wrapper's forward, so the whole loss computation must be one."""

    def __init__(self, model: nn.Module, adapter: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.adapter = adapter  # hooked into the model's Linears (models/lora.py): a child, so DDP syncs it

    def forward(self, ids, labels, segments=None):
        return nll_sum(self.model, ids, labels, segments)
