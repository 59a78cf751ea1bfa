"""Model name -> deployment: groups, aliases, strategies, cooldowns and concurrency slots.

Config entries that share a `name` are deployments of one model (a `ModelGroup`). For each
attempt the router picks a deployment among those that are usable (not cooling down, not
failing their health check) and have a free slot, preferring a deployment whose cooldown
just ended (its half-open probe), then following the model's strategy (`strategies`). When
every usable deployment is full the request waits in a bounded queue, else gets a 429.

The router holds no state of its own: in-flight counts, latency and failures live in a
`StateStore` (`routing.state`); with a shared store (`inferbridge.shared.state`, several
replicas) slots are taken on the store's server (`_acquire_shared`). The attempt loop
(retries, fallbacks, timeouts) is in `routing.attempts`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from inferbridge.backends.base import Backend
from inferbridge.config import RouterConfig
from inferbridge.errors import ModelNotFound, RateLimited, UpstreamUnavailable
from inferbridge.routing.breaker import HALF_OPEN, OK, Breaker
from inferbridge.routing.limits import Limiter, saturated
from inferbridge.routing.state import MemoryStateStore, StateStore
from inferbridge.routing.strategies import STRATEGIES, Strategy


@dataclass(slots=True, eq=False)
class Deployment:
    """One config entry as the router sees it."""

    id: str
    """`model[i]`: the model name and the entry's position among that model's entries."""
    model: str
    backend: Backend
    limit: Limiter
    weight: float = 1.0
    ttft_timeout: float | None = None
    idle_timeout: float | None = None


@dataclass(slots=True, eq=False)
class ModelGroup:
    name: str
    deployments: list[Deployment]
    strategy_name: str
    strategy: Strategy
    retries: int
    fallbacks: list[str] = field(default_factory=list)
    chain: list[ModelGroup] = field(default_factory=list, repr=False)
    """This model, then its fallbacks (not theirs: fallbacks do not chain)."""


class Router:
    def __init__(
        self,
        backends: list[Backend],
        settings: RouterConfig | None = None,
        aliases: dict[str, str] | None = None,
        *,
        store: StateStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings = settings or RouterConfig()
        self.store: StateStore = store or MemoryStateStore(
            fail_window=settings.fail_window, latency_window=settings.latency_window
        )
        self.clock = clock
        self.shared: bool = getattr(self.store, "shared", False)
        self.breaker = Breaker(
            self.store, allowed_fails=settings.allowed_fails, cooldown=settings.cooldown
        )
        self.aliases = dict(aliases or {})
        self.models: dict[str, list[Backend]] = {}
        for backend in backends:
            self.models.setdefault(backend.config.name, []).append(backend)
        self.groups = {name: self._group(name, group) for name, group in self.models.items()}
        for group in self.groups.values():
            group.chain = [group, *(self.groups[name] for name in group.fallbacks)]

    def _group(self, name: str, backends: list[Backend]) -> ModelGroup:
        deployments = []
        for i, backend in enumerate(backends):
            cfg = backend.config
            key = cfg.id or f"{name}[{i}]"
            limit = Limiter(
                self.store,
                key,
                max_concurrent=cfg.max_concurrent,
                max_queue=cfg.max_queue,
                queue_timeout=cfg.queue_timeout,
            )
            deployments.append(
                Deployment(
                    key, name, backend, limit, cfg.weight, cfg.ttft_timeout, cfg.stream_idle_timeout
                )
            )
        own = self.settings.models.get(name)
        strategy = (own.strategy if own else None) or self.settings.strategy
        retries = own.retries if own and own.retries is not None else self.settings.retries
        fallbacks = [self.aliases.get(f, f) for f in own.fallbacks] if own else []
        return ModelGroup(
            name,
            deployments,
            strategy,
            STRATEGIES[strategy],
            retries,
            [f for f in dict.fromkeys(fallbacks) if f != name],
        )

    # -- lookup ---------------------------------------------------------------------------
    def public_names(self) -> list[str]:
        """Every name a client may send: the models, then the aliases."""
        return [*self.models, *self.aliases]

    def resolve(self, model: str) -> ModelGroup:
        group = self.groups.get(model)
        if group is None:
            target = self.aliases.get(model)
            group = self.groups.get(target) if target is not None else None
            if group is None:
                raise ModelNotFound(model)
        return group

    def deployments(self, model: str) -> list[Backend]:
        return self.models[self.resolve(model).name]

    # -- selection ------------------------------------------------------------------------
    def usable(self, group: ModelGroup, now: float) -> list[Deployment]:
        breaker = self.breaker
        return [d for d in group.deployments if breaker.usable(d.id, now)]

    def unavailable(self, group: ModelGroup, now: float) -> UpstreamUnavailable:
        """The error when no deployment of `group` may be used now."""
        ends = [self.store.cooldown_until(d.id) for d in group.deployments]
        waits = [until - now for until in ends if until > now]
        retry = max(1, math.ceil(min(waits))) if waits else 1
        return UpstreamUnavailable(
            f"No deployment of model '{group.name}' is available: every one is cooling down "
            f"after failures or failing its health check. Retry after {retry} s.",
            headers={"Retry-After": str(retry)},
        )

    async def acquire(self, group: ModelGroup, pool: list[Deployment]) -> tuple[Deployment, bool]:
        """Occupy a slot on one deployment of `pool` (all usable); returns (deployment, probe).

        `probe` is True when the request is the half-open probe of that deployment.
        Raises RateLimited when every deployment and every queue is full.
        """
        if self.shared:
            return await self._acquire_shared(group, pool)
        now = self.clock()
        breaker = self.breaker
        store = self.store
        for d in pool:
            if (
                store.cooldown_until(d.id)  # cheap test first: in service
                and breaker.state(d.id, now) == HALF_OPEN
                and d.limit.has_room()
                and store.claim_probe(d.id)
            ):
                d.limit.take()
                return d, True
        if len(pool) == 1:
            d = pool[0]
            if d.limit.has_room():
                d.limit.take()
                return d, False
        else:
            free = [d for d in pool if d.limit.has_room()]
            if free:
                d = free[0] if len(free) == 1 else group.strategy(free, self.store, now)
                d.limit.take()
                return d, False
        queues = [d for d in pool if d.limit.can_queue()]
        if not queues:
            raise self.saturated(group)
        low = min(d.limit.queued for d in queues)
        d = random.choice([d for d in queues if d.limit.queued == low])
        await d.limit.wait(group.name)
        return d, False

    async def _acquire_shared(
        self, group: ModelGroup, pool: list[Deployment]
    ) -> tuple[Deployment, bool]:
        """`acquire` with a shared store: each slot is taken on the store's server (the
        other replicas' requests count), trying deployments in the strategy's order."""
        now = self.clock()
        breaker = self.breaker
        store = self.store
        for d in pool:
            if (
                store.cooldown_until(d.id)
                and breaker.state(d.id, now) == HALF_OPEN
                and not d.limit.waiters
                and store.claim_probe(d.id)
            ):
                try:
                    taken = await d.limit.try_take()
                except BaseException:
                    breaker.abandon_probe(d.id)
                    raise
                if taken:
                    return d, True
                breaker.abandon_probe(d.id)
        candidates = [d for d in pool if not d.limit.waiters]
        while candidates:
            d = candidates[0] if len(candidates) == 1 else group.strategy(candidates, store, now)
            if await d.limit.try_take():
                return d, False
            candidates.remove(d)
        queues = [d for d in pool if d.limit.can_queue()]
        if not queues:
            raise self.saturated(group)
        low = min(d.limit.queued for d in queues)
        d = random.choice([d for d in queues if d.limit.queued == low])
        await d.limit.wait(group.name)
        return d, False

    def saturated(self, group: ModelGroup) -> RateLimited:
        return saturated(
            group.name,
            "every deployment has max_concurrent requests in flight and a full queue",
        )

    # -- outcomes -------------------------------------------------------------------------
    def succeeded(self, d: Deployment, ttft: float, probe: bool) -> None:
        self.store.add_latency(d.id, ttft, self.clock())
        self.breaker.on_success(d.id, probe)

    def failed(self, d: Deployment, probe: bool = False) -> bool:
        """Count a failure of `d`; True when it starts a cooldown.

        A model's only deployment is never taken out unless the model has fallbacks: with
        nowhere else to send the traffic, a cooldown would only replace the upstream's real
        error with a 503.
        """
        group = self.groups[d.model]
        trip = len(group.deployments) > 1 or bool(group.fallbacks)
        return self.breaker.on_failure(d.id, self.clock(), probe, trip=trip)

    def release(self, d: Deployment) -> None:
        d.limit.release()

    def backoff(self, n: int) -> float:
        """The jittered pause before the n-th retry (from 0) of a deployment already tried."""
        s = self.settings
        return min(s.retry_backoff_max, s.retry_backoff * 2**n) * random.uniform(0.5, 1.0)

    # -- readiness ------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(every model has a usable deployment, the report `/health/readiness` returns)."""
        now = self.clock()
        store = self.store
        models: dict[str, Any] = {}
        ready = True
        for name, group in self.groups.items():
            rows = []
            for d in group.deployments:
                state = self.breaker.state(d.id, now)
                latency = store.latency(d.id, now)
                rows.append(
                    {
                        "id": d.id,
                        "backend": d.backend.config.backend,
                        "state": state,
                        "in_flight": store.in_flight(d.id),
                        "queued": d.limit.queued,
                        "max_concurrent": d.limit.max_concurrent,
                        "recent_failures": store.failures(d.id, now),
                        "cooldown_remaining": round(max(0.0, store.cooldown_until(d.id) - now), 3),
                        "ttft_ms": None if latency is None else round(latency * 1000, 1),
                    }
                )
            usable = any(row["state"] in (OK, HALF_OPEN) for row in rows)
            ready = ready and usable
            models[name] = {
                "ready": usable,
                "strategy": group.strategy_name,
                "fallbacks": group.fallbacks,
                "deployments": rows,
            }
        return ready, {
            "status": "ready" if ready else "unavailable",
            "models": models,
            "aliases": self.aliases,
        }
