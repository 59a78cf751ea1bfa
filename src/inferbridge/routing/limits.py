"""Concurrency limits: at most `max_concurrent` requests on a deployment, a bounded queue.

A request that finds every deployment of its model full waits in one deployment's queue
(first come, first served: a freed slot is handed to the oldest waiter, not to whoever
arrives next) for at most `queue_timeout` seconds. When the queues are full too, or the wait
times out, the client gets a 429 with `Retry-After` instead of piling more work onto a
saturated GPU server.

In-flight counts live in the `StateStore` (shared by every limit, and by the least-busy
strategy); the waiting queue is local to this process. With a shared store (several
replicas, `state: {store: redis}`) a slot is taken on the server (`try_take`) and a slot
freed by another replica is not announced: a waiter tries again every `SHARED_POLL`
seconds, and at once when a request of this replica ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from inferbridge.errors import RateLimited
from inferbridge.routing.state import StateStore

SHARED_POLL = 0.05
"""Seconds between two tries of a waiter for a slot of a shared store."""

RETRY_AFTER = "1"
"""The `Retry-After` (seconds) sent with a 429 for a saturated model."""


def saturated(model: str, detail: str) -> RateLimited:
    return RateLimited(
        f"Model '{model}' is at capacity: {detail}. Retry after {RETRY_AFTER} s.",
        headers={"Retry-After": RETRY_AFTER},
    )


class Limiter:
    """The slots of one deployment. Without `max_concurrent` it only counts."""

    __slots__ = (
        "key",
        "max_concurrent",
        "max_queue",
        "queue_timeout",
        "shared",
        "store",
        "waiters",
    )

    def __init__(
        self,
        store: StateStore,
        key: str,
        *,
        max_concurrent: int | None,
        max_queue: int = 0,
        queue_timeout: float = 30.0,
    ) -> None:
        self.store = store
        self.key = key
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.shared: bool = getattr(store, "shared", False)

    @property
    def queued(self) -> int:
        return len(self.waiters)

    def has_room(self) -> bool:
        limit = self.max_concurrent
        return limit is None or (not self.waiters and self.store.in_flight(self.key) < limit)

    def take(self) -> None:
        """Occupy a slot (after `has_room()` said there is one)."""
        self.store.begin(self.key)

    async def try_take(self) -> bool:
        """Occupy a slot if there is one, checked by the store itself (shared stores)."""
        return await self.store.try_begin(self.key, self.max_concurrent)

    def can_queue(self) -> bool:
        return self.max_concurrent is not None and len(self.waiters) < self.max_queue

    async def wait(self, model: str) -> None:
        """Wait in the queue until a slot is handed over; RateLimited after queue_timeout."""
        if self.shared:
            await self._wait_shared(model)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            async with asyncio.timeout(self.queue_timeout):
                await fut
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                return  # the slot arrived as the timer fired: keep it
            raise saturated(
                model, f"no slot was free within queue_timeout ({self.queue_timeout:g} s)"
            ) from None
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # handed a slot, but leaving (client gone): pass it on
            raise
        finally:
            if not fut.done():
                fut.cancel()
            with contextlib.suppress(ValueError):
                self.waiters.remove(fut)

    async def _wait_shared(self, model: str) -> None:
        """A shared store's queue: wake up when a request of this replica ends or every
        `SHARED_POLL` seconds, and try to take a slot on the server; the head of the queue
        keeps its place when another replica was faster."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.queue_timeout
        first = False
        while True:
            fut: asyncio.Future[None] = loop.create_future()
            if first:
                self.waiters.appendleft(fut)
            else:
                self.waiters.append(fut)
            try:
                wait = min(SHARED_POLL, deadline - loop.time())
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await fut
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._wake()  # woken, but leaving: wake the next one
                raise
            finally:
                if not fut.done():
                    fut.cancel()
                with contextlib.suppress(ValueError):
                    self.waiters.remove(fut)
            if await self.try_take():
                return
            if loop.time() >= deadline:
                raise saturated(
                    model, f"no slot was free within queue_timeout ({self.queue_timeout:g} s)"
                )
            first = True

    def _wake(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def release(self) -> None:
        self.store.end(self.key)
        if self.waiters:
            if self.shared:
                self._wake()
            else:
                self._hand_over()

    def _hand_over(self) -> None:
        limit = self.max_concurrent
        store = self.store
        while self.waiters and (limit is None or store.in_flight(self.key) < limit):
            fut = self.waiters.popleft()
            if not fut.done():
                store.begin(self.key)
                fut.set_result(None)
