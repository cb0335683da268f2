"""What the model worker serves: jobs (a reply each, in a job thread), the model calls they hand to
the model thread (`Call`), the replies the model thread runs itself (`Drive`), and the proxy that
stands in for the model in job threads (`ModelProxy`)."""

from __future__ import annotations

import threading

import torch

from ..decoding.generate import Generation


class Busy(Exception):
    """The queue is full."""


class Cancelled(Exception):
    """The job was cancelled (its client disconnected)."""


class ServerShutdown(Exception):
    """The server is stopping and the job did not finish within the shutdown grace period."""


class Job:
    """One unit of work run in a job thread: `fn(job)`; it reports through `emit(event)`."""

    def __init__(self, fn, emit):
        self.fn, self.emit = fn, emit
        self._cancelled = threading.Event()
        self.finished = threading.Event()
        self.stepping = False  # between its first model call and `leave_model()`
        self.steps = 0
        self.cut: ServerShutdown | None = None  # why the server stopped it, told to its client

    def cancel(self, reason: ServerShutdown | None = None):
        if reason is not None and not self._cancelled.is_set():
            self.cut = reason
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Call:
    def __init__(self, job: Job | None, ids: torch.Tensor, cache, kwargs: dict, adapter: str | None = None):
        self.job, self.ids, self.cache, self.kwargs = job, ids, cache, kwargs
        self.adapter = adapter  # the LoRA adapter the call's rows take (None: the base)
        self.done = threading.Event()
        self.result: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.fed = 0  # prompt tokens already fed, for a prompt fed in chunks
        self.parts: list[torch.Tensor] = []

    def finish(self, result=None, error=None):
        self.result, self.error = result, error
        self.done.set()


class Drive:
    """A Generation the model thread runs itself: its prompt is fed (in chunks), then one token
    per round; `on_delta` gets each text delta, on the model thread."""

    def __init__(self, job: Job | None, gen: Generation, on_delta):
        self.job, self.gen, self.on_delta = job, gen, on_delta
        self.adapter = getattr(gen.model, "adapter_name", None)  # its proxy says which adapter it takes
        self.fed = 0  # prompt tokens fed so far
        self.abandoned = False  # the job thread stopped waiting (its own error): drop at the next round
        self.done = threading.Event()
        self.error: BaseException | None = None

    @property
    def dropped(self) -> bool:
        return self.abandoned or (self.job is not None and self.job.cancelled)

    def finish(self, error=None):
        self.error = error
        self.done.set()


class ModelProxy:
    """Stands in for the model in job threads: calls run on the worker thread, the rest is the model's.
    `adapter_name`: the LoRA adapter of the worker's `AdapterSet` its calls take (None: the base), so
    the proxy of an adapter is that adapted model to a session, a generation or a search."""

    def __init__(self, worker, adapter_name: str | None = None):  # the serve.worker.Worker it stands in for
        self._worker, self.adapter_name = worker, adapter_name

    def __call__(self, ids, cache=None, **kwargs):
        return self._worker.call(ids, cache, kwargs, self.adapter_name)

    def runs_on(self, worker) -> bool:
        """Whether this proxy's calls run on `worker`."""
        return self._worker is worker

    def next_logits(self, ids, cache=None):
        return self(ids, cache)[:, -1]

    def __getattr__(self, name):
        return getattr(self._worker.model, name)
