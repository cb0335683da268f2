"""The C heap (glibc's malloc, which torch's CPU tensors, the tokenizer and the kernels' scratch
use): free pages handed back to the system after work that freed many of them.

glibc serves a block from mmap, and unmaps it when freed, only above its mmap threshold, and it
raises that threshold to the size of every mmapped block freed (up to 32 MiB). After a load or a
long prompt, whose temporaries are tens of megabytes, later blocks of that size come from the heap
and stay in the process once freed. `malloc_trim(0)` returns the free pages of every arena (their
middles too, not only the tops). Elsewhere (another C library) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from contextlib import contextmanager

MANY_ROWS = 64  # a prompt of this many rows or more is followed by a trim (its activations are large)

TRAINING_MMAP_THRESHOLD = 8 << 20  # bytes: a training step's blocks this large or larger are mmapped
LATER_MMAP_THRESHOLD = 32 << 20  # after training: the highest threshold glibc itself rises to (64-bit)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter

_glibc = None
_looked = False


def _libc():
    """glibc, or None under another C library."""
    global _glibc, _looked
    if not _looked:
        _looked = True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            if all(hasattr(libc, f) for f in ("gnu_get_libc_version", "malloc_trim", "mallopt")):
                libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
                libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
                _glibc = libc
        except OSError:
            pass
    return _glibc


def return_free_pages():
    """Give the heap's free pages back to the system (a few milliseconds)."""
    if (libc := _libc()) is not None:
        libc.malloc_trim(0)


@contextmanager
def training():
    """The mmap threshold fixed at TRAINING_MMAP_THRESHOLD for a training run. A step frees and
    allocates activations of tens of megabytes in an order that splits the heap's free space, so
    with the rising threshold the heap keeps growing by a block's activations per block (a peak
    RSS far above what is live); mmapped, each is returned whole when freed. Smaller blocks stay
    on the heap, where reusing them costs no page faults. Afterwards the threshold is
    LATER_MMAP_THRESHOLD, where a process that has freed a large block has it anyway (glibc
    cannot be handed back its own rising rule)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, TRAINING_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, LATER_MMAP_THRESHOLD)


def after_rows(rows: int):
    """After a step of `rows` rows (a prompt): the free pages back when there were MANY_ROWS or more."""
    if rows >= MANY_ROWS:
        return_free_pages()
