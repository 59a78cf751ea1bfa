"""Metrics (Prometheus), JSON access logs, and the per-request timing behind them.

The OpenAI layer creates one `RequestTimer` per request, marks a few instants on it (routed,
first upstream batch, last upstream batch) and hands it to `Observability.record` once at
the end: nothing is recorded per chunk. `record` only counts the request out of the
in-flight gauge and keeps it; every `DRAIN_DELAY` (or at `DRAIN_MAX` finished requests, or
when metrics are read) `drain` turns the kept requests into metrics and access-log lines in
one pass, which costs a third of doing it request by request between other work. Metrics
are counted in plain dicts on the loop (`PendingMetrics`) and moved into prometheus_client
when they are read. Access-log lines are written by a background thread (`AccessLogWriter`),
so a slow log sink never blocks the event loop. Prompts and completions appear in access
logs only with `server.log_prompts: true`.

Proxy overhead = time spent in inferbridge before the upstream call was made plus the time
from the upstream's answer (its first batch when streaming, its last otherwise) to the
response leaving inferbridge. It excludes the upstream's own time; it is reported per
request in the `x-inferbridge-overhead-ms` header and as a histogram.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sys
import threading
import time
from bisect import bisect_left
from typing import Any

import orjson
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess

from inferbridge.request import InferenceRequest, RouteInfo

_now = time.perf_counter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
FLUSH_INTERVAL = 1.0  # seconds, with several workers: how stale another worker's /metrics is
DRAIN_DELAY = 0.02  # seconds a finished request waits for its metrics and access-log line
DRAIN_MAX = 256  # finished requests kept at most before they are drained


def _ms(seconds: float) -> float:
    """Seconds as milliseconds to the microsecond (`round(x, 3)` formats a string inside)."""
    return int(seconds * 1_000_000 + 0.5) / 1000


class RequestTimer:
    """Instants of one request, from `time.perf_counter()`."""

    __slots__ = ("disconnected", "first", "last", "overhead", "routed", "start", "status")

    def __init__(self) -> None:
        self.start = _now()
        self.routed = 0.0
        self.first = 0.0
        self.last = 0.0
        self.status = 0
        self.disconnected = False
        self.overhead = 0.0

    def overhead_so_far(self) -> float:
        """Seconds spent in the proxy up to now, excluding the upstream's time."""
        pre = (self.routed or self.start) - self.start
        answered = self.last or self.first
        return pre + (_now() - answered if answered else 0.0)


Finished = tuple[
    InferenceRequest, RouteInfo, RequestTimer, dict[str, Any] | None, Exception | None, Any, float
]
"""A finished request waiting for `Observability.drain`: `record`'s arguments and when it
ended (`perf_counter`)."""


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        route = ["model", "deployment", "backend"]
        self.requests = Counter(
            "inferbridge_requests",
            "Requests by model, deployment, backend and HTTP status",
            [*route, "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "inferbridge_request_duration_seconds",
            "Whole request duration",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "inferbridge_time_to_first_token_seconds",
            "Time until the first upstream batch",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.overhead = Histogram(
            "inferbridge_proxy_overhead_seconds",
            "Time spent in inferbridge, excluding the upstream",
            ["model"],
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "inferbridge_tokens",
            "Tokens by model and kind (prompt/completion)",
            ["model", "kind"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "inferbridge_requests_in_flight",
            "Requests being served",
            ["model"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.upstream_errors = Counter(
            "inferbridge_upstream_errors",
            "Upstream failures by kind",
            [*route, "kind"],
            registry=registry,
        )
        self.retries = Counter(
            "inferbridge_retries", "Extra upstream attempts", ["model"], registry=registry
        )
        self.fallbacks = Counter(
            "inferbridge_fallbacks",
            "Requests answered by a fallback model",
            ["model", "fallback"],
            registry=registry,
        )
        self.rejected = Counter(
            "inferbridge_rejected_requests",
            "Requests answered with an "
            "error before reaching a backend (bad body, auth, unknown "
            "model...)",
            ["status"],
            registry=registry,
        )
        self.disconnects = Counter(
            "inferbridge_client_disconnects",
            "Clients that left before the end",
            ["model"],
            registry=registry,
        )
        self.pending = PendingMetrics(self)
        self._children: dict[tuple[Any, ...], Any] = {}

    def child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        """`metric.labels(*labels)`, cached: label lookups are the costly part."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


class PendingMetrics:
    """What the serving loop counted since the last flush, in plain dicts.

    The loop is single-threaded, so counting here needs no lock: a request costs a few dict
    updates instead of ~10 prometheus_client calls, each taking a lock and checking its
    labels (measured at ~15% of a request's Python time). `flush()` moves the totals into
    the prometheus_client metrics: before every exposition, and every second when several
    worker processes share the metrics folder (each process flushes its own).
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.counts: dict[tuple[Any, tuple[str, ...]], float] = {}
        # histogram -> labels -> [per-bucket counts..., sum]
        self.observed: dict[Any, dict[tuple[str, ...], list[float]]] = {}
        self.in_flight: dict[str, int] = {}
        # each histogram's finite bucket bounds (the last bucket, +Inf, takes the rest)
        self._bounds = {
            h: (*h._upper_bounds[:-1],) for h in (metrics.latency, metrics.ttft, metrics.overhead)
        }

    def inc(self, metric: Any, labels: tuple[str, ...], amount: float = 1.0) -> None:
        key = (metric, labels)
        counts = self.counts
        counts[key] = counts.get(key, 0.0) + amount

    def observe(self, metric: Any, labels: tuple[str, ...], value: float) -> None:
        per_label = self.observed.get(metric)
        if per_label is None:
            per_label = self.observed[metric] = {}
        entry = per_label.get(labels)
        bounds = self._bounds[metric]
        if entry is None:
            entry = per_label[labels] = [0.0] * (len(bounds) + 2)
        entry[bisect_left(bounds, value)] += 1
        entry[-1] += value

    def flush(self) -> None:
        metrics = self._metrics
        child = metrics.child
        counts, self.counts = self.counts, {}
        for (metric, labels), amount in counts.items():
            child(metric, labels).inc(amount)
        observed, self.observed = self.observed, {}
        for metric, per_label in observed.items():
            for labels, entry in per_label.items():
                # Histogram internals, as `observe()` updates them: one value per bucket (not
                # cumulative) and the sum. pyproject.toml bounds prometheus-client for this.
                target = child(metric, labels)
                for index, n in enumerate(entry[:-1]):
                    if n:
                        target._buckets[index].inc(n)
                target._sum.inc(entry[-1])
        for model, value in self.in_flight.items():
            child(metrics.in_flight, (model,)).set(value)


class AccessLogWriter:
    """Writes JSON lines to a binary stream from a background thread, in batches.

    The serving loop only encodes the lines and appends them to a queue; the thread wakes
    every `interval` seconds and writes whatever accumulated in one call. Cheaper than `logging`
    (no record objects, no formatting on the loop, no thread wake-up per line), and a slow
    sink never blocks serving. Lines appear at most `interval` seconds late.
    """

    def __init__(self, stream: Any = None, interval: float = 0.05) -> None:
        self._stream = stream
        self._interval = interval
        self._queue: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
            self._thread.start()

    def write(self, lines: bytes) -> None:
        """Queue one line, or several joined by newlines (without the last newline)."""
        self._queue.put(lines)

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(5)
            self._thread = None

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(self._interval)
            self._flush()
            if stopping:
                return

    def _flush(self) -> None:
        lines: list[bytes] = []
        with contextlib.suppress(queue.Empty):
            while True:
                lines.append(self._queue.get_nowait())
        if not lines:
            return
        stream = self._stream or sys.stderr.buffer
        try:
            stream.write(b"\n".join(lines) + b"\n")
            stream.flush()
        except (OSError, ValueError):  # closed sink: drop, never crash serving
            pass


class Observability:
    """One per process: the metrics registry and the access log."""

    def __init__(self, *, log_prompts: bool = False, access_log: bool = True) -> None:
        self.log_prompts = log_prompts
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.metrics = Metrics(CollectorRegistry(auto_describe=True))
        self.access = AccessLogWriter()
        self.access_enabled = access_log
        self._flusher: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finished: list[Finished] = []
        self._drainer: asyncio.TimerHandle | None = None

    # -- lifecycle (inside the serving process) --------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.access_enabled:
            self.access.start()
        if self.multiprocess:  # other workers' scrapes read what this one flushed
            self._flusher = self._loop.call_later(FLUSH_INTERVAL, self._tick)

    def _tick(self) -> None:
        self.drain()
        self.metrics.pending.flush()
        self._flusher = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._tick)

    def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        self.drain()
        self._loop = None
        self.metrics.pending.flush()
        self.access.stop()

    def exposition(self) -> bytes:
        self.drain()
        self.metrics.pending.flush()
        if self.multiprocess:
            registry = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.metrics.registry)

    # -- per request ------------------------------------------------------------------------
    def rejected(self, status: int) -> None:
        self.metrics.pending.inc(self.metrics.rejected, (str(status),))

    def started(self, model: str) -> None:
        in_flight = self.metrics.pending.in_flight
        in_flight[model] = in_flight.get(model, 0) + 1

    def record(
        self,
        request: InferenceRequest,
        route: RouteInfo,
        timer: RequestTimer,
        usage: dict[str, Any] | None,
        error: Exception | None = None,
        completion: Any = None,
    ) -> None:
        """The request is over: out of the in-flight gauge now, into the other metrics and
        the access log at the next `drain`."""
        self.metrics.pending.in_flight[request.model] -= 1
        finished = self._finished
        finished.append((request, route, timer, usage, error, completion, _now()))
        if len(finished) == 1:
            loop = self._loop
            if loop is None or loop.is_closed():
                self.drain()
            else:
                self._drainer = loop.call_later(DRAIN_DELAY, self.drain)
        elif len(finished) >= DRAIN_MAX:
            self.drain()

    def drain(self) -> None:
        """Metrics and access-log lines of the requests finished since the last drain."""
        finished, self._finished = self._finished, []
        if self._drainer is not None:
            self._drainer.cancel()
            self._drainer = None
        if not finished:
            return
        m = self.metrics
        pending = m.pending
        inc = pending.inc
        observe = pending.observe
        lines: list[bytes] | None = [] if self.access_enabled else None
        epoch = time.time() - _now()  # perf_counter instants -> Unix time
        for request, route, timer, usage, error, completion, end in finished:
            model = request.model
            by_model = (model,)
            status = timer.status or 0
            inc(m.requests, (model, route.deployment, route.backend, str(status)))
            observe(m.latency, by_model, end - timer.start)
            overhead = timer.overhead
            observe(m.overhead, by_model, overhead)
            ttft = timer.first - timer.start if timer.first else None
            if ttft is not None:
                observe(m.ttft, by_model, ttft)
            if usage:
                inc(m.tokens, (model, "prompt"), usage.get("prompt_tokens", 0))
                inc(m.tokens, (model, "completion"), usage.get("completion_tokens", 0))
            kind = getattr(error, "code", None) or (type(error).__name__ if error else None)
            if error is not None and route.deployment:
                inc(m.upstream_errors, (model, route.deployment, route.backend, kind))
            if route.attempts > 1:
                inc(m.retries, by_model, route.attempts - 1)
            if route.fallback:
                inc(m.fallbacks, (model, route.model))
            if timer.disconnected:
                inc(m.disconnects, by_model)
            if lines is None:
                continue
            line: dict[str, Any] = {
                "ts": int((epoch + end) * 1000) / 1000,
                "request_id": request.request_id,
                "kind": request.kind,
                "model": model,
                "answered_by": route.model or None,
                "deployment": route.deployment or None,
                "backend": route.backend or None,
                "attempts": route.attempts,
                "stream": request.stream,
                "status": timer.status,
                "latency_ms": _ms(end - timer.start),
                "ttft_ms": _ms(ttft) if ttft is not None else None,
                "overhead_ms": _ms(overhead),
                "prompt_tokens": usage.get("prompt_tokens") if usage else None,
                "completion_tokens": usage.get("completion_tokens") if usage else None,
                "client_disconnected": timer.disconnected,
                "error": kind,
            }
            if self.log_prompts:
                line["messages"] = request.messages
                line["prompt"] = request.prompt
                line["completion"] = completion
            lines.append(orjson.dumps(line, default=str))
        if lines:
            self.access.write(b"\n".join(lines))
