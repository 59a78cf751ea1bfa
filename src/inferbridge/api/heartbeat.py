"""Keep-alive pings for a stream that goes quiet: `Heartbeats(stream, interval)`.

It yields the stream's batches, and `None` whenever `interval` seconds went by without one
(the renderer writes a ping then: Anthropic's `event: ping`). Waiting for the next batch
cannot be interrupted without cancelling it (which would cancel the upstream request), so
the stream is read by one task of its own for the whole stream, which hands each batch over
through a one-slot queue (it reads at most one batch ahead). There is one timer per stream,
not one per batch: it wakes every `interval` seconds, and puts a ping in the empty queue if
no batch arrived since the last time it looked.

Errors of the stream are raised to the reader as they happened. `aclose` stops the reading
task and closes the stream (which closes the upstream request).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from inferbridge.events import Event, aclose

_END = object()


class _Failed:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Heartbeats:
    __slots__ = ("_handle", "_last", "_loop", "_queue", "_task", "interval", "stream")

    def __init__(self, stream: AsyncIterator[Sequence[Event]], interval: float) -> None:
        self.stream = stream
        self.interval = interval
        self._queue: asyncio.Queue[Any] = asyncio.Queue(1)
        self._task: asyncio.Task[None] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last = 0.0

    def __aiter__(self) -> Heartbeats:
        return self

    async def __anext__(self) -> Sequence[Event] | None:
        if self._task is None:
            self._start()
        item = await self._queue.get()
        if item is _END or type(item) is _Failed:
            self._stop_timer()
            self._queue.put_nowait(_END)  # every later call ends
            if item is _END:
                raise StopAsyncIteration
            raise item.exc
        return item

    def _start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._last = loop.time()
        self._task = loop.create_task(self._pump())
        self._handle = loop.call_at(self._last + self.interval, self._tick)

    async def _pump(self) -> None:
        queue = self._queue
        loop = self._loop
        assert loop is not None
        try:
            async for batch in self.stream:
                self._last = loop.time()
                await queue.put(batch)
        except Exception as exc:
            await queue.put(_Failed(exc))
        else:
            await queue.put(_END)

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        if now - self._last >= self.interval:
            self._last = now
            if self._queue.empty():
                self._queue.put_nowait(None)
        self._handle = loop.call_at(self._last + self.interval, self._tick)

    def _stop_timer(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    async def aclose(self) -> None:
        self._stop_timer()
        task = self._task
        try:
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        finally:
            # A stream the task was inside of is closed by the task's cancellation; one
            # suspended between batches is closed here.
            await aclose(self.stream)
