"""Metrics (Prometheus), JSON access logs, and the per-request timing behind them.

This package: `Observability` (here), the one object per process the server records into;
`metrics` (the collector), `access` (access-log lines), `codes` (the error vocabulary),
`timing` (`RequestTimer`).

The OpenAI layer creates one `RequestTimer` per request, marks a few instants on it (routed,
first upstream batch, last upstream batch) and hands it to `Observability.record` once at
the end: nothing is recorded per chunk. `record` only counts the request out of the
in-flight gauge and keeps it; every `DRAIN_DELAY` (or at `DRAIN_MAX` finished requests, or
when metrics are read) `drain` turns the kept requests into metrics and access-log lines in
one pass. Access-log lines are written by a background thread (`AccessLogWriter`), so a slow
log sink never blocks the event loop. Prompts and completions appear in access logs only
with `server.log_prompts: true`.

Metrics are counted on the event loop in plain dicts (`Metrics`: no locks, no label lookups)
and exported by `Metrics.collect()`, a prometheus_client custom collector registered in the
process's `CollectorRegistry`: counters, the in-flight gauge, and histograms whose bucket
counts and sums are kept here. Only prometheus_client's public API is used (metric families
and the text exposition); counters carry no `_created` samples.

Several worker processes (`PROMETHEUS_MULTIPROC_DIR` set, as `inferbridge serve --workers N`
does): each process writes its totals to its own file in that folder,
`inferbridge_<pid>_<n>.json` (replaced atomically, only when they changed), every
`FLUSH_INTERVAL` seconds, when it stops, and whenever it answers a scrape; a scrape sums the
files of every process, so any worker's `/metrics` shows them all, up to `FLUSH_INTERVAL` late
for the others. A stopped process's file stays, so its counts stay in the sums, as Prometheus
counters should (and so does the in-flight count a crashed process last wrote).

Proxy overhead = time spent in inferbridge before the upstream call was made plus the time
from the upstream's answer (its first batch when streaming, its last otherwise) to the
response leaving inferbridge. It excludes the upstream's own time; it is reported per
request in the `x-inferbridge-overhead-ms` header and as a histogram.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import generate_latest

from inferbridge.observability.access import LOGGED, AccessLogWriter, AnswerWatch
from inferbridge.observability.codes import (
    ERROR_CODES,
    OUTCOMES,
    classify,
    code_for_status,
)
from inferbridge.observability.metrics import (
    FLUSH_INTERVAL,
    LATENCY_BUCKETS,
    OVERHEAD_BUCKETS,
    STATES,
    Metrics,
    Row,
)
from inferbridge.observability.timing import Finished, RequestTimer, ms
from inferbridge.request import InferenceRequest, RouteInfo

if TYPE_CHECKING:
    from inferbridge.router import Router

__all__ = [
    "ERROR_CODES",
    "LATENCY_BUCKETS",
    "LOGGED",
    "OUTCOMES",
    "OVERHEAD_BUCKETS",
    "STATES",
    "AccessLogWriter",
    "AnswerWatch",
    "Metrics",
    "Observability",
    "RequestTimer",
    "classify",
]

_now = time.perf_counter

DRAIN_DELAY = 0.02  # seconds a finished request waits for its metrics and access-log line
DRAIN_MAX = 256  # finished requests kept at most before they are drained


MAX_LOGGED_NAME = 200
"""Characters of a client-given model name an access-log line keeps."""


class Observability:
    """One per process: the metrics and the access log. With a `router`, `/metrics` also
    shows each deployment's state, requests in flight and queued, read when it is scraped."""

    def __init__(
        self, *, log_prompts: bool = False, access_log: bool = True, router: Router | None = None
    ) -> None:
        self.log_prompts = log_prompts
        shared_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self.multiprocess = shared_dir is not None
        self.metrics = Metrics(shared_dir)
        self.router = router
        if router is not None:
            self.metrics.deployment_rows = self.deployment_rows
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
        if self.multiprocess:  # other workers' scrapes read what this one publishes
            self._flusher = self._loop.call_later(FLUSH_INTERVAL, self._tick)

    def _tick(self) -> None:
        self.drain()
        self.metrics.publish()
        self._flusher = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._tick)

    def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        self.drain()
        self._loop = None
        self.metrics.deployment_rows = None  # a stopped process has no deployment gauges
        self.metrics.publish()
        self.access.stop()

    def exposition(self) -> bytes:
        self.drain()
        return generate_latest(self.metrics.registry)

    def deployment_rows(self) -> list[Row]:
        """The router's gauges now: each deployment's state, in-flight and queued counts."""
        router = self.router
        if router is None:
            return []
        now = router.clock()
        state = router.breaker.state
        in_flight = router.store.in_flight
        return [
            (group.name, d.id, state(d.id, now), in_flight(d.id), d.limit.queued)
            for group in router.groups.values()
            for d in group.deployments
        ]

    # -- per request ------------------------------------------------------------------------
    def rejected(
        self,
        status: int,
        *,
        code: str | None = None,
        error: BaseException | None = None,
        path: str | None = None,
        method: str | None = None,
        request_id: str | None = None,
        model: str | None = None,
        started: float | None = None,
        key: str | None = None,
    ) -> None:
        """A request answered with an error before it reached a backend (gate, schema,
        unknown model or path...): counted, and one access-log line with what is known.
        `code` is taken when it is in `ERROR_CODES`, else derived from `error` or `status`;
        `started` is its `perf_counter()` arrival."""
        m = self.metrics
        if code not in ERROR_CODES:
            code = classify(error, status)[0] if error is not None else code_for_status(status)
        m.inc(m.rejected, (str(status),))
        # a name no model has is the client's text: not a label (each would be a series)
        m.inc(m.errors, ("" if code == "model_not_found" else model or "", code))
        if self.access_enabled:
            shown = model[:MAX_LOGGED_NAME] if model else model
            self._line(status, code, path, method, request_id, shown, started, key)

    def answered(
        self,
        status: int,
        *,
        code: str | None = None,
        path: str | None = None,
        method: str | None = None,
        request_id: str | None = None,
        started: float | None = None,
        key: str | None = None,
    ) -> None:
        """A request that is not a generation (`GET /v1/models`...), whatever its status:
        an access-log line; an error status is a rejection (`rejected`)."""
        if status >= 400:
            self.rejected(
                status,
                code=code,
                path=path,
                method=method,
                request_id=request_id,
                started=started,
                key=key,
            )
        elif self.access_enabled:
            self._line(status, None, path, method, request_id, None, started, key)

    def _line(
        self,
        status: int,
        code: str | None,
        path: str | None,
        method: str | None,
        request_id: str | None,
        model: str | None,
        started: float | None,
        key: str | None = None,
    ) -> None:
        line = {
            "ts": int(time.time() * 1000) / 1000,
            "request_id": request_id,
            "method": method,
            "path": path,
            "model": model,
            "key": key or None,
            "status": status,
            "latency_ms": ms(_now() - started) if started is not None else None,
            "error": code,
        }
        self.access.write(orjson.dumps(line))

    def started(self, model: str) -> None:
        in_flight = self.metrics.in_flight
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
        self.metrics.in_flight[request.model] -= 1
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
        inc = m.inc
        observe = m.observe
        lines: list[bytes] | None = [] if self.access_enabled else None
        epoch = time.time() - _now()  # perf_counter instants -> Unix time
        for request, route, timer, usage, error, completion, end in finished:
            model = request.model
            by_model = (model,)
            deployment = route.deployment
            status = timer.status or (499 if timer.disconnected else 0)
            if error is None and not timer.disconnected and status < 400:
                kind, outcome = None, "ok"
            else:
                kind, outcome = classify(error, status, timer.disconnected)
                inc(m.errors, (model, kind))
                if error is not None and deployment:
                    inc(m.upstream_errors, (model, deployment, route.backend, kind))
            inc(m.requests, (model, deployment, route.backend, str(status)))
            by_outcome = (model, deployment, outcome)
            observe(m.latency, by_outcome, end - timer.start)
            overhead = timer.overhead
            observe(m.overhead, by_outcome, overhead)
            ttft = timer.first - timer.start if timer.first else None
            if ttft is not None:
                observe(m.ttft, by_outcome, ttft)
            if usage:
                inc(m.tokens, (model, "prompt"), usage.get("prompt_tokens", 0))
                inc(m.tokens, (model, "completion"), usage.get("completion_tokens", 0))
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
                "key": request.key or None,
                "answered_by": route.model or None,
                "deployment": route.deployment or None,
                "backend": route.backend or None,
                "attempts": route.attempts,
                "stream": request.stream,
                "status": status,
                "latency_ms": ms(end - timer.start),
                "ttft_ms": ms(ttft) if ttft is not None else None,
                "overhead_ms": ms(overhead),
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
