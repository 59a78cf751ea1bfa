"""The circuit breaker: a deployment that keeps failing is taken out for a while.

States of a deployment (as `/health/readiness` reports them):

- `ok`: in service;
- `cooling_down`: `allowed_fails` failures happened within `fail_window` seconds, so it
  gets no traffic for `cooldown` seconds;
- `half_open`: the cooldown is over; the next request is sent there as a probe (one at a
  time). Its success puts the deployment back in service, its failure starts a new cooldown;
- `unhealthy`: the active health check (when configured) failed; out until it passes.

A failure is a retryable upstream error (refused connection, 5xx, 429, timeout) before or
during a response; a 4xx the backend returns for the request itself is not the
deployment's fault and does not count. Success is the first token arriving. A model's only
deployment is never taken out unless the model has fallbacks (see `Router.failed`).
"""

from __future__ import annotations

from inferbridge.routing.state import StateStore

OK = "ok"
COOLING = "cooling_down"
HALF_OPEN = "half_open"
UNHEALTHY = "unhealthy"


class Breaker:
    __slots__ = ("allowed_fails", "cooldown", "store")

    def __init__(self, store: StateStore, *, allowed_fails: int, cooldown: float) -> None:
        self.store = store
        self.allowed_fails = allowed_fails
        self.cooldown = cooldown

    def state(self, key: str, now: float) -> str:
        store = self.store
        if store.unhealthy(key):
            return UNHEALTHY
        until = store.cooldown_until(key)
        if not until:
            return OK
        return COOLING if now < until else HALF_OPEN

    def usable(self, key: str, now: float) -> bool:
        """May a request be sent to `key` now (in service, or a free half-open probe)?"""
        state = self.state(key, now)
        return state == OK or (state == HALF_OPEN and not self.store.probing(key))

    def on_success(self, key: str, probe: bool) -> None:
        if probe or self.store.cooldown_until(key):
            self.store.cool_down(key, 0.0)
            self.store.clear_failures(key)
            if probe:
                self.store.release_probe(key)

    def on_failure(self, key: str, now: float, probe: bool = False, trip: bool = True) -> bool:
        """Count a failure; True when it (re)started a cooldown (never when not `trip`)."""
        store = self.store
        if probe:
            store.release_probe(key)
            store.cool_down(key, now + self.cooldown)
            return True
        if store.add_failure(key, now) >= self.allowed_fails and trip:
            store.clear_failures(key)
            store.cool_down(key, now + self.cooldown)
            return True
        return False

    def abandon_probe(self, key: str) -> None:
        """The probe ended without a verdict (client left, request rejected)."""
        self.store.release_probe(key)
