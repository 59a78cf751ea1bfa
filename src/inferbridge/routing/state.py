"""Routing state behind one small interface: in-flight counts, latency, failures, cooldowns.

The router never keeps this state itself; it asks a `StateStore`, keyed by deployment id
(`"mistral[0]"`: the model name and the entry's position among that model's entries). One
process uses `MemoryStateStore`; replicas behind a load balancer share
`inferbridge.shared.state.RedisStateStore` (`state: {store: redis}`) without any change to
the routing logic:

- the methods are synchronous and cheap because they run on every request: the shared
  store keeps a local copy that it refreshes in the background and sends its writes
  asynchronously, accepting that replicas see each other's failures and cooldowns a
  little late (`state.sync_interval`);
- the one exception is `try_begin`, which a shared store (`shared = True`) answers on the
  server, atomically, so that `max_concurrent` holds across replicas;
- times are passed in (`now`) rather than read, so a shared store can use wall-clock time
  while tests use a fake clock;
- every write is a small atomic operation: a counter (`begin`/`end`), a sorted set of
  failure times (`add_failure` returns the count within the window), a timestamp
  (`cool_down`), a set-if-absent flag (`claim_probe`).

Policy (how many failures trip a cooldown, which deployment to pick) lives in the router's
modules (`breaker`, `strategies`), not here.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol


class StateStore(Protocol):
    # -- load -------------------------------------------------------------------------------
    def begin(self, key: str) -> None:
        """One more request is in flight on deployment `key`."""

    def end(self, key: str) -> None:
        """A request on `key` ended (whatever the outcome)."""

    def in_flight(self, key: str) -> int: ...

    async def try_begin(self, key: str, limit: int | None) -> bool:
        """`begin` unless `limit` requests are in flight on `key` (None: no limit); the
        router calls it instead of `begin` when the store is `shared`."""
        ...

    # -- latency ------------------------------------------------------------------------------
    def add_latency(self, key: str, seconds: float, now: float) -> None:
        """Record one time-to-first-token sample."""

    def latency(self, key: str, now: float) -> float | None:
        """The recent time to first token (decayed average), or None when unknown or stale."""

    # -- failures, cooldowns, half-open probes ---------------------------------------------------
    def add_failure(self, key: str, now: float) -> int:
        """Record a failure; return how many happened within the failure window."""

    def failures(self, key: str, now: float) -> int: ...

    def clear_failures(self, key: str) -> None: ...

    def cool_down(self, key: str, until: float) -> None:
        """Take `key` out until `until` (0: back in service)."""

    def cooldown_until(self, key: str) -> float:
        """When the current cooldown ends; 0 when the deployment is in service."""

    def claim_probe(self, key: str) -> bool:
        """Claim the single half-open probe of `key`; False when someone holds it."""

    def release_probe(self, key: str) -> None: ...

    def probing(self, key: str) -> bool: ...

    # -- active health checks ---------------------------------------------------------------
    def set_unhealthy(self, key: str, unhealthy: bool) -> None: ...

    def unhealthy(self, key: str) -> bool: ...


class _Slot:
    __slots__ = ("cool_until", "failures", "in_flight", "probing", "ttft", "ttft_at", "unhealthy")

    def __init__(self) -> None:
        self.in_flight = 0
        self.ttft: float | None = None
        self.ttft_at = 0.0
        self.failures: deque[float] = deque()
        self.cool_until = 0.0
        self.probing = False
        self.unhealthy = False


class MemoryStateStore:
    """The in-process `StateStore`.

    Latency is an exponentially weighted moving average (`alpha` per sample) that expires:
    an estimate older than `latency_window` seconds counts as unknown, so a deployment that
    was slow once gets measured again instead of being avoided forever.
    """

    def __init__(
        self, *, fail_window: float = 60.0, latency_window: float = 120.0, alpha: float = 0.3
    ) -> None:
        self.fail_window = fail_window
        self.latency_window = latency_window
        self.alpha = alpha
        self._slots: dict[str, _Slot] = {}

    def _slot(self, key: str) -> _Slot:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        return slot

    def begin(self, key: str) -> None:
        self._slot(key).in_flight += 1

    def end(self, key: str) -> None:
        slot = self._slot(key)
        if slot.in_flight > 0:
            slot.in_flight -= 1

    def in_flight(self, key: str) -> int:
        slot = self._slots.get(key)
        return slot.in_flight if slot is not None else 0

    async def try_begin(self, key: str, limit: int | None) -> bool:
        slot = self._slot(key)
        if limit is not None and slot.in_flight >= limit:
            return False
        slot.in_flight += 1
        return True

    def add_latency(self, key: str, seconds: float, now: float) -> None:
        slot = self._slot(key)
        old = slot.ttft
        if old is None or now - slot.ttft_at > self.latency_window:
            slot.ttft = seconds
        else:
            slot.ttft = old + self.alpha * (seconds - old)
        slot.ttft_at = now

    def latency(self, key: str, now: float) -> float | None:
        slot = self._slots.get(key)
        if slot is None or slot.ttft is None or now - slot.ttft_at > self.latency_window:
            return None
        return slot.ttft

    def add_failure(self, key: str, now: float) -> int:
        failures = self._slot(key).failures
        failures.append(now)
        self._expire(failures, now)
        return len(failures)

    def failures(self, key: str, now: float) -> int:
        slot = self._slots.get(key)
        if slot is None:
            return 0
        self._expire(slot.failures, now)
        return len(slot.failures)

    def _expire(self, failures: deque[float], now: float) -> None:
        horizon = now - self.fail_window
        while failures and failures[0] <= horizon:
            failures.popleft()

    def clear_failures(self, key: str) -> None:
        self._slot(key).failures.clear()

    def cool_down(self, key: str, until: float) -> None:
        self._slot(key).cool_until = until

    def cooldown_until(self, key: str) -> float:
        slot = self._slots.get(key)
        return slot.cool_until if slot is not None else 0.0

    def claim_probe(self, key: str) -> bool:
        slot = self._slot(key)
        if slot.probing:
            return False
        slot.probing = True
        return True

    def release_probe(self, key: str) -> None:
        self._slot(key).probing = False

    def probing(self, key: str) -> bool:
        slot = self._slots.get(key)
        return slot is not None and slot.probing

    def set_unhealthy(self, key: str, unhealthy: bool) -> None:
        self._slot(key).unhealthy = unhealthy

    def unhealthy(self, key: str) -> bool:
        slot = self._slots.get(key)
        return slot is not None and slot.unhealthy
