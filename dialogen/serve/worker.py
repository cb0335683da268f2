"""The model worker: one thread owns the model; jobs queue for it and are served in rounds.

A job (one reply being generated) runs in its own thread: it renders the prompt through
`Session.send` and gets a `Generation`. A plain reply is then handed whole to the worker
(`Worker.stream`): the model thread feeds its prompt, samples its tokens (`Generation.advance`)
and sends its text deltas on, so a token costs no hand-off between threads. Any other model
use (beam search, candidates, rerankers, a model that cannot batch) goes through a
`ModelProxy`: each model call is handed to the worker thread and the job thread waits for the
answer. A round is one model step (`batching.step_rows`): the next token of every running reply,
the proxy's single-token calls, and a chunk of the waiting prompts (`prefill_chunk` tokens in
all), every token a row. So replies are served round-robin and decoded together, a new prompt
joins the running ones' step, and a long prompt does not stall everyone else's replies. (A model
whose prompts cannot be rows, one with a float16 copy, feeds its prompt chunks on their own.)

With LoRA adapters (`models.lora_set.AdapterSet`), a call or reply takes the adapter of the proxy
it came through (`proxy_for`); a step's rows are grouped by adapter, so all adapters share it.

Admission is bounded: at most `max_active` jobs run and `max_queue` more wait; past that
`submit` raises `Busy` (the HTTP layer answers 503 with Retry-After). A cancelled job (its client
went away) gets `Cancelled` raised from its next model call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from contextlib import nullcontext
from concurrent.futures import ThreadPoolExecutor

import torch

from ..decoding.generate import Generation
from ..models.kernels import threads
from .batching import can_batch, next_logits, prompts_as_rows, step_rows
from .jobs import Busy, Call, Cancelled, Drive, Job, ModelProxy, ServerShutdown

log = logging.getLogger("dialogen.serve")


class Worker:
    def __init__(self, model, max_active: int = 32, max_queue: int = 64, prefill_chunk: int = 256,
                 gather_ms: float = 20.0, adapters=None):
        self.model = model.eval() if hasattr(model, "eval") else model
        self.adapters = adapters  # an AdapterSet hooked onto the model, or None
        self.proxy = ModelProxy(self)
        self._proxies = {None: self.proxy, **{n: ModelProxy(self, n) for n in getattr(adapters, "adapters", ())}}
        self.max_active, self.max_queue = max_active, max_queue
        self.prefill_chunk = prefill_chunk
        self.gather_s = gather_ms / 1000
        self.batchable = can_batch(model)
        self._cond = threading.Condition()
        self._pending: list[Call] = []
        self._carry: deque[Call] = deque()  # prompts part-way through their chunks
        self._incoming: list[Drive] = []  # replies handed over, not yet seen by the model thread
        self._drives: list[Drive] = []  # replies the model thread is running (its own list)
        self._admitted = 0
        self._jobs: set[Job] = set()  # admitted, not finished
        self._running = 0
        self._stepping = 0
        self._local = threading.local()
        # the model thread alone computes in parallel, with the creator's thread count; job threads
        # take one, so they start no OpenMP pool (see `kernels.threads.in_passing_thread`)
        self.threads = torch.get_num_threads()
        self._pool = ThreadPoolExecutor(max_workers=max_active, thread_name_prefix="dialogen-job",
                                        initializer=threads.own_threads, initargs=(1,))
        self._stop = False
        self._last_round_s = 0.0
        self.stats = {"rounds": 0, "decode_rows": 0, "prefill_tokens": 0, "cancelled": 0, "completed": 0,
                      "rejected": 0, "max_batch": 0, "model_s": 0.0}
        self._thread = threading.Thread(target=self._loop, name="dialogen-model", daemon=True)
        self._thread.start()

    def proxy_for(self, adapter: str | None) -> ModelProxy:
        """The proxy whose calls take the LoRA adapter `adapter` (None: the base)."""
        return self._proxies[adapter]

    def _routed(self, groups: list[tuple[str | None, int]]):  # consecutive (adapter, rows) of the next call
        return self.adapters.rows(groups) if self.adapters is not None else nullcontext()

    # --- admission ------------------------------------------------------------------------
    def submit(self, fn, emit) -> Job:
        """Queue `fn(job)` to run in a job thread; raises Busy when the queue is full."""
        job = Job(fn, emit)
        with self._cond:
            if self._stop or self._admitted >= self.max_active + self.max_queue:
                self.stats["rejected"] += 1
                raise Busy()
            self._admitted += 1
            self._jobs.add(job)
            admitted, running = self._admitted, self._running
        log.debug("admit job %x: %d admitted, %d running", id(job), admitted, running)
        self._pool.submit(self._run_job, job)
        return job

    def cut_all(self, reason: ServerShutdown) -> int:
        """Stop every admitted job, telling its client `reason` (shutdown past its grace period);
        returns how many."""
        with self._cond:
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel(reason)
        return len(jobs)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no job is admitted (or `timeout` seconds pass); True when idle."""
        with self._cond:
            return self._cond.wait_for(lambda: self._admitted == 0, timeout)

    def load(self) -> dict:
        with self._cond:
            return {"running": self._running, "queued": self._admitted - self._running,
                    "max_active": self.max_active, "max_queue": self.max_queue, **self.stats}

    def _run_job(self, job: Job):
        with self._cond:
            self._running += 1
        self._local.job = job
        outcome = "completed"
        try:  # a job cancelled while queued still runs: it stops at its first model call, and cleans up
            job.fn(job)
            self._count("completed")
        except Cancelled:
            outcome = "cancelled"
            self._count("cancelled")
            _safe_emit(job, ("error", job.cut) if job.cut is not None else ("cancelled", None))
        except BaseException as e:  # reported to the client; the worker keeps serving
            outcome = f"failed: {type(e).__name__}"
            if not _is_user_error(e):
                log.exception("job failed")
            _safe_emit(job, ("error", e))
        finally:
            log.debug("release job %x: %s after %d model calls", id(job), outcome, job.steps)
            self.leave_model(job)
            self._local.job = None
            with self._cond:
                self._running -= 1
                self._admitted -= 1
                self._jobs.discard(job)
                self._cond.notify_all()
            job.finished.set()

    def _count(self, key: str):
        with self._cond:
            self.stats[key] += 1

    def leave_model(self, job: Job | None = None):
        """The job makes no more model calls: rounds stop waiting for it."""
        job = job or getattr(self._local, "job", None)
        if job is not None and job.stepping:
            with self._cond:
                job.stepping = False
                self._stepping -= 1
                self._cond.notify_all()

    # --- model calls (job threads) --------------------------------------------------------
    def call(self, ids, cache, kwargs: dict, adapter: str | None = None):
        job = getattr(self._local, "job", None)
        if job is not None and job.cancelled:
            raise Cancelled()
        c = Call(job, ids, cache, kwargs, adapter)
        with self._cond:
            if self._stop:
                raise Cancelled()
            if job is not None and not job.stepping:
                job.stepping = True
                self._stepping += 1
            self._pending.append(c)
            self._cond.notify_all()
        c.done.wait()
        if c.error is not None:
            raise c.error
        if job is not None:
            job.steps += 1
        return c.result

    # --- replies run by the model thread (job threads) ---------------------------------------
    def stream(self, gen, on_delta, tick=None, every: float = 10.0):
        """Produce the reply `gen`, calling `on_delta(delta)` with each text delta, and return when it
        is done (`gen.finish()` has run). A plain Generation of a job on a batchable model is run by
        the model thread itself, and `on_delta` is called there; anything else (a searched reply)
        is iterated here, its model calls going through the proxy. `tick()`, if given, is called
        on this thread about every `every` seconds meanwhile (a lease renewal)."""
        job = getattr(self._local, "job", None)
        if job is None or not self._drivable(gen):
            last = time.monotonic()
            for delta in gen:
                on_delta(delta)
                if tick is not None and time.monotonic() - last > every:
                    tick()
                    last = time.monotonic()
            return
        d, handed = Drive(job, gen, on_delta), False
        try:
            if job.cancelled:
                raise Cancelled()
            with self._cond:
                if self._stop:
                    raise Cancelled()
                self._incoming.append(d)
                handed = True
                self._cond.notify_all()
            while not d.done.wait(every):
                if tick is not None:
                    tick()
        except BaseException:
            if handed:  # the model thread lets go of the reply (at its next round) before it ends here
                d.abandoned = True
                d.done.wait()
            raise
        finally:
            gen.finish()
        if d.error is not None:
            raise d.error

    def _drivable(self, gen) -> bool:
        return (self.batchable and isinstance(gen, Generation) and isinstance(gen.model, ModelProxy)
                and gen.model.runs_on(self) and not gen.done and not gen.iterating)

    # --- the worker thread ----------------------------------------------------------------
    def close(self):
        """Stop the worker; every job waiting on a model call gets Cancelled."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
        with self._cond:
            left = list(self._carry) + self._pending + self._incoming + self._drives
            self._carry.clear()
            self._pending, self._incoming, self._drives = [], [], []
        for c in left:
            c.finish(error=Cancelled())
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _gather(self) -> list[Call] | None:
        """Wait for a round: every stepping job has a call pending (or the wait ran out)."""
        with self._cond:
            while not (self._pending or self._carry or self._incoming or self._drives or self._stop):
                self._cond.wait()
            if self._stop:
                return None
            self._drives += self._incoming
            self._incoming = []
            # waiting up to half a round's time costs at most half a round, and keeps batches whole
            deadline = time.monotonic() + max(self.gather_s, self._last_round_s / 2)
            while len(self._pending) + len(self._carry) < self._stepping:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop:
                    break
                self._cond.wait(left)
            calls = list(self._carry) + self._pending
            self._carry.clear()
            self._pending = []
            return calls

    def _loop(self):
        torch.set_grad_enabled(False)
        threads.own_threads(self.threads)
        while True:
            calls = self._gather()
            if calls is None:
                break
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():
                    self._round(calls)
            except Exception as e:  # a bug in a round must not leave jobs waiting forever
                log.exception("model round failed")
                for c in calls + self._drives:
                    if not c.done.is_set():
                        c.finish(error=e)
                self._drives = []
                with self._cond:
                    self._carry = deque(c for c in self._carry if not c.done.is_set())
            self._last_round_s = time.perf_counter() - t0
            self.stats["model_s"] += self._last_round_s

    def _round(self, calls: list[Call]):
        self.stats["rounds"] += 1
        live = []
        for c in calls:
            if c.job is not None and c.job.cancelled:
                c.finish(error=Cancelled())
            else:
                live.append(c)
        for d in [d for d in self._drives if d.dropped]:
            self._end(d, Cancelled())
        decode = [c for c in live if self._is_decode(c)]
        rows = [d for d in self._drives if d.fed == len(d.gen.feed)]
        chunks, budget = [], self.prefill_chunk  # prompts share a chunk's worth of tokens a round
        for d in self._drives:
            if d.fed < len(d.gen.feed) and budget > 0:
                n = min(len(d.gen.feed) - d.fed, budget)
                chunks.append((d, n))
                budget -= n
        log.debug("round %d: %d proxy calls, %d replies, %d prompt chunks, %d other calls", self.stats["rounds"],
                  len(decode), len(rows), len(chunks), len(live) - len(decode))
        if decode or rows or chunks:
            self._step(decode, rows, chunks)
        for c in live:
            if not self._is_decode(c):
                self._feed(c)

    def _is_decode(self, c: Call) -> bool:
        return self.batchable and c.cache is not None and not c.kwargs and tuple(c.ids.shape) == (1, 1)

    def _step(self, calls: list[Call], rows: list[Drive], chunks: list[tuple[Drive, int]]):
        """One model step for the round: the proxy's decode calls, the replies' next tokens and
        chunks of the replies' prompts, as rows of one native step (`batching.step_rows`). A
        segment the step did not take (a prompt that cannot be rows: a float16 copy decodes only;
        or every segment, when the step failed and each alone tells which one is bad) is fed alone."""
        n = len(calls) + len(rows)
        self.stats["decode_rows"] += n
        self.stats["max_batch"] = max(self.stats["max_batch"], n)
        self.stats["prefill_tokens"] += sum(k for _, k in chunks)
        parts = [d.gen.feed[d.fed:d.fed + k] for d, k in chunks]
        together = chunks if prompts_as_rows(self.model) else []
        segments = ([(c.cache, [int(c.ids[0, 0])]) for c in calls] + [(d.gen.cache, d.gen.tokens[-1:]) for d in rows]
                    + [(d.gen.cache, part) for (d, _), part in zip(together, parts)])
        groups = ([(c.adapter, 1) for c in calls] + [(d.adapter, 1) for d in rows]
                  + [(d.adapter, len(part)) for (d, _), part in zip(together, parts)])  # each segment's rows
        logits = None
        if segments:
            try:
                with self._routed(groups):
                    logits = step_rows(self.model, segments)
            except Exception:  # one bad row (e.g. past the position limit): each segment is fed alone below
                log.debug("round step failed; each segment is fed alone", exc_info=True)
        for i, c in enumerate(calls):
            if logits is None:
                self._direct(c)
            else:
                c.finish(result=logits[i].view(1, 1, -1))
        for i, d in enumerate(rows, len(calls)):
            self._run(d, logits, i, d.gen.tokens[-1:])
        for i, ((d, k), part) in enumerate(zip(chunks, parts), n):
            d.fed += k
            taken = logits if i < len(segments) else None  # prompts the step did not take are fed alone
            self._run(d, taken, i, part, sample=d.fed == len(d.gen.feed))

    def _run(self, d: Drive, logits, row: int, fed: list[int], sample: bool = True):
        """The reply's next-token logits: row `row` of the step's `logits`, or, without them, `fed` fed
        alone after the reply's cache; then (with `sample`) its next token and deltas."""
        try:
            with self._routed([(d.adapter, len(fed))]):  # fed alone: its rows take its adapter
                out = logits[row] if logits is not None else next_logits(self.model, fed, d.gen.cache)
            if sample:
                for delta in d.gen.advance(out):
                    d.on_delta(delta)
        except Exception as e:
            self._end(d, e)
            return
        if d.gen.done:
            self._end(d)

    def _end(self, d: Drive, error=None):
        self._drives.remove(d)
        d.finish(error)

    def _feed(self, c: Call):
        """A prompt: one chunk per round when it is long, so decoding jobs keep their pace."""
        T = c.ids.shape[1]
        chunked = self.batchable and c.cache is not None and not c.kwargs and c.ids.shape[0] == 1
        if not chunked or T - c.fed <= self.prefill_chunk and c.fed == 0:
            self.stats["prefill_tokens"] += T
            self._direct(c)
            return
        end = min(T, c.fed + self.prefill_chunk)
        try:
            with self._routed([(c.adapter, c.ids.shape[0])]):
                c.parts.append(self.model(c.ids[:, c.fed:end], c.cache))
        except Exception as e:
            c.finish(error=e)
            return
        self.stats["prefill_tokens"] += end - c.fed
        c.fed = end
        if end < T:
            self._carry.append(c)
        else:
            c.finish(result=torch.cat(c.parts, dim=1))

    def _direct(self, c: Call):
        try:
            with self._routed([(c.adapter, c.ids.shape[0])]):
                c.finish(result=self.model(c.ids, c.cache, **c.kwargs))
        except Exception as e:
            c.finish(error=e)


def _safe_emit(job: Job, event):
    try:
        job.emit(event)
    except Exception:  # the client's event loop is gone; nothing left to tell
        log.debug("job %x: event %s not delivered", id(job), event[0], exc_info=True)


def _is_user_error(e: BaseException) -> bool:
    from ..errors import UserError

    return isinstance(e, UserError)
