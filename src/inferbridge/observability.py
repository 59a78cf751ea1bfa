"""Metrics (Prometheus), JSON access logs, and the per-request timing behind them.

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
import contextlib
import glob
import itertools
import os
import platform
import queue
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from inferbridge import __version__
from inferbridge.errors import InferbridgeError, UpstreamError, UpstreamRejected
from inferbridge.request import InferenceRequest, RouteInfo

if TYPE_CHECKING:
    from inferbridge.router import Router

_now = time.perf_counter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
FLUSH_INTERVAL = 1.0  # seconds, with several workers: how stale another worker's /metrics is
DRAIN_DELAY = 0.02  # seconds a finished request waits for its metrics and access-log line
DRAIN_MAX = 256  # finished requests kept at most before they are drained

_instances = itertools.count()  # tells apart the files of several `Metrics` in one process

# -- error codes: the one vocabulary of the `code`, `kind` and `error` labels and fields -----
ERROR_CODES: dict[str, str] = {
    "invalid_request": "400: the request is malformed (JSON, schema, values, choices)",
    "unsupported_parameter": "400: a parameter the model's backend does not support",
    "context_length_exceeded": "400: the prompt is longer than the model's context",
    "chat_template_error": "400: the model's chat template refused the conversation",
    "invalid_api_key": "401: missing or wrong API key",
    "expired_api_key": "401: the key is past its expires_at",
    "insufficient_permissions": "403: the key may not do this (GET /v1/usage without an admin key)",
    "not_found": "404: unknown path or stored object",
    "model_not_found": "404: unknown model",
    "method_not_allowed": "405: wrong method for the path",
    "request_timeout": "408: the body did not arrive within server.body_timeout",
    "request_too_large": "413: body over server.max_body_bytes",
    "unsupported_media_type": "415: a POST whose body is not JSON",
    "headers_too_large": "431: headers over server.max_header_bytes",
    "rate_limit_exceeded": "429: every deployment full (limits), or the upstream's 429",
    "client_error": "another 4xx",
    "client_disconnected": "the client left before the end (499 before the answer started)",
    "upstream_rejected": "the upstream refused the request itself (its 4xx, relayed)",
    "upstream_error": "502: the upstream failed, refused the connection or broke its protocol",
    "deployment_misconfigured": "502: the deployment cannot serve the request as configured",
    "upstream_unavailable": "503: the upstream is not ready, or every deployment cools down",
    "upstream_timeout": "504: the upstream did not answer in time",
    "internal_error": "500: a bug in inferbridge (logged with its traceback)",
    "store_unavailable": "503: the shared state store did not answer (on_store_error: deny)",
    "server_error": "another 5xx",
}
"""code -> meaning. Every `code` (`inferbridge_errors_total`), `kind`
(`inferbridge_upstream_errors_total`) and access-log `error` is one of these."""

_BY_STATUS = {
    400: "invalid_request",
    401: "invalid_api_key",
    403: "insufficient_permissions",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limit_exceeded",
    431: "headers_too_large",
    499: "client_disconnected",
    500: "internal_error",
    502: "upstream_error",
    503: "upstream_unavailable",
    504: "upstream_timeout",
}

OUTCOMES = ("ok", "client_error", "upstream_error")
"""The `outcome` label of the histograms: answered; refused or left by the client (4xx,
the limits' 429, disconnects, a 4xx the upstream gave the request); failed upstream or in
the server (5xx, the upstream's 429, a stream cut by its upstream)."""


def code_for_status(status: int) -> str:
    return _BY_STATUS.get(status) or ("client_error" if status < 500 else "server_error")


def classify(
    error: BaseException | None, status: int, disconnected: bool = False
) -> tuple[str | None, str]:
    """(error code from `ERROR_CODES` or None, outcome from `OUTCOMES`) of a request that
    ended with `error` (or none), `status`, and whether its client left."""
    if error is None:
        if disconnected:
            return "client_disconnected", "client_error"
        if status < 400:
            return None, "ok"
        return code_for_status(status), "client_error" if status < 500 else "upstream_error"
    code = getattr(error, "code", None)
    if isinstance(error, UpstreamError) and (
        error.retryable or not isinstance(error, UpstreamRejected)
    ):  # the upstream failed (its 429 included), not the request
        if code not in ERROR_CODES:
            code = _BY_STATUS.get(error.status) if error.status >= 500 else None
        return code or "upstream_error", "upstream_error"
    if not isinstance(error, InferbridgeError):
        return "internal_error", "upstream_error"
    status = error.status
    if code not in ERROR_CODES:
        code = "upstream_rejected" if isinstance(error, UpstreamRejected) else None
    return code or code_for_status(status), "client_error" if status < 500 else "upstream_error"


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

Labels = tuple[str, ...]

Row = tuple[str, str, str, int, int]
"""One deployment's gauges: model, deployment id, state, requests in flight, queued."""

STATES = ("ok", "half_open", "cooling_down", "unhealthy")
"""Deployment states (`routing.breaker`), from best to worst: with several processes a
deployment shows the worst state any process sees."""


class Family:
    """One metric: kind (`counter`, `gauge` or `histogram`), name (a counter's without the
    `_total` the exposition adds), help, label names, and a histogram's bucket bounds."""

    __slots__ = ("bounds", "help", "kind", "labels", "le", "name")

    def __init__(
        self, kind: str, name: str, help: str, labels: Labels, bounds: tuple[float, ...] = ()
    ) -> None:
        self.kind = kind
        self.name = name
        self.help = help
        self.labels = labels
        self.bounds = tuple(float(b) for b in bounds)
        # the `le` label of each bucket, as prometheus_client prints it (for bounds < 1e6)
        self.le = (*(repr(b) for b in self.bounds), "+Inf")

    def __repr__(self) -> str:
        return f"<Family {self.name}>"


class Metrics(Collector):
    """What this process counted, in plain dicts, and their export to Prometheus.

    The serving loop is single-threaded, so counting needs no lock: a request costs a few dict
    updates. `counts` holds counter totals, `observed` each histogram's counts per bucket (not
    cumulative; the last bucket is +Inf) followed by the sum of the observed values,
    `in_flight` the requests being served per model. `collect()` turns them into metric
    families when the registry is read; with a `shared_dir` it sums every process's
    totals published there (`publish()`).
    """

    def __init__(self, shared_dir: str | None = None) -> None:
        route = ("model", "deployment", "backend")
        by_outcome = ("model", "deployment", "outcome")
        self.requests = Family(
            "counter",
            "inferbridge_requests",
            "Requests by model, deployment, backend and HTTP status",
            (*route, "status"),
        )
        self.latency = Family(
            "histogram",
            "inferbridge_request_duration_seconds",
            "Whole request duration",
            by_outcome,
            LATENCY_BUCKETS,
        )
        self.ttft = Family(
            "histogram",
            "inferbridge_time_to_first_token_seconds",
            "Time until the first upstream batch",
            by_outcome,
            LATENCY_BUCKETS,
        )
        self.overhead = Family(
            "histogram",
            "inferbridge_proxy_overhead_seconds",
            "Time spent in inferbridge, excluding the upstream",
            by_outcome,
            OVERHEAD_BUCKETS,
        )
        self.tokens = Family(
            "counter",
            "inferbridge_tokens",
            "Tokens by model and kind (prompt/completion)",
            ("model", "kind"),
        )
        self.requests_in_flight = Family(
            "gauge", "inferbridge_requests_in_flight", "Requests being served", ("model",)
        )
        self.upstream_errors = Family(
            "counter",
            "inferbridge_upstream_errors",
            "Failed requests that reached a deployment, by error code (kind)",
            (*route, "kind"),
        )
        self.errors = Family(
            "counter",
            "inferbridge_errors",
            "Requests that ended with an error, by model and error code",
            ("model", "code"),
        )
        self.retries = Family(
            "counter", "inferbridge_retries", "Extra upstream attempts", ("model",)
        )
        self.fallbacks = Family(
            "counter",
            "inferbridge_fallbacks",
            "Requests answered by a fallback model",
            ("model", "fallback"),
        )
        self.rejected = Family(
            "counter",
            "inferbridge_rejected_requests",
            "Requests answered with an error before reaching a backend (bad body, auth, "
            "unknown model...)",
            ("status",),
        )
        self.disconnects = Family(
            "counter",
            "inferbridge_client_disconnects",
            "Clients that left before the end",
            ("model",),
        )
        self.families = (
            self.requests,
            self.latency,
            self.ttft,
            self.overhead,
            self.tokens,
            self.requests_in_flight,
            self.upstream_errors,
            self.retries,
            self.fallbacks,
            self.rejected,
            self.disconnects,
            self.errors,
            *self._limit_families(),
        )
        self.counts: dict[tuple[Family, Labels], float] = {}
        self.observed: dict[tuple[Family, Labels], list[float]] = {}
        self.in_flight: dict[str, int] = {}
        self.shared_dir = shared_dir
        self._path = (
            os.path.join(shared_dir, f"inferbridge_{os.getpid()}_{next(_instances)}.json")
            if shared_dir
            else None
        )
        self._published = b""
        self.deployment_rows: Callable[[], list[Row]] | None = None
        """The router's gauges now, one row per deployment (set by `Observability`)."""
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def _limit_families(self) -> tuple[Family, ...]:
        """Keys, rate limits and the shared store (`quotas`, `shared.client`)."""
        by_key = ("key", "model")
        self.key_requests = Family(
            "counter",
            "inferbridge_key_requests",
            "Requests by key name, model and HTTP status",
            (*by_key, "status"),
        )
        self.key_tokens = Family(
            "counter",
            "inferbridge_key_tokens",
            "Tokens by key name, model and kind",
            (*by_key, "kind"),
        )
        self.rate_limited = Family(
            "counter",
            "inferbridge_rate_limited",
            "429s of the key and model limits, by key name, model and limit (key_rpm...)",
            (*by_key, "limit"),
        )
        self.ratelimit_remaining = Family(
            "gauge",
            "inferbridge_ratelimit_remaining",
            "Requests or tokens left in a limit's window at its last check (one process)",
            ("subject", "limit"),
        )
        self.store_errors = Family(
            "counter",
            "inferbridge_state_store_errors",
            "Calls to the shared state store that failed or were skipped while it was down",
            ("operation",),
        )
        return (
            self.key_requests,
            self.key_tokens,
            self.rate_limited,
            self.ratelimit_remaining,
            self.store_errors,
        )

    # -- counting (on the serving loop) ----------------------------------------------------
    def inc(self, family: Family, labels: Labels, amount: float = 1.0) -> None:
        key = (family, labels)
        counts = self.counts
        counts[key] = counts.get(key, 0.0) + amount

    def observe(self, family: Family, labels: Labels, value: float) -> None:
        key = (family, labels)
        entry = self.observed.get(key)
        bounds = family.bounds
        if entry is None:
            entry = self.observed[key] = [0.0] * (len(bounds) + 2)
        entry[bisect_left(bounds, value)] += 1  # `le` is inclusive: a bound's own value is in
        entry[-1] += value

    # -- several processes -----------------------------------------------------------------
    def publish(self) -> None:
        """With a shared folder: write this process's totals there for every process's
        scrapes (replaced atomically, and only when they changed)."""
        path = self._path
        if path is None:
            return
        data = orjson.dumps(
            {
                "counts": [[f.name, labels, v] for (f, labels), v in self.counts.items()],
                "observed": [[f.name, labels, e] for (f, labels), e in self.observed.items()],
                "in_flight": self.in_flight,
                "deployments": self.deployment_rows() if self.deployment_rows else [],
            }
        )
        if data == self._published:
            return
        temporary = path + ".tmp"
        try:
            with open(temporary, "wb") as file:
                file.write(data)
            os.replace(temporary, path)
        except OSError:  # full disk, folder removed...: the next publish tries again
            return
        self._published = data

    def _shared_totals(self, shared_dir: str) -> tuple[dict, dict, dict[str, int], list[Row]]:
        """`counts`, `observed` and `in_flight` summed over every process's published file,
        and the deployment gauges of the processes still running, merged (`merge_rows`)."""
        by_name = {f.name: f for f in self.families}
        counts: dict[tuple[Family, Labels], float] = {}
        observed: dict[tuple[Family, Labels], list[float]] = {}
        in_flight: dict[str, int] = {}
        rows: list[Row] = []
        pattern = os.path.join(glob.escape(shared_dir), "inferbridge_*.json")
        for path in sorted(glob.glob(pattern)):
            try:
                with open(path, "rb") as file:
                    published = orjson.loads(file.read())
            except (OSError, ValueError):
                continue
            if published.get("deployments") and _running(path):
                rows.extend(tuple(row) for row in published["deployments"])
            for name, labels, value in published["counts"]:
                family = by_name.get(name)
                if family is not None:
                    key = (family, tuple(labels))
                    counts[key] = counts.get(key, 0.0) + value
            for name, labels, entry in published["observed"]:
                family = by_name.get(name)
                if family is None or len(entry) != len(family.bounds) + 2:
                    continue  # written by a version with other buckets
                key = (family, tuple(labels))
                total = observed.get(key)
                if total is None:
                    observed[key] = entry
                else:
                    for index, value in enumerate(entry):
                        total[index] += value
            for model, value in published["in_flight"].items():
                in_flight[model] = in_flight.get(model, 0) + value
        return counts, observed, in_flight, merge_rows(rows)

    # -- export (prometheus_client custom collector) ---------------------------------------
    def collect(self) -> Iterable[Metric]:
        if self.shared_dir:
            self.publish()
            counts, observed, in_flight, rows = self._shared_totals(self.shared_dir)
        else:
            counts, observed, in_flight = self.counts, self.observed, self.in_flight
            rows = self.deployment_rows() if self.deployment_rows else []
        kinds = {
            "counter": CounterMetricFamily,
            "gauge": GaugeMetricFamily,
            "histogram": HistogramMetricFamily,
        }
        out: dict[Family, Any] = {
            f: kinds[f.kind](f.name, f.help, labels=f.labels) for f in self.families
        }
        for (family, labels), value in counts.items():
            out[family].add_metric(labels, value)
        for (family, labels), entry in observed.items():
            buckets = list(zip(family.le, itertools.accumulate(entry[:-1]), strict=True))
            out[family].add_metric(labels, buckets, entry[-1])
        gauge = out[self.requests_in_flight]
        for model, value in in_flight.items():
            gauge.add_metric((model,), value)
        return [*out.values(), *deployment_gauges(rows, self.deployment_rows is not None)]


def _running(path: str) -> bool:
    """Whether the process that wrote `path` (`inferbridge_<pid>_<n>.json`) still runs."""
    try:
        pid = int(os.path.basename(path).split("_")[1])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def merge_rows(rows: list[Row]) -> list[Row]:
    """Rows of several processes as one row per deployment: in-flight and queued summed,
    the worst state (`STATES`)."""
    if not rows:
        return rows
    merged: dict[tuple[str, str], list[Any]] = {}
    rank = {state: i for i, state in enumerate(STATES)}
    for model, deployment, state, in_flight, queued in rows:
        entry = merged.get((model, deployment))
        if entry is None:
            merged[(model, deployment)] = [state, in_flight, queued]
            continue
        if rank.get(state, 0) > rank.get(entry[0], 0):
            entry[0] = state
        entry[1] += in_flight
        entry[2] += queued
    return [(m, d, state, n, q) for (m, d), (state, n, q) in merged.items()]


def deployment_gauges(rows: list[Row], with_router: bool) -> list[Metric]:
    """`inferbridge_build_info`, and with a router: each deployment's state (one series per
    state, 1 for the current one), requests in flight and queued."""
    info = GaugeMetricFamily(
        "inferbridge_build_info",
        "inferbridge's version and the Python running it (always 1)",
        labels=("version", "python"),
    )
    info.add_metric((__version__, platform.python_version()), 1)
    if not with_router and not rows:
        return [info]
    labels = ("model", "deployment")
    state = GaugeMetricFamily(
        "inferbridge_deployment_state",
        "1 for the deployment's current state (ok, half_open, cooling_down, unhealthy), else 0",
        labels=(*labels, "state"),
    )
    in_flight = GaugeMetricFamily(
        "inferbridge_deployment_in_flight",
        "Requests holding a slot on the deployment now",
        labels=labels,
    )
    queued = GaugeMetricFamily(
        "inferbridge_deployment_queue_depth",
        "Requests waiting for a slot on the deployment (its max_queue)",
        labels=labels,
    )
    for model, deployment, current, n, q in rows:
        for name in STATES:
            state.add_metric((model, deployment, name), 1 if name == current else 0)
        in_flight.add_metric((model, deployment), n)
        queued.add_metric((model, deployment), q)
    return [info, state, in_flight, queued]


LOGGED = "access_logged"
"""Key set in the ASGI scope's `state` when a generation route took the request's access-log
line (and metrics) on itself (`api.serving`); other requests are logged by `AnswerWatch`."""


def envelope_code(body: bytes | None) -> str | None:
    """The `code` of an OpenAI error envelope (None for another body)."""
    if not body:
        return None
    try:
        error = orjson.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


class AnswerWatch:
    """The gate's view of a request that passed it: its status (and an error's body) seen
    through its ASGI `send`. When the route did not log the request itself (`LOGGED`: the
    generation routes do), `serve` logs it once the app is done: `/v1/models`, a body the
    schema refused (400), an unknown path (404), token counts... Costs one call per
    message sent."""

    __slots__ = ("body", "observability", "request_id", "send", "started", "status")

    def __init__(self, observability: Observability, send: Any, request_id: str) -> None:
        self.observability = observability
        self.send = send
        self.request_id = request_id
        self.started = _now()
        self.status = 0
        self.body: bytes | None = None

    def __call__(self, message: dict[str, Any]) -> Any:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif self.body is None and self.status >= 400:
            self.body = message.get("body", b"")
        return self.send(message)

    async def serve(self, app: Any, scope: dict[str, Any], receive: Any) -> None:
        try:
            await app(scope, receive, self)
        except BaseException as exc:
            gone = isinstance(exc, asyncio.CancelledError)
            self._log(scope, self.status or (499 if gone else 500))
            raise
        self._log(scope, self.status or 500)

    def _log(self, scope: dict[str, Any], status: int) -> None:
        if scope["state"].get(LOGGED):
            return
        self.observability.answered(
            status,
            code=envelope_code(self.body) if status >= 400 else None,
            path=scope["path"],
            method=scope["method"],
            request_id=self.request_id,
            started=self.started,
        )


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
    ) -> None:
        """A request answered with an error before it reached a backend (gate, schema,
        unknown model or path...): counted, and one access-log line with what is known.
        `code` is taken when it is in `ERROR_CODES`, else derived from `error` or `status`;
        `started` is its `perf_counter()` arrival."""
        m = self.metrics
        if code not in ERROR_CODES:
            code = classify(error, status)[0] if error is not None else code_for_status(status)
        m.inc(m.rejected, (str(status),))
        m.inc(m.errors, (model or "", code))
        if self.access_enabled:
            self._line(status, code, path, method, request_id, model, started)

    def answered(
        self,
        status: int,
        *,
        code: str | None = None,
        path: str | None = None,
        method: str | None = None,
        request_id: str | None = None,
        started: float | None = None,
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
            )
        elif self.access_enabled:
            self._line(status, None, path, method, request_id, None, started)

    def _line(
        self,
        status: int,
        code: str | None,
        path: str | None,
        method: str | None,
        request_id: str | None,
        model: str | None,
        started: float | None,
    ) -> None:
        line = {
            "ts": int(time.time() * 1000) / 1000,
            "request_id": request_id,
            "method": method,
            "path": path,
            "model": model,
            "status": status,
            "latency_ms": _ms(_now() - started) if started is not None else None,
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
                "answered_by": route.model or None,
                "deployment": route.deployment or None,
                "backend": route.backend or None,
                "attempts": route.attempts,
                "stream": request.stream,
                "status": status,
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
