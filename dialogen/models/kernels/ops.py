"""The native products, one Python function per C entry point: block matrix products with the RMS
norm or SwiGLU fused in, one-token attention over each row's own KV cache, and a whole llama block
for one new token per row."""

from __future__ import annotations

import ctypes

import torch

from .library import check, lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def qmatmul(ggml_type: int, blocks: torch.Tensor, n: int, k: int, x: torch.Tensor, bias=None, out=None,
            norm=None, eps: float = 0.0, swiglu: bool = False, into=None) -> torch.Tensor:
    """x (R, k) -> (R, n) through weights kept as blocks of a `formats.FORMATS` type (n, k / block *
    bytes), or tiled (`formats.tile`, with TILED in `ggml_type`); k is a multiple of 32 and of the block.

    `norm`: an RMSNorm weight applied to x first; `swiglu`: x is (R, 2k) [gate | up] and
    silu(gate) * up is multiplied; `out`: add the product into this (R, n) tensor instead; `into`:
    write it into this contiguous tensor of R * n values (returned as it is)."""
    x = x.contiguous()
    R = x.shape[0]
    y = out if out is not None else torch.empty(R, n) if into is None else into
    if status := lib().qmatmul(ggml_type, blocks.data_ptr(), n, k, x.data_ptr(), R, y.data_ptr(), _ptr(bias),
                               int(out is not None), _ptr(norm), eps, int(swiglu), torch.get_num_threads()):
        check(status, "qmatmul")
    return y


def attend_decode(qkv: torch.Tensor, n_head: int, n_kv: int, head_dim: int, k_ptrs, v_ptrs, caps, slots,
                  key_mask=None, cos=None, sin=None) -> torch.Tensor:
    """One new token per row: rotary on its q and k (cos/sin (B, hd/2)), k and v written into the
    row's cache at `slots[b]`, attention over slots 0..slots[b]. qkv (B, width) is changed in place.
    k_ptrs/v_ptrs/caps/slots are int64 tensors (B,); key_mask (B, S) uint8 or None.
    Returns (B, n_head * head_dim)."""
    B = qkv.shape[0]
    out = torch.empty(B, n_head * head_dim)
    mask = key_mask
    if status := lib().attend_decode(B, n_head, n_kv, head_dim, qkv.data_ptr(), k_ptrs.data_ptr(), v_ptrs.data_ptr(),
                                     caps.data_ptr(), slots.data_ptr(), _ptr(mask),
                                     0 if mask is None else mask.shape[1], _ptr(cos), _ptr(sin), out.data_ptr(),
                                     torch.get_num_threads()):
        check(status, "attention")
    return out


class BlockWeights(ctypes.Structure):
    """`block_weights` of kernels.c: one llama block's shapes and weight addresses."""

    _fields_ = [(n, ctypes.c_int) for n in ("d", "nh", "nkv", "hd", "ff")] + [("eps", ctypes.c_float)] + \
        [(n, ctypes.c_void_p) for n in ("norm1", "norm2", "qkv_bias")] + \
        [(n, ctypes.c_int) for n in ("qkv_type", "o_type", "gate_up_type", "down_type")] + \
        [(n, ctypes.c_void_p) for n in ("qkv", "o", "gate_up", "down")]


def block_weights(n_head: int, n_kv: int, head_dim: int, eps: float, norm1: torch.Tensor, norm2: torch.Tensor,
                  qkv_bias: torch.Tensor | None, d: int, ff: int, products: list[tuple[int, int]]) -> BlockWeights:
    """The fused step's view of a llama block: the two RMS norms' weights and the (type number,
    address) of its four products (qkv, o_proj, gate_up, down). It holds addresses only: the caller
    keeps the tensors alive."""
    names = ("qkv", "o", "gate_up", "down")
    return BlockWeights(d=d, nh=n_head, nkv=n_kv, hd=head_dim, ff=ff, eps=eps, norm1=norm1.data_ptr(),
                        norm2=norm2.data_ptr(), qkv_bias=_ptr(qkv_bias),
                        **{f"{name}_type": t for name, (t, _) in zip(names, products)},
                        **{name: at for name, (_, at) in zip(names, products)})


def block_decode(weights: BlockWeights, x: torch.Tensor, k_ptrs, v_ptrs, caps, slots, key_mask=None, cos=None,
                 sin=None):
    """A whole llama block for one new token per row, in place on the residual stream x (B, d)."""
    if status := lib().block_decode(ctypes.byref(weights), x.data_ptr(), x.shape[0], k_ptrs.data_ptr(),
                                    v_ptrs.data_ptr(), caps.data_ptr(), slots.data_ptr(), _ptr(key_mask),
                                    0 if key_mask is None else key_mask.shape[1], _ptr(cos), _ptr(sin),
                                    torch.get_num_threads()):
        check(status, "block step")
