"""Prometheus metrics: counted on the event loop in plain dicts and exported through a
custom collector (prometheus_client's public API only); with several workers, each
process's totals are shared through files in `PROMETHEUS_MULTIPROC_DIR`."""

from __future__ import annotations

import glob
import itertools
import os
import platform
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from inferbridge import __version__

if TYPE_CHECKING:
    pass

_now = time.perf_counter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
FLUSH_INTERVAL = 1.0  # seconds, with several workers: how stale another worker's /metrics is
_instances = itertools.count()  # tells apart the files of several `Metrics` in one process

# -- error codes: the one vocabulary of the `code`, `kind` and `error` labels and fields -----

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
