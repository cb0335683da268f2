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

MANY_ROWS = 64  # a prompt of this many rows or more is followed by a trim (its activations are large)

_trim = None
_looked = False


def return_free_pages():
    """Give the heap's free pages back to the system (a few milliseconds)."""
    global _trim, _looked
    if not _looked:
        _looked = True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "malloc_trim"):
                _trim = libc.malloc_trim
                _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
        except OSError:
            pass
    if _trim is not None:
        _trim(0)


def after_rows(rows: int):
    """After a step of `rows` rows (a prompt): the free pages back when there were MANY_ROWS or more."""
    if rows >= MANY_ROWS:
        return_free_pages()
