"""Rate limits per key and per model, and the usage counters behind `GET /v1/usage`.

A request is *admitted* before it is routed: `Quotas.admit` checks, in one step (one Redis
round trip with the shared store), every limit that applies to it:

- its key's `rpm`, `tpm` and `max_parallel` (`auth.keys`);
- its model's `rpm` and `tpm` (`router.models.<name>`, every deployment and key together).

Over a limit the client gets a 429 with `Retry-After` and OpenAI's `x-ratelimit-*` headers;
under it the same headers go on the answer (`Admission.headers`). When the request ends,
`Admission.finish` charges its tokens to the `tpm` windows (the backend's usage, or the
estimate inferbridge reports when the backend gives none), frees its `max_parallel` slot
and adds it to the day's usage counters.

Windows are sliding windows of one-second buckets: a request or token counts for the
second it happened in and the 60 after it, so it is forgotten between 60 and 61 seconds
after it was counted. Never more than `rpm` requests are admitted within any 60 seconds;
a client may be refused up to 1 second longer than an exact sliding window would. `tpm`
refuses a request once the window is spent: tokens are charged when a request ends, so
requests admitted while others run can take the window past `tpm` by what those requests
use (docs/keys-and-limits.md).

`MemoryQuotaStore` keeps all of this in the process; `inferbridge.shared.quotas` in Redis.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from inferbridge.errors import InferbridgeError, RateLimited

if TYPE_CHECKING:
    from inferbridge.config import RouterConfig
    from inferbridge.keys import Identity
    from inferbridge.observability import Observability

log = logging.getLogger("inferbridge.limits")

WINDOW = 60
"""Seconds of a window."""
BUCKETS = WINDOW + 1
"""One-second buckets counted: the current second and the 60 before it."""


class StoreUnavailable(InferbridgeError):
    """503: the shared store did not answer and `state.on_store_error` is `deny`."""

    status = 503
    type = "server_error"
    code = "store_unavailable"


class StoreError(Exception):
    """A call to the shared store failed or took longer than `state.timeout`."""


def refused_by_store() -> StoreUnavailable:
    return StoreUnavailable(
        "The rate-limit store is unavailable and this server is set to refuse requests "
        "then (state.on_store_error: deny). Retry after 1 s.",
        headers={"Retry-After": "1"},
    )


# -- what is limited ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Subject:
    """A key or a model, with the limits that apply to it."""

    kind: str
    """`key` or `model`."""
    name: str
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    def label(self) -> str:
        return f"{self.kind} '{self.name}'"


@dataclass(slots=True)
class Reading:
    """One subject's windows at the check (this request included when it was admitted)."""

    requests: int = 0
    requests_retry: float = 0.0
    """Seconds until one more request fits (0: it does)."""
    requests_reset: float = 0.0
    """Seconds until the request window is empty."""
    tokens: int = 0
    tokens_retry: float = 0.0
    tokens_reset: float = 0.0
    parallel: int = 0


@dataclass(slots=True)
class Verdict:
    admitted: bool
    readings: list[Reading]


UsageRow = tuple[str, str, int, int]
"""key name, model, prompt tokens, completion tokens (one request)."""


class QuotaStore(Protocol):
    """Where windows, `max_parallel` counts and usage counters live."""

    async def admit(
        self, subjects: Sequence[Subject], lease: str, now: float | None = None
    ) -> Verdict:
        """Check every subject's limits; when none is reached count the request (rpm) and
        take a `max_parallel` slot under `lease`, atomically. `now`: tests' clock."""
        ...

    def finish(
        self,
        subjects: Sequence[Subject],
        lease: str,
        tokens: int,
        usage: UsageRow | None,
        now: float | None = None,
    ) -> None:
        """The request ended: charge `tokens`, free `lease`, count `usage` (may be sent in
        the background)."""
        ...

    async def usage(self, days: Sequence[str]) -> dict[str, dict[tuple[str, str], list[int]]]:
        """day -> (key, model) -> [requests, prompt tokens, completion tokens]."""
        ...


# -- windows in memory ----------------------------------------------------------------------
class SlidingWindow:
    """Amounts in one-second buckets, the last `BUCKETS` of them counted."""

    __slots__ = ("buckets",)

    def __init__(self) -> None:
        self.buckets: deque[list[int]] = deque()  # [second, amount], oldest first

    def _trim(self, now: float) -> None:
        horizon = math.floor(now) - WINDOW
        buckets = self.buckets
        while buckets and buckets[0][0] < horizon:
            buckets.popleft()

    def used(self, now: float) -> int:
        self._trim(now)
        return sum(amount for _, amount in self.buckets)

    def add(self, now: float, amount: int) -> None:
        if amount <= 0:
            return
        self._trim(now)
        second = math.floor(now)
        buckets = self.buckets
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += amount
        else:
            buckets.append([second, amount])

    def retry(self, now: float, limit: int) -> float:
        """Seconds until what is counted is below `limit` (0: it is now)."""
        left = self.used(now)
        if left < limit:
            return 0.0
        for second, amount in self.buckets:
            left -= amount
            if left < limit:
                return second + BUCKETS - now
        return 0.0  # pragma: no cover - left reaches 0 < limit

    def reset(self, now: float) -> float:
        """Seconds until nothing is counted."""
        self._trim(now)
        return self.buckets[-1][0] + BUCKETS - now if self.buckets else 0.0

    def empty(self) -> bool:
        return not self.buckets


def utc_day(now: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now))


class MemoryQuotaStore:
    """The in-process `QuotaStore` (`state: {store: memory}`)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.requests: dict[str, SlidingWindow] = {}
        self.tokens: dict[str, SlidingWindow] = {}
        self.parallel: dict[str, set[str]] = {}
        self.days: dict[str, dict[tuple[str, str], list[int]]] = {}

    def _window(self, table: dict[str, SlidingWindow], key: str) -> SlidingWindow:
        window = table.get(key)
        if window is None:
            window = table[key] = SlidingWindow()
        return window

    async def admit(
        self, subjects: Sequence[Subject], lease: str, now: float | None = None
    ) -> Verdict:
        return self.admit_now(subjects, lease, self.clock() if now is None else now)

    def admit_now(self, subjects: Sequence[Subject], lease: str, now: float) -> Verdict:
        readings = []
        admitted = True
        for s in subjects:
            r = Reading()
            if s.rpm:
                w = self._window(self.requests, s.id)
                r.requests = w.used(now)
                r.requests_retry = w.retry(now, s.rpm)
                r.requests_reset = w.reset(now)
                admitted = admitted and r.requests < s.rpm
            if s.tpm:
                w = self._window(self.tokens, s.id)
                r.tokens = w.used(now)
                r.tokens_retry = w.retry(now, s.tpm)
                r.tokens_reset = w.reset(now)
                admitted = admitted and r.tokens < s.tpm
            if s.max_parallel:
                r.parallel = len(self.parallel.get(s.id, ()))
                admitted = admitted and r.parallel < s.max_parallel
            readings.append(r)
        if admitted:
            for s, r in zip(subjects, readings, strict=True):
                if s.rpm:
                    w = self.requests[s.id]
                    w.add(now, 1)
                    r.requests += 1
                    r.requests_reset = w.reset(now)
                if s.max_parallel:
                    self.parallel.setdefault(s.id, set()).add(lease)
                    r.parallel += 1
        return Verdict(admitted, readings)

    def finish(
        self,
        subjects: Sequence[Subject],
        lease: str,
        tokens: int,
        usage: UsageRow | None,
        now: float | None = None,
    ) -> None:
        now = self.clock() if now is None else now
        for s in subjects:
            if s.tpm and tokens:
                self._window(self.tokens, s.id).add(now, tokens)
            if s.max_parallel:
                held = self.parallel.get(s.id)
                if held is not None:
                    held.discard(lease)
                    if not held:
                        del self.parallel[s.id]
        if usage is not None:
            day = utc_day(now)
            rows = self.days.get(day)
            if rows is None:
                rows = self.days[day] = {}
                for old in sorted(self.days)[:-2]:  # today and yesterday are enough
                    del self.days[old]
            key, model, prompt, completion = usage
            row = rows.get((key, model))
            if row is None:
                row = rows[(key, model)] = [0, 0, 0]
            row[0] += 1
            row[1] += prompt
            row[2] += completion

    async def usage(self, days: Sequence[str]) -> dict[str, dict[tuple[str, str], list[int]]]:
        return {day: {k: list(v) for k, v in self.days.get(day, {}).items()} for day in days}


# -- headers --------------------------------------------------------------------------------
def duration(seconds: float) -> str:
    """A duration as OpenAI writes its `x-ratelimit-reset-*` headers (Go's format):
    `0s`, `250ms`, `1s`, `8.5s`, `6m0s`, `1h2m3s`."""
    if seconds <= 0:
        return "0s"
    ms = math.ceil(seconds * 1000)
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    if minutes:
        return f"{minutes}m{secs}"
    return secs


def limit_headers(subjects: Sequence[Subject], readings: Sequence[Reading]) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers for the tightest request and token limits."""
    headers: dict[str, str] = {}
    best: tuple[int, int, float] | None = None
    for s, r in zip(subjects, readings, strict=True):
        if s.rpm and (best is None or s.rpm - r.requests < best[0] - best[1]):
            best = (s.rpm, r.requests, r.requests_reset)
    if best is not None:
        limit, used, reset = best
        headers["x-ratelimit-limit-requests"] = str(limit)
        headers["x-ratelimit-remaining-requests"] = str(max(0, limit - used))
        headers["x-ratelimit-reset-requests"] = duration(reset)
    best = None
    for s, r in zip(subjects, readings, strict=True):
        if s.tpm and (best is None or s.tpm - r.tokens < best[0] - best[1]):
            best = (s.tpm, r.tokens, r.tokens_reset)
    if best is not None:
        limit, used, reset = best
        headers["x-ratelimit-limit-tokens"] = str(limit)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, limit - used))
        headers["x-ratelimit-reset-tokens"] = duration(reset)
    return headers


def refusal(
    subjects: Sequence[Subject], readings: Sequence[Reading]
) -> tuple[RateLimited, list[str]]:
    """The 429 for a request over one or more limits, and which (`key_rpm`, ...)."""
    reasons: list[str] = []
    names: list[str] = []
    waits: list[float] = []
    for s, r in zip(subjects, readings, strict=True):
        if s.rpm and r.requests >= s.rpm:
            reasons.append(f"{s.label}: {s.rpm} requests per minute (rpm)")
            names.append(f"{s.kind}_rpm")
            waits.append(r.requests_retry)
        if s.tpm and r.tokens >= s.tpm:
            reasons.append(f"{s.label}: {s.tpm} tokens per minute (tpm), {r.tokens} used")
            names.append(f"{s.kind}_tpm")
            waits.append(r.tokens_retry)
        if s.max_parallel and r.parallel >= s.max_parallel:
            reasons.append(f"{s.label}: {s.max_parallel} requests in flight (max_parallel)")
            names.append(f"{s.kind}_max_parallel")
            waits.append(1.0)
    retry = max(1, math.ceil(max(waits, default=1.0)))
    error = RateLimited(
        f"Rate limit reached for {'; '.join(reasons)}. Retry after {retry} s.",
        headers={"Retry-After": str(retry), **limit_headers(subjects, readings)},
    )
    return error, names


# -- one request ----------------------------------------------------------------------------
_leases = itertools.count()
REPLICA = os.urandom(6).hex()
"""This process's id in lease names (`<replica>:<n>`)."""


def new_lease() -> str:
    return f"{REPLICA}:{next(_leases)}"


@dataclass(slots=True)
class Admission:
    """An admitted request: the headers for its answer, and what `finish` must undo and
    charge."""

    quotas: Quotas | None
    key: str
    model: str
    subjects: list[Subject] = field(default_factory=list)
    lease: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    done: bool = False
    estimate: int = 0
    """Prompt tokens estimated at the start: charged when the request ends without usage
    (a stream cut short)."""

    def finish(self, usage: dict[str, Any] | None, status: int) -> None:
        """The request ended (`usage`: OpenAI's usage object, None when unknown)."""
        if self.done or self.quotas is None:
            return
        self.done = True
        self.quotas.finish(self, usage, status)


NO_LIMITS = Admission(None, "", "", done=True)
"""The admission of requests that nothing limits or counts (auth off, no model limits)."""


class Quotas:
    """Limits and usage for the gateway: which subjects apply to a request, the store's
    verdict, the policy when the store fails, metrics."""

    def __init__(
        self,
        store: QuotaStore,
        router: RouterConfig,
        observability: Observability,
        *,
        on_store_error: str = "allow",
        shared: bool = False,
    ) -> None:
        self.store = store
        self.observability = observability
        self.deny = on_store_error == "deny"
        self.shared = shared
        self.models: dict[str, Subject] = {
            name: Subject("model", name, routing.rpm, routing.tpm)
            for name, routing in router.models.items()
            if routing.rpm or routing.tpm
        }
        self._keys: dict[str, Subject] = {}

    @property
    def limited(self) -> bool:
        return bool(self.models)

    def subjects(self, identity: Identity | None, model: str) -> list[Subject]:
        out = []
        if identity is not None and identity.limited:
            subject = self._keys.get(identity.name)
            if subject is None:
                subject = self._keys[identity.name] = Subject(
                    "key", identity.name, identity.rpm, identity.tpm, identity.max_parallel
                )
            out.append(subject)
        by_model = self.models.get(model)
        if by_model is not None:
            out.append(by_model)
        return out

    async def admit(self, identity: Identity | None, model: str, requested: str) -> Admission:
        """Admit a request for `model` (`requested`: the name the client sent) or raise
        RateLimited (429) / StoreUnavailable (503, `on_store_error: deny`)."""
        subjects = self.subjects(identity, model)
        key = identity.name if identity is not None else ""
        if not subjects:
            return Admission(self, key, requested) if identity is not None else NO_LIMITS
        lease = new_lease()
        try:
            verdict = await self.store.admit(subjects, lease)
        except StoreError:
            if self.deny:
                raise refused_by_store() from None
            return Admission(self, key, requested)  # allowed, without limits this time
        if not verdict.admitted:
            error, names = refusal(subjects, verdict.readings)
            m = self.observability.metrics
            m.inc(m.rate_limited, (key, requested, names[0] if names else ""))
            m.inc(m.key_requests, (key, requested, "429"))
            self._remaining(subjects, verdict.readings)
            raise error
        self._remaining(subjects, verdict.readings)
        return Admission(
            self, key, requested, subjects, lease, limit_headers(subjects, verdict.readings)
        )

    def _remaining(self, subjects: list[Subject], readings: list[Reading]) -> None:
        """`inferbridge_ratelimit_remaining` (per process: left out with several workers)."""
        m = self.observability.metrics
        if m.shared_dir:
            return
        counts = m.counts
        for s, r in zip(subjects, readings, strict=True):
            if s.rpm:
                counts[(m.ratelimit_remaining, (s.id, "requests"))] = max(0, s.rpm - r.requests)
            if s.tpm:
                counts[(m.ratelimit_remaining, (s.id, "tokens"))] = max(0, s.tpm - r.tokens)

    def finish(self, admission: Admission, usage: dict[str, Any] | None, status: int) -> None:
        prompt = completion = 0
        if usage:
            prompt = int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0)
            completion = int(usage.get("completion_tokens") or usage.get("output_tokens") or 0)
        elif status == 200 or not status:
            prompt = admission.estimate  # started, ended without usage: the prompt at least
        key, model = admission.key, admission.model
        row = (key, model, prompt, completion) if key else None
        if row is not None:
            m = self.observability.metrics
            m.inc(m.key_requests, (key, model, str(status)))
            if prompt:
                m.inc(m.key_tokens, (key, model, "prompt"), prompt)
            if completion:
                m.inc(m.key_tokens, (key, model, "completion"), completion)
        if row is None and not admission.subjects:
            return
        with contextlib.suppress(StoreError):  # counted and logged by the store
            self.store.finish(admission.subjects, admission.lease, prompt + completion, row)

    async def usage(self, now: float | None = None) -> dict[str, Any]:
        """`GET /v1/usage`: today and yesterday (UTC), per key and model."""
        now = time.time() if now is None else now
        days = [utc_day(now), utc_day(now - 86_400)]
        try:
            found = await self.store.usage(days)
        except StoreError:
            raise refused_by_store_usage() from None
        out = []
        for day in days:
            rows = [
                {
                    "key": key,
                    "model": model,
                    "requests": requests,
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                }
                for (key, model), (requests, prompt, completion) in sorted(found[day].items())
            ]
            out.append({"date": day, "usage": rows})
        return {"object": "usage", "store": "redis" if self.shared else "memory", "days": out}


def refused_by_store_usage() -> StoreUnavailable:
    return StoreUnavailable(
        "The usage store is unavailable. Retry after 1 s.", headers={"Retry-After": "1"}
    )
