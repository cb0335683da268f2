"""Gradient checkpointing: a transformer block run without keeping its activations, and run again
in the backward pass."""

from __future__ import annotations

import torch
import torch.utils.checkpoint


class Recomputed(torch.autograd.Function):
    """A block whose activations are not kept (gradient checkpointing): the forward pass runs it
    without a graph and keeps its input, and the backward pass runs it again from that input, under
    the same random state (the same dropout masks), then back-propagates through the new graph.

    Unlike torch's non-reentrant checkpoint, which records every op's graph node in the forward
    pass, nothing of a block but its input lives from one pass to the other. Those nodes are small
    and long-lived, and C's heap places them among the block's freed activations, so it cannot reuse
    those for the next block: the heap grows by several megabytes per block and step. As with torch's
    reentrant checkpoint, the block's weights get their gradients in `.grad` (`backward()`), not
    through `torch.autograd.grad`, which sees the block's input only."""

    @staticmethod
    def forward(ctx, x, block, step, input_grad: bool):  # runs without a graph, as every Function's forward
        ctx.block, ctx.step, ctx.rng, ctx.input_grad = block, step, torch.get_rng_state(), input_grad
        ctx.save_for_backward(x)  # a block that wrote into its input would fail the saved version check
        return block(x, step)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_(ctx.input_grad)
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.set_rng_state(ctx.rng)
            y = ctx.block(x, ctx.step)
        if y.requires_grad:
            torch.autograd.backward(y, g)  # into the block's trainable weights (an adapter's, all of them)
        return x.grad, None, None, None


def recomputed(block, x, step):
    """block(x, step) with its activations made again in the backward pass. On a CPU without
    autocast that is `Recomputed`, given an x that requires a gradient so that the backward pass
    reaches the block's weights when the input needs none (the first block of a frozen embedding),
    where it then computes none for x; elsewhere torch's checkpoint, which also restores the
    accelerator's random state and the autocast mode."""
    if x.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
        wanted = x.requires_grad
        return Recomputed.apply(x if wanted else x.detach().requires_grad_(), block, step, wanted)
    return torch.utils.checkpoint.checkpoint(block, x, step, use_reentrant=False)
