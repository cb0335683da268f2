"""The thread policy of the native kernels and torch: one compute pool per thread that decodes."""

from __future__ import annotations

import threading

import torch


def in_passing_thread(fn, *args):
    """`fn(*args)` run on a thread that ends when it returns (its result, or its error re-raised).

    OpenMP (libgomp, torch's and the kernels') keeps a pool of worker threads for each thread that
    starts parallel work, for that thread's life. Once a process has more pool threads than
    cores, libgomp's workers stop spinning between parallel regions and sleep instead, and every
    region then waits for them to wake: a decode step on a 2-core machine runs markedly slower on a
    second thread while the first keeps its pool. Work done here (a model load) leaves no pool
    behind, so a server's model thread can be the only one."""
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
