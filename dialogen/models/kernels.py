"""The native decode kernels (`kernels.c`): built once on this machine, loaded with ctypes.

The library is compiled with the system C compiler (`cc -O3 -march=native -fopenmp`) into the
cache directory the first time it is needed (a few seconds), keyed by the source, the compiler
flags and the CPU's features. Without a compiler, or with DIALOGEN_KERNELS=0 (`--no-kernels`), `enabled()` is False and the
model runs its plain torch path: same results within the stated tolerances, slower decode.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from ..paths import cache_dir

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
GGML_TYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 8}  # GGUF type numbers of the layouts kept natively
TILED = 0x100  # or-ed into a type number: the weights are in the tiled order (`tile`)
QK = 32

_lib: ctypes.CDLL | None = None
_tried = False


def in_passing_thread(fn, *args):
    """`fn(*args)` run on a thread that ends when it returns (its result, or its error re-raised).

    OpenMP (libgomp, torch's and the kernels') keeps a pool of worker threads for each thread that
    starts parallel work, for that thread's life. Once a process has more pool threads than
    cores, libgomp's workers stop spinning between parallel regions and sleep instead, and every
    region then waits for them to wake, so a decode step on a second thread is slower while the
    first keeps its pool. Work done here (a model load) leaves no pool behind,
    so a server's model thread can be the only one."""
    box: dict = {}

    def run():
        try:
            box["out"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 (handed to the caller)
            box["error"] = e

    t = threading.Thread(target=run, name="dialogen-load", daemon=True)  # Ctrl-C during a load exits
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["out"]


def own_threads(n: int):
    """This thread's number of compute threads, `n`, whatever other threads set later. (torch's
    count is one process-wide value until a thread first reads it; from then on the thread keeps
    its own, so it is read first.)"""
    torch.get_num_threads()
    torch.set_num_threads(n)


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.machine()


def build(verbose: bool = False, march: str = "native") -> Path | None:
    """Compile the library if needed; its path, or None when no compiler works here. `march` other
    than native builds a variant for an older CPU (the tests check every SIMD path against the others)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    flags = [f"-march={march}" if f == "-march=native" else f for f in FLAGS]
    # -march=native code runs only where it was built: the CPU's features are part of the key, so a home
    # directory shared between machines never hands one machine another's build
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *flags, _cpu_features()]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if res.returncode != 0:
            if verbose:
                print(f"dialogen: building the decode kernels failed:\n{res.stderr}", file=sys.stderr)
            return None
        os.replace(tmp, target)  # atomic: a concurrent first use never loads half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def lib() -> ctypes.CDLL | None:
    global _lib, _tried
    if not _tried:
        _tried = True
        _lib = load_library()
    return _lib


def load_library(march: str = "native") -> ctypes.CDLL | None:
    path = build(march=march)
    if path is None:
        return None
    L = ctypes.CDLL(str(path))
    i, p, f = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    L.qmatmul.argtypes = [i, p, i, i, p, i, p, p, i, p, f, i, i]
    L.dequantize.argtypes = [i, p, i, i, p, i]
    L.tiled_bytes.argtypes, L.tiled_bytes.restype = [i, i, i], ctypes.c_size_t
    L.tile_weights.argtypes, L.tile_weights.restype = [i, p, i, i, p, i], None
    L.attend_decode.argtypes = [i, i, i, i, p, p, p, p, p, p, ctypes.c_int64, p, p, p, i]
    L.block_decode.argtypes = [p, p, i, p, p, p, p, p, ctypes.c_int64, p, p, i]
    for fn in (L.qmatmul, L.dequantize, L.attend_decode, L.block_decode):
        fn.restype = None
    return L


_off = False


def enabled() -> bool:
    return not _off and os.environ.get("DIALOGEN_KERNELS") != "0" and lib() is not None


class disabled:
    """`with kernels.disabled():` runs the plain torch path (the eager reference of the kernels)."""

    def __enter__(self):
        global _off
        self._was, _off = _off, True

    def __exit__(self, *exc):
        global _off
        _off = self._was


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def qmatmul(ggml_type: int, blocks: torch.Tensor, n: int, k: int, x: torch.Tensor, bias=None, out=None,
            norm=None, eps: float = 0.0, swiglu: bool = False) -> torch.Tensor:
    """x (R, k) -> (R, n) through weights kept as blocks (n, k/32 * block bytes), or tiled (`tile`,
    with TILED in `ggml_type`).

    `norm`: an RMSNorm weight applied to x first; `swiglu`: x is (R, 2k) [gate | up] and
    silu(gate) * up is multiplied; `out`: add the product into this (R, n) tensor instead."""
    x = x.contiguous()
    R = x.shape[0]
    y = torch.empty(R, n) if out is None else out
    lib().qmatmul(ggml_type, blocks.data_ptr(), n, k, x.data_ptr(), R, y.data_ptr(), _ptr(bias),
                  int(out is not None), _ptr(norm), eps, int(swiglu), torch.get_num_threads())
    return y


def tile(ggml_type: int, blocks: torch.Tensor, n: int, k: int) -> torch.Tensor | None:
    """The blocks of (n, k) weights in the tiled order (16 output rows together), which the AVX-512
    VNNI build multiplies several activation rows by at a time; None where this build or shape
    has no tiled product. The values are the blocks' own, reordered."""
    size = lib().tiled_bytes(ggml_type, n, k)
    if not size:
        return None
    out = torch.empty(size, dtype=torch.uint8)
    lib().tile_weights(ggml_type, blocks.contiguous().data_ptr(), n, k, out.data_ptr(), torch.get_num_threads())
    return out


def weight_args(lin) -> tuple[int, int]:
    """(type number, address) of a Linear's decode weights: tiled when it has them."""
    if lin.tiled is not None:
        return GGML_TYPES[lin.kind] | TILED, lin.tiled.data_ptr()
    return GGML_TYPES[lin.kind], lin.packed.data_ptr()


def dequantize(ggml_type: int, blocks: torch.Tensor, n: int, k: int) -> torch.Tensor:
    out = torch.empty(n, k)
    lib().dequantize(ggml_type, blocks.data_ptr(), n, k, out.data_ptr(), torch.get_num_threads())
    return out


def attend_decode(qkv: torch.Tensor, n_head: int, n_kv: int, head_dim: int, k_ptrs, v_ptrs, caps, slots,
                  key_mask=None, cos=None, sin=None) -> torch.Tensor:
    """One new token per row: rotary on its q and k (cos/sin (B, hd/2)), k and v written into the
    row's cache at `slots[b]`, attention over slots 0..slots[b]. qkv (B, width) is changed in place.
    k_ptrs/v_ptrs/caps/slots are int64 tensors (B,); key_mask (B, S) uint8 or None.
    Returns (B, n_head * head_dim)."""
    B = qkv.shape[0]
    out = torch.empty(B, n_head * head_dim)
    mask = key_mask
    lib().attend_decode(B, n_head, n_kv, head_dim, qkv.data_ptr(), k_ptrs.data_ptr(), v_ptrs.data_ptr(),
                        caps.data_ptr(), slots.data_ptr(), _ptr(mask), 0 if mask is None else mask.shape[1],
                        _ptr(cos), _ptr(sin), out.data_ptr(), torch.get_num_threads())
    return out


class BlockWeights(ctypes.Structure):
    """`block_weights` of kernels.c: one llama block's shapes and weight addresses."""

    _fields_ = [(n, ctypes.c_int) for n in ("d", "nh", "nkv", "hd", "ff")] + [("eps", ctypes.c_float)] + \
        [(n, ctypes.c_void_p) for n in ("norm1", "norm2", "qkv_bias")] + \
        [(n, ctypes.c_int) for n in ("qkv_type", "o_type", "gate_up_type", "down_type")] + \
        [(n, ctypes.c_void_p) for n in ("qkv", "o", "gate_up", "down")]


def block_weights(n_head: int, n_kv: int, head_dim: int, norm1, norm2, qkv, o_proj, gate_up, down) -> BlockWeights:
    """The fused step's view of a llama block (norms: RMSNorm modules; the rest: Linears with blocks).
    It holds addresses only: the caller keeps the modules (and so their tensors) alive."""
    names, lins = ("qkv", "o", "gate_up", "down"), (qkv, o_proj, gate_up, down)
    return BlockWeights(d=o_proj.out_features, nh=n_head, nkv=n_kv, hd=head_dim, ff=down.in_features, eps=norm1.eps,
                        norm1=norm1.weight.data_ptr(), norm2=norm2.weight.data_ptr(), qkv_bias=_ptr(qkv.bias),
                        **{f"{name}_type": weight_args(lin)[0] for name, lin in zip(names, lins)},
                        **{name: weight_args(lin)[1] for name, lin in zip(names, lins)})


def block_decode(weights: BlockWeights, x: torch.Tensor, k_ptrs, v_ptrs, caps, slots, key_mask=None, cos=None,
                 sin=None):
    """A whole llama block for one new token per row, in place on the residual stream x (B, d)."""
    lib().block_decode(ctypes.byref(weights), x.data_ptr(), x.shape[0], k_ptrs.data_ptr(), v_ptrs.data_ptr(),
                       caps.data_ptr(), slots.data_ptr(), _ptr(key_mask), 0 if key_mask is None else key_mask.shape[1],
                       _ptr(cos), _ptr(sin), torch.get_num_threads())


# --- quantizing float weights into the block layouts ----------------------------------------
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


def main():
    path = build(verbose=True)
    print(path if path else "dialogen: no C compiler; decode runs on the plain torch path")


if __name__ == "__main__":
    main()
