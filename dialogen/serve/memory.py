"""Memory that comes back after a burst (glibc's malloc; elsewhere nothing is done).

A burst of replies allocates a KV cache each (megabytes to tens of megabytes, see
models/cache.py), from many job threads. glibc serves a block that size from mmap only while
it is above its mmap threshold, and raises that threshold to the size of every mmapped block
freed: after the first caches are freed, later ones come from the heap arenas (one per thread,
up to 8 per core), and freed heap memory mostly stays with the process. `malloc_trim(0)`, run
once the server has been idle a moment after work, returns the arenas' free pages (their
middles too, not only the tops). (A fixed, lower mmap threshold would return each cache at once,
but every large activation of a batched step would then be mapped and faulted in anew.)

What stays is what the server keeps on purpose: the KV caches of live sessions and of recent
prompts, within --kv-budget-mb.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

IDLE_S = 2.0  # seconds without work before a trim

log = logging.getLogger("dialogen.serve")


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # glibc only (musl has no malloc_trim)
    return libc if all(hasattr(libc, f) for f in ("gnu_get_libc_version", "malloc_trim", "mallopt")) else None


class Trimmer:
    """A daemon thread: after work, once `busy()` has been false for IDLE_S, malloc_trim(0)."""

    def __init__(self, busy, activity):  # busy() -> bool; activity() -> a number that grows with work
        self.busy, self.activity = busy, activity
        self.trims = 0
        self._libc = _glibc()
        self._stop = threading.Event()
        if self._libc is not None:
            threading.Thread(target=self._loop, name="dialogen-trim", daemon=True).start()

    def _loop(self):
        trimmed_at = self.activity()
        while not self._stop.wait(IDLE_S):
            now = self.activity()
            if now != trimmed_at and not self.busy():
                if self._stop.wait(IDLE_S) or self.busy() or self.activity() != now:
                    continue  # still working: try again later
                self._libc.malloc_trim(0)
                self.trims += 1
                trimmed_at = now

    def close(self):
        self._stop.set()
