"""GGUF's block formats as the native kernels keep them: the type table, quantizing float weights
into blocks, moving 4-bit blocks onto the 8-bit grid, the tiled order and dequantizing.

Every format is listed once in `FORMATS`, keyed by its GGUF type number; a tensor of a type not
listed there is dequantized to float32 when a file is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import library


@dataclass(frozen=True)
class Format:
    name: str  # the lower-case GGUF name, e.g. q4_0
    block: int  # weights per block, along the input dimension
    bytes: int  # bytes per block


# GGUF type number -> a block format the kernels multiply as shipped (kernels.c `block_bytes`,
# `block_values`; the K-quants' and IQ4's layouts are described in kquants.c)
FORMATS = {
    1: Format("f16", 1, 2),
    2: Format("q4_0", 32, 18),  # {f16 d; u8 qs[16]}         w = d * (q - 8)
    3: Format("q4_1", 32, 20),  # {f16 d; f16 m; u8 qs[16]}  w = d * q + m
    6: Format("q5_0", 32, 22),  # {f16 d; u32 qh; u8 qs[16]} w = d * (q - 16), 5-bit q
    7: Format("q5_1", 32, 24),  # {f16 d, m; u32 qh; u8 qs[16]}  w = d * q + m
    8: Format("q8_0", 32, 34),  # {f16 d; i8 qs[32]}         w = d * q
    10: Format("q2_k", 256, 84),
    11: Format("q3_k", 256, 110),
    12: Format("q4_k", 256, 144),
    13: Format("q5_k", 256, 176),
    14: Format("q6_k", 256, 210),
    20: Format("iq4_nl", 32, 18),  # {f16 d; u8 qs[16]}      w = d * level[q], 16 non-linear levels
    23: Format("iq4_xs", 256, 136),
    30: Format("bf16", 1, 2),
}
GGML_TYPES = {f.name: number for number, f in FORMATS.items()}  # name -> GGUF type number
TILED = 0x100  # or-ed into a type number: the weights are in the tiled order (`tile`)
TILE = 16  # output rows tiled together
QK = 32  # weights per block of the formats the kernels quantize into (int8, int4)


def tile(ggml_type: int, blocks, n: int, k: int) -> torch.Tensor | None:
    """The blocks of (n, k) weights in the tiled order (16 output rows together), (n / 16, tile bytes),
    which the AVX-512 VNNI build multiplies; None where this build or shape has no tiled product.
    The values are the blocks' own, reordered. `blocks`: a tensor, or a list of row parts (a fused
    projection's q, k and v), each tiled into its place without joining them first."""
    L = library.lib()
    parts = blocks if isinstance(blocks, (list, tuple)) else [blocks]
    size = 0 if L is None else L.tiled_bytes(ggml_type, n, k)
    if not size or any(len(p) % TILE for p in parts):
        return None
    out = torch.empty(n // TILE, size // (n // TILE), dtype=torch.uint8)
    row = 0
    for p in parts:
        L.tile_weights(ggml_type, p.contiguous().data_ptr(), len(p), k, out[row // TILE:].data_ptr(),
                       torch.get_num_threads())
        row += len(p)
    return out


def dequantize(ggml_type: int, blocks: torch.Tensor, n: int, k: int, threads: int | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Blocks of (n, k) weights -> float32 (n, k), the values exactly: by the native library where it
    is enabled (on `threads`, default torch's count), else by the gguf package (the formats' reference).
    Tiled weights (TILED in `ggml_type`, made only where the library is built) are always read by it.
    `out`: a contiguous (n, k) float32 or bfloat16 tensor to write (bfloat16: rounded as `Tensor.to`
    rounds, with no float32 copy of the whole)."""
    threads = threads or torch.get_num_threads()
    if library.enabled() or ggml_type & TILED:
        if out is not None and out.dtype == torch.bfloat16:
            library.check(library.lib().dequantize_bf16(ggml_type, blocks.contiguous().data_ptr(), n, k,
                                                        out.data_ptr(), threads), "dequantize")
            return out
        if out is not None and out.dtype != torch.float32:
            return out.copy_(dequantize(ggml_type, blocks, n, k, threads))
        out = torch.empty(n, k) if out is None else out
        library.lib().dequantize(ggml_type, blocks.contiguous().data_ptr(), n, k, out.data_ptr(), threads)
        return out
    import gguf  # only here: importing it costs a fifth of a second of every start

    raw = blocks.contiguous().numpy().reshape(n, -1)
    w = torch.from_numpy(gguf.quants.dequantize(raw, ggml_type).astype(np.float32).reshape(n, k))
    return w if out is None else out.copy_(w)


def dequantize_rows(ggml_type: int, blocks: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Rows `ids` (n,) of blocks of (rows, k) weights (or tiled) -> float32 (n, k): an embedding lookup.
    One row (a decode step) of blocks is read in place, without gathering its bytes first."""
    n = ids.numel()
    if ggml_type & TILED:  # rows from their groups of TILE rows (the tiled order keeps a group together)
        ids = ids.reshape(-1)
        groups = dequantize(ggml_type, blocks.index_select(0, ids // TILE), n * TILE, k, threads=1 if n <= 64 else None)
        return groups.view(n, TILE, k)[torch.arange(n), ids % TILE]
    if n == 1 and library.enabled():
        out = torch.empty(1, k)
        at = blocks.data_ptr() + int(ids) * blocks.stride(0)
        library.lib().dequantize(ggml_type, at, 1, k, out.data_ptr(), 1)
        return out
    return dequantize(ggml_type, blocks.index_select(0, ids.reshape(-1)), n, k, threads=1 if n <= 64 else None)


def quantize(w: torch.Tensor, kind: str) -> torch.Tensor:
    """float (n, k) -> blocks (n, k/32 * bytes) of `kind` (q8_0 or q4_1), as GGUF stores them."""
    n, k = w.shape
    g = w.detach().float().reshape(n, k // QK, QK)
    if kind == "q8_0":
        d = (g.abs().amax(-1) / 127).half()
        inv = torch.where(d.float() > 0, 1 / d.float(), torch.zeros(()))
        q = (g * inv[..., None]).round().clamp(-127, 127).to(torch.int8)
        parts = [d.view(torch.uint8).reshape(n, -1, 2), q.view(torch.uint8)]
    elif kind == "q4_1":
        lo, hi = g.amin(-1), g.amax(-1)
        d = ((hi - lo) / 15).half()
        m = lo.half()
        inv = torch.where(d.float() > 0, 1 / d.float(), torch.zeros(()))
        q = ((g - m.float()[..., None]) * inv[..., None]).round().clamp(0, 15).to(torch.uint8)
        nib = q[..., :16] | (q[..., 16:] << 4)
        parts = [d.view(torch.uint8).reshape(n, -1, 2), m.view(torch.uint8).reshape(n, -1, 2), nib]
    else:
        raise ValueError(f"unknown block kind {kind!r}")
    return torch.cat(parts, dim=-1).reshape(n, -1).contiguous()


def requantize_q8_0(kind: str, blocks: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Q4_0/Q4_1 blocks (n, k) -> Q8_0 blocks of the same values, rounded as little as the 8-bit grid allows.

    A 4-bit block's values are d*q + m (q = 0..15; Q4_0: m = -8d). With the Q8_0 scale d/j
    (j = 1..16), q lands on j*q exactly, and only m is rounded: the error is the same for the
    block's 32 weights, (m - d/j * round(j*m/d)). Each block takes the j with the least error whose
    integers fit in [-127, 127], or the plain scale max|v|/127 where that is closer; a Q4_0 block is
    kept exactly (j = 1). This rounds the weights with less squared error than quantizing their float
    values afresh."""
    nb = k // QK
    width = 20 if kind == "q4_1" else 18
    b = blocks.reshape(n, nb, width)
    d = b[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)
    m = b[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1) if kind == "q4_1" else -8 * d
    qs = b[..., width - 16:]
    q = torch.cat([qs & 15, qs >> 4], -1).float()  # weight i in the low nibble of byte i, i + 16 in the high
    v = d[..., None] * q + m[..., None]
    j = torch.arange(1, 17, dtype=torch.float32)
    ratio = torch.where(d != 0, m / torch.where(d != 0, d, torch.ones(())), torch.zeros(()))[..., None] * j
    r = ratio.round()
    fits = (r.abs() <= 127) & ((15 * j + r).abs() <= 127) & (d != 0)[..., None]
    err = torch.where(fits, (d[..., None] / j * (r - ratio)).abs(), torch.full((), float("inf")))
    pick = err.argmin(-1, keepdim=True)  # the least error; the smallest j among equals
    scale = (d / j[pick.squeeze(-1)]).half()
    ints = (j[pick] * q + r.gather(-1, pick)).clamp(-127, 127)
    plain = (v.abs().amax(-1) / 127).half()
    inv = torch.where(plain.float() > 0, 1 / plain.float(), torch.zeros(()))
    plain_ints = (v * inv[..., None]).round().clamp(-127, 127)
    ok = fits.any(-1)
    worse = ((ints * scale.float()[..., None] - v) ** 2).sum(-1) > ((plain_ints * plain.float()[..., None] - v) ** 2).sum(-1)
    use_plain = ~ok | worse
    scale = torch.where(use_plain, plain, scale)
    ints = torch.where(use_plain[..., None], plain_ints, ints).to(torch.int8)
    return torch.cat([scale.view(torch.uint8).reshape(n, nb, 2), ints.view(torch.uint8)], -1).reshape(n, -1).contiguous()


