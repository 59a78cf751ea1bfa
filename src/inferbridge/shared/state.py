"""`RedisStateStore`: the router's `StateStore` shared by every replica through Redis.

What is shared, and how fresh each replica's view is:

- **in-flight counts**: a sorted set of leases per deployment. A slot is taken atomically
  on the server (`try_begin`, one script call that checks `max_concurrent` against every
  replica's leases), so `max_concurrent` holds across replicas. Counts for least-busy and
  `/health/readiness` are this replica's own leases plus the others' as last read.
- **failures, cooldowns, half-open probes**: written in the background as they happen,
  read every `state.sync_interval` (0.25 s): a cooldown started by one replica is honoured
  by the others within that interval plus a round trip. Two replicas may each send a probe
  to a deployment whose cooldown just ended (one probe per replica at most).
- **not shared**: time-to-first-token measurements and active health checks, which each
  replica makes for itself.

Synchronous reads (the router asks on every request) come from this replica's cache;
writes change the cache at once and are queued for Redis. Times are wall-clock (the
router runs on `time.time` with this store) so that replicas agree on when a cooldown ends.
"""

from __future__ import annotations

import time
from typing import Any

from inferbridge.quotas import REPLICA, StoreError, new_lease, refused_by_store
from inferbridge.routing.state import MemoryStateStore
from inferbridge.shared.client import RedisClient

PROBE_TTL_MS = 60_000
"""A claimed half-open probe is forgotten after this long if its replica died holding it."""


class RedisStateStore:
    shared = True

    def __init__(
        self,
        client: RedisClient,
        deployments: list[str],
        *,
        fail_window: float = 60.0,
        latency_window: float = 120.0,
    ) -> None:
        self.client = client
        self.deployments = list(deployments)
        self.fail_window = fail_window
        self.local = MemoryStateStore(fail_window=fail_window, latency_window=latency_window)
        """This replica's own failures, latency and health marks."""
        self.interval = client.config.sync_interval
        self._mine: dict[str, list[str]] = {}
        self._others: dict[str, int] = {}
        self._others_failed: dict[str, int] = {}
        self._cool: dict[str, float] = {}
        self._probe_elsewhere: dict[str, bool] = {}
        self._probing: set[str] = set()
        self._written: dict[str, int] = {}
        self._writes = 0
        self._asked_at = 0
        self._next = 0.0
        self._fail_ids = 0
        self._snapshot_keys = [client.key("cooldown")]
        for d in self.deployments:
            self._snapshot_keys += [self._failures_key(d), self._leases_key(d), self._probe_key(d)]
        client.add_syncer(self)

    def _leases_key(self, key: str) -> str:
        return self.client.key("inflight", key)

    def _failures_key(self, key: str) -> str:
        return self.client.key("failures", key)

    def _probe_key(self, key: str) -> str:
        return self.client.key("probe", key)

    def _wrote(self, key: str) -> None:
        self._writes += 1
        self._written[key] = self._writes

    # -- load -----------------------------------------------------------------------------
    async def try_begin(self, key: str, limit: int | None) -> bool:
        """Take a slot on `key` unless `limit` requests are in flight on it across every
        replica (None: no limit, only counted). When the store fails: `allow` falls back
        to this replica's own count, `deny` raises StoreUnavailable."""
        lease = new_lease()
        zkey = self._leases_key(key)
        if limit is None:
            self.client.hold(zkey, lease, add=True)
            self._mine.setdefault(key, []).append(lease)
            return True
        try:
            taken = await self.client.call(
                "slot", "slot", [zkey], ["", limit, lease, self.client.lease_ttl]
            )
        except StoreError:
            if self.client.deny:
                raise refused_by_store() from None
            taken = len(self._mine.get(key, ())) < limit
            if taken:  # counted in Redis by the next lease refresh once it answers
                self.client.hold(zkey, lease)
                self._mine.setdefault(key, []).append(lease)
            return bool(taken)
        if taken:
            self.client.hold(zkey, lease)
            self._mine.setdefault(key, []).append(lease)
        return bool(taken)

    def begin(self, key: str) -> None:
        lease = new_lease()
        self.client.hold(self._leases_key(key), lease, add=True)
        self._mine.setdefault(key, []).append(lease)

    def end(self, key: str) -> None:
        leases = self._mine.get(key)
        if leases:
            self.client.drop(self._leases_key(key), leases.pop())

    def in_flight(self, key: str) -> int:
        return len(self._mine.get(key, ())) + self._others.get(key, 0)

    # -- latency (this replica's own measurements) ---------------------------------------------
    def add_latency(self, key: str, seconds: float, now: float) -> None:
        self.local.add_latency(key, seconds, now)

    def latency(self, key: str, now: float) -> float | None:
        return self.local.latency(key, now)

    # -- failures, cooldowns, probes -------------------------------------------------------------
    def add_failure(self, key: str, now: float) -> int:
        own = self.local.add_failure(key, now)
        self._fail_ids += 1
        member = f"{REPLICA}:f{self._fail_ids}"
        fkey = self._failures_key(key)
        horizon = now - self.fail_window
        ms = int(self.fail_window * 2000)

        def write(pipe: Any) -> Any:
            return pipe.zadd(fkey, {member: now})

        self.client.enqueue(write)
        self.client.enqueue(lambda pipe: pipe.zremrangebyscore(fkey, "-inf", horizon))
        self.client.enqueue(lambda pipe: pipe.pexpire(fkey, ms))
        return own + self._others_failed.get(key, 0)

    def failures(self, key: str, now: float) -> int:
        return self.local.failures(key, now) + self._others_failed.get(key, 0)

    def clear_failures(self, key: str) -> None:
        self.local.clear_failures(key)
        self._others_failed[key] = 0
        fkey = self._failures_key(key)
        self.client.enqueue(lambda pipe: pipe.delete(fkey))

    def cool_down(self, key: str, until: float) -> None:
        self._cool[key] = until
        self._wrote(key)
        ckey = self.client.key("cooldown")
        if until:
            self.client.enqueue(lambda pipe: pipe.hset(ckey, key, repr(until)))
        else:
            self.client.enqueue(lambda pipe: pipe.hdel(ckey, key))

    def cooldown_until(self, key: str) -> float:
        return self._cool.get(key, 0.0)

    def claim_probe(self, key: str) -> bool:
        if key in self._probing or self._probe_elsewhere.get(key):
            return False
        self._probing.add(key)
        self._wrote(key)
        pkey = self._probe_key(key)
        self.client.enqueue(lambda pipe: pipe.set(pkey, REPLICA, nx=True, px=PROBE_TTL_MS))
        return True

    def release_probe(self, key: str) -> None:
        self._probing.discard(key)
        self._probe_elsewhere[key] = False
        self._wrote(key)
        pkey = self._probe_key(key)
        self.client.enqueue(lambda pipe: self.client.evalsha(pipe, "unlock", [pkey], [REPLICA]))

    def probing(self, key: str) -> bool:
        return key in self._probing or self._probe_elsewhere.get(key, False)

    # -- active health checks (each replica checks for itself) -----------------------------
    def set_unhealthy(self, key: str, unhealthy: bool) -> None:
        self.local.set_unhealthy(key, unhealthy)

    def unhealthy(self, key: str) -> bool:
        return self.local.unhealthy(key)

    # -- the background read (RedisClient's task) ----------------------------------------
    def due(self, now: float) -> bool:
        if now < self._next:
            return False
        self._next = now + self.interval
        return True

    def request(self, pipe: Any, client: RedisClient) -> None:
        self._asked_at = self._writes
        args = [repr(time.time()), self.fail_window, f"{REPLICA}:"]
        client.evalsha(pipe, "snapshot", self._snapshot_keys, args)

    def apply(self, result: Any) -> None:
        """Take in the other replicas' state, except for deployments this replica changed
        after the read was sent (its own newer value stands)."""
        flat, rest = result[0], result[1:]
        cool = {flat[i]: float(flat[i + 1]) for i in range(0, len(flat), 2)}
        asked = self._asked_at
        written = self._written
        for i, key in enumerate(self.deployments):
            failed, others, holder = rest[3 * i : 3 * i + 3]
            self._others[key] = int(others)
            self._others_failed[key] = int(failed)
            if written.get(key, 0) > asked:
                continue
            until = cool.get(key, 0.0)
            if until:
                self._cool[key] = until
            else:
                self._cool.pop(key, None)
            self._probe_elsewhere[key] = bool(holder) and holder != REPLICA
