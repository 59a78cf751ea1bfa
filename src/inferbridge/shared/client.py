"""The connection to the shared store, its failure policy, and its background task.

`RedisClient.call` runs one script for a request (a rate-limit check, an in-flight slot),
bounded by `state.timeout`; the calls of all the requests that ask in one turn of the event
loop share one pipeline, one round trip. Past the timeout, or when Redis refuses, it raises
`StoreError` and the caller applies `state.on_store_error`. After a failure the store is
left alone for `RETRY_DOWN` seconds (calls fail at once, so a dead Redis costs requests
nothing), then the next call tries again; redis-py reconnects by itself, and a call cut by
the timeout closes its connection rather than leaving an unread answer on it. redis-py's
own retries are off: one attempt, within the timeout.

Everything a request does not need to wait for goes through `enqueue` and is sent by one
background task in pipelines, within `LINGER` (2 ms) of being queued: releases of in-flight
slots, token charges, usage counters, failures and cooldowns (a slot taken and freed within
that time is never sent at all). The same task refreshes the leases this
replica holds (every `lease_ttl / 3`) and reads the other replicas' routing state (every
`sync_interval`, `RedisStateStore.snapshot`).

A lease is an id in a sorted set scored by its expiry: in-flight slots of deployments and
`max_parallel` slots of keys. A replica that dies stops refreshing its leases, and the
scripts drop them once expired: its counts are released within `lease_ttl`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from inferbridge.quotas import StoreError
from inferbridge.shared import scripts

if TYPE_CHECKING:
    from inferbridge.config import StateConfig
    from inferbridge.observability import Observability

log = logging.getLogger("inferbridge.state")

RETRY_DOWN = 0.5
"""Seconds the store is left alone after a failed call."""
LINGER = 0.002
"""Seconds the background task waits, once woken, for more writes to send along (a short
request's slot taken and freed then cancel out)."""
BACKGROUND_TIMEOUT = 2.0
"""Seconds one background pipeline may take at least (more with a larger `state.timeout`)."""

Op = Callable[[Any], Any]
"""Adds one command to a pipeline (`lambda pipe: pipe.zrem(key, lease)`)."""


@dataclass(slots=True)
class _Call:
    """A request's script call, waiting for the next pipeline."""

    op: str
    script: str
    keys: list[str]
    args: list[Any]
    answer: asyncio.Future[Any]


class Syncer(Protocol):
    """A reader of shared state the background task feeds (`RedisStateStore`)."""

    def due(self, now: float) -> bool: ...

    def request(self, pipe: Any, client: RedisClient) -> None:
        """Add exactly one command to `pipe`."""

    def apply(self, result: Any) -> None: ...


class RedisClient:
    def __init__(self, config: StateConfig, observability: Observability | None = None) -> None:
        assert config.url
        self.config = config
        self.timeout = config.timeout
        self.deny = config.on_store_error == "deny"
        self.prefix = config.prefix
        self.lease_ttl = config.lease_ttl
        self.observability = observability
        background = max(BACKGROUND_TIMEOUT, 4 * config.timeout)
        self.background_timeout = background
        pool = BlockingConnectionPool.from_url(
            config.url,
            max_connections=config.max_connections,
            timeout=None,  # a wait for a free connection is bounded by the call's timeout
            decode_responses=True,
            socket_timeout=background,
            socket_connect_timeout=background,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            client_name="inferbridge",
        )
        self.redis = Redis(connection_pool=pool)
        self.scripts = {
            name: self.redis.register_script(text) for name, text in scripts.ALL.items()
        }
        self.held: dict[str, dict[str, None]] = {}
        """Sorted-set key -> the lease ids this replica holds there (refreshed)."""
        self._pending: list[Op] = []
        self._calls: list[_Call] = []
        self._adding: dict[tuple[str, str], Op] = {}
        """Lease additions queued and not sent yet, by (sorted-set key, lease)."""
        self._call_tasks: set[asyncio.Task[None]] = set()
        self._syncers: list[Syncer] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._down_until = 0.0
        self._down = False
        self._next_refresh = 0.0
        self._closing = False

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        try:
            async with asyncio.timeout(self.background_timeout):
                # every connection opened now, not by the first burst of requests (whose
                # checks would spend their short timeout connecting)
                await asyncio.gather(
                    *(self.redis.ping() for _ in range(self.config.max_connections))
                )
                await self._load_scripts()
        except Exception as exc:
            self._failed("connect", exc)
        self._next_refresh = loop.time() + self.lease_ttl / 3
        self._task = loop.create_task(self._run(), name="inferbridge-state-sync")

    async def close(self) -> None:
        """Send what is queued (releases included), stop the task, close the pool."""
        self._closing = True
        self._wake.set()
        for task in list(self._call_tasks):
            task.cancel()
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._task, self.background_timeout + 1)
            self._task = None
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    async def flush(self) -> None:
        """Send what is queued now, without waiting for the background task (tests)."""
        await self._sync(asyncio.get_running_loop().time(), True)

    # -- calls on the request path ------------------------------------------------------
    async def call(self, op: str, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run script `script` for a request, within `state.timeout`; StoreError else.

        The calls of every request that asks in the same turn of the event loop go out
        together, in one pipeline (`_send_calls`): one round trip for all of them."""
        loop = asyncio.get_running_loop()
        if self._down and loop.time() < self._down_until:
            self._count(op)
            raise StoreError("the state store is unreachable")
        answer: asyncio.Future[Any] = loop.create_future()
        self._calls.append(_Call(op, script, list(keys), list(args), answer))
        if len(self._calls) == 1:
            loop.call_soon(self._send_calls)
        try:
            async with asyncio.timeout(self.timeout):
                return await answer
        except TimeoutError as exc:
            self._failed(op, exc)
            raise StoreError("the state store did not answer in time") from None

    def _send_calls(self) -> None:
        calls, self._calls = self._calls, []
        calls = [c for c in calls if not c.answer.done()]  # not given up on already
        if calls:
            task = asyncio.get_running_loop().create_task(self._run_calls(calls))
            self._call_tasks.add(task)
            task.add_done_callback(self._call_tasks.discard)

    async def _run_calls(self, calls: list[_Call]) -> None:
        """One pipeline for `calls`, after the writes queued so far (a slot freed before a
        check is free for it, and they share the round trip); each call gets its result,
        or StoreError. A script Redis forgot (a restart) is loaded again and what used it
        sent once more."""
        ops = self._take_pending()
        try:
            async with asyncio.timeout(self.timeout):
                results = await self._pipeline_calls(ops, calls)
                lost = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
                if lost:
                    await self._load_scripts()
                    lost_ops = [ops[i] for i in lost if i < len(ops)]
                    lost_calls = [calls[i - len(ops)] for i in lost if i >= len(ops)]
                    again = await self._pipeline_calls(lost_ops, lost_calls)
                    for i, result in zip(lost, again, strict=True):
                        results[i] = result
        except (OSError, TimeoutError, RedisError) as exc:
            self._failed(calls[0].op, exc)
            for call in calls[1:]:
                self._count(call.op)
            for call in calls:
                if not call.answer.done():
                    call.answer.set_exception(StoreError(str(exc) or type(exc).__name__))
            return  # the writes are lost, as when the background task cannot send them
        self._ok()
        for call, result in zip(calls, results[len(ops) :], strict=True):
            if call.answer.done():
                continue
            if isinstance(result, Exception):
                call.answer.set_exception(StoreError(str(result)))
            else:
                call.answer.set_result(result)

    async def _pipeline_calls(self, ops: list[Op], calls: list[_Call]) -> list[Any]:
        """The results of `ops`, then of `calls`, in one round trip."""
        if len(calls) == 1 and not ops:  # alone: a plain call costs less than a pipeline
            call = calls[0]
            try:
                return [
                    await self.redis.evalsha(
                        self.scripts[call.script].sha, len(call.keys), *call.keys, *call.args
                    )
                ]
            except NoScriptError as exc:
                return [exc]
        pipe = self.redis.pipeline(transaction=False)
        for op in ops:
            op(pipe)
        for call in calls:
            self.evalsha(pipe, call.script, call.keys, call.args)
        return list(await pipe.execute(raise_on_error=False))

    async def _load_scripts(self) -> None:
        """Load every script on the server (at start, and when a restarted Redis forgot
        them: NOSCRIPT)."""
        for script in self.scripts.values():
            script.sha = await self.redis.script_load(script.script)

    def _take_pending(self) -> list[Op]:
        """The writes queued so far, to be sent now (their additions can no longer be
        cancelled by a drop)."""
        ops, self._pending = self._pending, []
        self._adding.clear()
        return ops

    async def request_command(self, op: str, command: str, *args: Any, **kwargs: Any) -> Any:
        """One plain command for a request (a stored response's `GET`/`SET`/`DEL`), within
        `state.timeout`; StoreError else."""
        method = getattr(self.redis, command)
        return await self._bounded(op, lambda: method(*args, **kwargs), self.timeout)

    async def call_command(self, op: str, command: str, *args: Any) -> Any:
        """One plain command off the hot path (`GET /v1/usage`), within the background
        timeout."""
        method = getattr(self.redis, command)
        return await self._bounded(op, lambda: method(*args), self.background_timeout)

    async def _bounded(self, op: str, work: Callable[[], Any], timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        if self._down and loop.time() < self._down_until:
            self._count(op)
            raise StoreError("the state store is unreachable")
        try:
            async with asyncio.timeout(timeout):
                result = await work()
        except (OSError, TimeoutError, RedisError) as exc:
            self._failed(op, exc)
            raise StoreError(str(exc)) from None
        self._ok()
        return result

    # -- background ---------------------------------------------------------------------
    def enqueue(self, op: Op) -> None:
        self._pending.append(op)
        self._wake.set()

    def add_syncer(self, syncer: Syncer) -> None:
        self._syncers.append(syncer)

    def hold(self, zkey: str, lease: str, *, add: bool = False) -> None:
        """Keep `lease` in sorted set `zkey` alive while held (`add`: it is not there yet)."""
        self.held.setdefault(zkey, {})[lease] = None
        if add:

            def op(pipe: Any) -> Any:
                return self.evalsha(pipe, "leases", [zkey], ["", self.lease_ttl, lease])

            self._adding[(zkey, lease)] = op
            self.enqueue(op)

    def drop(self, zkey: str, lease: str) -> None:
        """Release `lease`: no more refreshes, and its removal is queued (or, when its
        addition was not sent yet, neither is: a short request costs Redis nothing)."""
        self.forget(zkey, lease)
        unsent = self._adding.pop((zkey, lease), None)
        if unsent is not None:
            self._pending.remove(unsent)
            return
        self.enqueue(lambda pipe: pipe.zrem(zkey, lease))

    def forget(self, zkey: str, lease: str) -> None:
        """Stop refreshing `lease` (its removal is the caller's, in a script of its own)."""
        members = self.held.get(zkey)
        if members is not None:
            members.pop(lease, None)
            if not members:
                del self.held[zkey]

    def evalsha(self, pipe: Any, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Queue script `name` on a pipeline by its digest (loaded at start, reloaded when
        the server lost it)."""
        return pipe.evalsha(self.scripts[name].sha, len(keys), *keys, *args)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = min(self.config.sync_interval, self.lease_ttl / 3)
        while True:
            if not self._closing:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._wake.wait()
                if self._wake.is_set() and not self._closing:
                    await asyncio.sleep(LINGER)  # what the next requests queue goes along
            self._wake.clear()
            closing = self._closing
            try:
                await self._sync(loop.time(), closing)
            except Exception:  # never let the task die
                log.exception("state store: background sync failed")
            if closing:
                return

    async def _sync(self, now: float, closing: bool) -> None:
        ops = self._take_pending()
        refresh = not closing and now >= self._next_refresh
        syncers = [] if closing else [s for s in self._syncers if s.due(now)]
        if not ops and not refresh and not syncers:
            return
        if self._down and now < self._down_until and not closing:
            if ops:
                self._count("write", len(ops))
            return  # writes while it is down are dropped: leases expire, counts are lost
        if refresh:
            self._next_refresh = now + self.lease_ttl / 3
            for zkey, members in list(self.held.items()):
                if members:
                    keys, leases = [zkey], list(members)
                    ops.append(
                        lambda pipe, k=keys, m=leases: self.evalsha(
                            pipe, "leases", k, ["", self.lease_ttl, *m]
                        )
                    )
        results = await self._execute(ops, syncers)
        if results is None:
            return
        tail = results[len(ops) :]
        for syncer, result in zip(syncers, tail, strict=True):
            if not isinstance(result, Exception):
                syncer.apply(result)

    async def _execute(self, ops: list[Op], syncers: list[Syncer]) -> list[Any] | None:
        results = await self._pipeline(ops, syncers)
        if results is None or not any(isinstance(r, NoScriptError) for r in results):
            return results
        # Redis restarted and forgot the scripts: load them, send again the writes that
        # failed (the readers read at their next turn)
        lost = [op for op, r in zip(ops, results, strict=False) if isinstance(r, NoScriptError)]
        try:
            async with asyncio.timeout(self.background_timeout):
                await self._load_scripts()
        except Exception as exc:
            self._failed("sync", exc)
            return results
        if lost:
            await self._pipeline(lost, [])
        return results

    async def _pipeline(self, ops: list[Op], syncers: list[Syncer]) -> list[Any] | None:
        pipe = self.redis.pipeline(transaction=False)
        for op in ops:
            op(pipe)
        for syncer in syncers:
            syncer.request(pipe, self)
        try:
            async with asyncio.timeout(self.background_timeout):
                results = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            self._failed("sync", exc)
            return None
        self._ok()
        return results

    # -- health -------------------------------------------------------------------------
    def _failed(self, op: str, exc: BaseException) -> None:
        loop = asyncio.get_running_loop()
        self._down_until = loop.time() + RETRY_DOWN
        self._count(op)
        if not self._down:
            self._down = True
            policy = "refused" if self.deny else "served without shared limits"
            log.warning(
                "state store unreachable (%s: %s); requests are %s until it answers "
                "(state.on_store_error: %s)",
                type(exc).__name__,
                exc,
                policy,
                self.config.on_store_error,
            )

    def _ok(self) -> None:
        if self._down:
            self._down = False
            log.warning("state store reachable again; shared limits and counts resume")

    def _count(self, op: str, n: int = 1) -> None:
        obs = self.observability
        if obs is not None:
            m = obs.metrics
            m.inc(m.store_errors, (op,), n)
