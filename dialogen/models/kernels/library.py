"""Building and loading the native library (`models/kernels.c`).

The library is compiled with the system C compiler (`cc -O3 -march=native -fopenmp`) into the
cache directory the first time it is needed (a few seconds), keyed by the source, the compiler
flags and the CPU's features, then loaded with ctypes; `PROTOTYPES` declares its functions.
Without a compiler, or with DIALOGEN_KERNELS=0 (`--no-kernels`), `enabled()` is False and the
model runs its reference torch path: same results within the stated tolerances, slower decode.
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
from pathlib import Path

from ...paths import cache_dir

SOURCE = Path(__file__).resolve().parent.parent / "kernels.c"
INCLUDED = [SOURCE.with_name(n) for n in ("kquants.c", "kquants_dot.c", "kquants_matmul.c")]  # in SOURCE
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=c11"]

_i, _p, _f, _i64, _size = ctypes.c_int, ctypes.c_void_p, ctypes.c_float, ctypes.c_int64, ctypes.c_size_t
# name -> (argument types, result type) of every function the Python side calls. The products
# return 0, or OUT_OF_MEMORY (1) when a scratch allocation failed (`check`).
PROTOTYPES = {
    "qmatmul": ([_i, _p, _i, _i, _p, _i, _p, _p, _i, _p, _f, _i, _i], _i),
    "dequantize": ([_i, _p, _i, _i, _p, _i], None),
    "dequantize_bf16": ([_i, _p, _i, _i, _p, _i], _i),
    "block_bytes": ([_i], _i),
    "block_values": ([_i], _i),
    "tiled_bytes": ([_i, _i, _i], _size),
    "tile_weights": ([_i, _p, _i, _i, _p, _i], None),
    "attend_decode": ([_i, _i, _i, _i, _p, _p, _p, _p, _p, _p, _i64, _p, _p, _p, _i], _i),
    "block_decode": ([_p, _p, _i, _p, _p, _p, _p, _p, _i64, _p, _p, _i], _i),
}
OUT_OF_MEMORY = 1

_lib: ctypes.CDLL | None = None
_tried = False
_off = False


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
    source = b"".join(p.read_bytes() for p in (SOURCE, *INCLUDED))
    key = hashlib.sha256(source + " ".join([cc, *flags, _cpu_features()]).encode()).hexdigest()[:16]
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


def load_library(march: str = "native") -> ctypes.CDLL | None:
    path = build(march=march)
    if path is None:
        return None
    L = ctypes.CDLL(str(path))
    for name, (argtypes, restype) in PROTOTYPES.items():
        fn = getattr(L, name)
        fn.argtypes, fn.restype = argtypes, restype
    return L


def lib() -> ctypes.CDLL | None:
    """The library of this machine, built and loaded on first use; None without a compiler."""
    global _lib, _tried
    if not _tried:
        _tried = True
        _lib = load_library()
    return _lib


def enabled() -> bool:
    return not _off and os.environ.get("DIALOGEN_KERNELS") != "0" and lib() is not None


class disabled:
    """`with library.disabled():` runs the reference torch path (the eager reference of the kernels)."""

    def __enter__(self):
        global _off
        self._was, _off = _off, True

    def __exit__(self, *exc):
        global _off
        _off = self._was


def check(status: int, name: str):
    """Raise for a product's status code (`PROTOTYPES`)."""
    if status == OUT_OF_MEMORY:
        raise MemoryError(f"the native {name} could not allocate its scratch memory")
    if status:
        raise RuntimeError(f"the native {name} failed (status {status})")


def main():
    path = build(verbose=True)
    print(path if path else "dialogen: no C compiler; decode runs on the reference torch path")
