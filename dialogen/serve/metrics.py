"""What GET /metrics reports, in Prometheus' text format (prometheus_client writes it).

The counts are plain Python numbers updated where things happen (a request ends, a reply
streams a token, a store operation returns); the gauges (queue, active replies, KV-cache bytes)
are read at scrape time. A token costs one bucket increment, a request a dict update.

  dialogen_http_requests_total{method,route,status}   every response, by route template
  dialogen_http_responses_total{class}                 2xx/3xx/4xx/5xx
  dialogen_replies_active, dialogen_replies_queued      the worker's load
  dialogen_jobs_total{outcome}                          completed, cancelled, rejected (queue full)
  dialogen_generated_tokens_total                       tokens of finished replies (their usage)
  dialogen_time_to_first_token_seconds                  request admitted -> first text delta
  dialogen_time_per_token_seconds                       between a reply's successive text deltas
  dialogen_kv_cache_bytes{pool}, dialogen_kv_cache_budget_bytes
  dialogen_store_seconds{op}, dialogen_store_unavailable_total{op}
"""

from __future__ import annotations

import bisect
import threading
import time

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)
STORE_OPS = ("get", "list", "count", "create", "delete", "claim", "renew", "release", "add_turn", "ping")


class Histogram:
    def __init__(self, bounds: tuple):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float):
        i = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self.counts[i] += 1
            self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        with self._lock:
            counts, total = list(self.counts), 0
        out = []
        for bound, n in zip([*map(str, self.bounds), "+Inf"], counts):
            total += n
            out.append((bound, total))
        return out


class Metrics:
    """`enabled` False (`dialogen serve --no-metrics`): nothing is counted or timed, and /metrics is 404."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.token_time = Histogram(TOKEN_BUCKETS)
        self.store = {op: Histogram(STORE_BUCKETS) for op in STORE_OPS}
        self.store_down = dict.fromkeys(STORE_OPS, 0)

    def request(self, method: str, route: str, status: int):
        if not self.enabled:
            return
        key = (method, route, status)
        with self._lock:
            self.requests[key] = self.requests.get(key, 0) + 1

    def emitter(self, emit):
        """`emit` for a job's events, timing its text deltas and counting its tokens."""
        if not self.enabled:
            return emit
        admitted, last = time.perf_counter(), None

        def observed(event):
            nonlocal last
            kind = event[0]
            if kind == "delta":
                now = time.perf_counter()
                if last is None:
                    self.ttft.observe(now - admitted)
                else:
                    self.token_time.observe(now - last)
                last = now
            elif kind == "done":
                with self._lock:
                    self.tokens += event[1]["tokens"]
            emit(event)

        return observed

    def timed(self, store):
        return TimedStore(store, self) if self.enabled else store

    def render(self, svc) -> bytes:
        """The text format, with the gauges read from `svc` now."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self, svc))
        return generate_latest(registry)


class TimedStore:
    """The store, each operation timed (and its StoreUnavailable counted)."""

    def __init__(self, store, metrics: Metrics):
        self._store, self._metrics = store, metrics

    def __getattr__(self, name):
        attr = getattr(self._store, name)
        if name not in STORE_OPS:
            return attr
        hist, metrics = self._metrics.store[name], self._metrics

        def timed(*args, **kwargs):
            from .store import StoreUnavailable

            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            except StoreUnavailable:
                with metrics._lock:
                    metrics.store_down[name] += 1
                raise
            finally:
                hist.observe(time.perf_counter() - t0)

        return timed


class _Collector:
    def __init__(self, metrics: Metrics, svc):
        self.m, self.svc = metrics, svc

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        m, svc = self.m, self.svc
        with m._lock:
            requests, tokens, down = dict(m.requests), m.tokens, dict(m.store_down)
        req = CounterMetricFamily("dialogen_http_requests", "HTTP responses by route template and status",
                                  labels=["method", "route", "status"])
        classes = {f"{c}xx": 0 for c in range(1, 6)}
        for (method, route, status), n in sorted(requests.items()):
            req.add_metric([method, route, str(status)], n)
            classes[f"{status // 100}xx"] = classes.get(f"{status // 100}xx", 0) + n
        yield req
        by_class = CounterMetricFamily("dialogen_http_responses", "HTTP responses by status class", labels=["class"])
        for c, n in classes.items():
            by_class.add_metric([c], n)
        yield by_class
        load = svc.worker.load()
        yield GaugeMetricFamily("dialogen_replies_active", "replies being generated", value=load["running"])
        yield GaugeMetricFamily("dialogen_replies_queued", "replies waiting for a slot (the queue depth)",
                                value=load["queued"])
        jobs = CounterMetricFamily("dialogen_jobs", "replies by outcome", labels=["outcome"])
        for k in ("completed", "cancelled", "rejected"):
            jobs.add_metric([k], load[k])
        yield jobs
        yield CounterMetricFamily("dialogen_generated_tokens", "tokens of finished replies", value=tokens)
        yield _histogram(HistogramMetricFamily, "dialogen_time_to_first_token_seconds",
                         "from a reply's admission to its first text", m.ttft)
        yield _histogram(HistogramMetricFamily, "dialogen_time_per_token_seconds",
                         "between a reply's successive texts", m.token_time)
        kv = GaugeMetricFamily("dialogen_kv_cache_bytes", "bytes of kept KV caches", labels=["pool"])
        kv.add_metric(["sessions"], svc.sessions.nbytes())
        kv.add_metric(["prompts"], svc.prefixes.nbytes())
        yield kv
        yield GaugeMetricFamily("dialogen_kv_cache_budget_bytes", "--kv-budget-mb", value=svc.limits.kv_budget_bytes)
        store = HistogramMetricFamily("dialogen_store_seconds", "session store operations", labels=["op"])
        for op, h in m.store.items():
            store.add_metric([op], h.cumulative(), sum_value=h.sum)
        yield store
        unavailable = CounterMetricFamily("dialogen_store_unavailable", "store operations that found the "
                                          "database unreachable (answered 503)", labels=["op"])
        for op, n in down.items():
            unavailable.add_metric([op], n)
        yield unavailable


def _histogram(cls, name: str, doc: str, h: Histogram):
    out = cls(name, doc)
    out.add_metric([], h.cumulative(), sum_value=h.sum)
    return out
