"""Socket writes made while other requests are in flight go out together, at the end of
the event loop's current turn.

uvloop sends a `transport.write` at once, with a system call. On a loaded proxy the
responses of one loop turn then leave one by one, each after the Python work of the one
before, and each send may have to wake the process reading the other end (the client, the
upstream) on another core. On a VM that wake-up is dear: under the benchmark's (b) load,
`perf` put 12.7% of the proxy's CPU in waking the load core from inside its own writes.
Sent back to back at the end of the turn, the writes wake that core once per batch:
in an A/B under (b), CPU per request ~255 -> ~180 µs (bench/RESULTS.md).

With one request in flight (`WriteBatch.busy` <= 1) there is nothing to batch with, and a
write is sent at once: deferring it would only put the request's own bookkeeping (metrics,
the access log line) ahead of its response (measured: +130 µs at concurrency 1).

Nothing waits for more data: a deferred write leaves in the same loop turn, after the
callbacks already queued. Order on each connection is kept: every write and close of a
connection goes through the batch (`BatchedTransport` wraps a client connection's
transport, the upstream client writes through `WriteBatch.write`). A close queues behind
the pending writes instead of sending them early: a client that closes its connection after
each answer (`Connection: close`) would otherwise split every batch, and under such load
`WriteBatch.flush` then cost ~60 µs more per request (py-spy, bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

log = logging.getLogger("inferbridge")


class WriteBatch:
    """The pending writes of one event loop (`batch_for`)."""

    __slots__ = ("_loop", "busy", "pending")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # the loop's entry in `_BATCHES` must not keep it alive
        self.pending: list[tuple[asyncio.WriteTransport, bytes | None]] = []
        """Writes in order; None for data is a close."""
        self.busy = 0
        """Requests in flight (counted by the hot routes): above one, writes are batched."""

    def write(self, transport: asyncio.WriteTransport, data: bytes) -> None:
        pending = self.pending
        if not pending:
            if self.busy <= 1:
                transport.write(data)
                return
            loop = self._loop()
            if loop is None or loop.is_closed():  # no turn will come: send at once
                transport.write(data)
                return
            loop.call_soon(self.flush)
        pending.append((transport, data))

    def close(self, transport: asyncio.WriteTransport) -> None:
        """Close `transport` after the writes pending now (at once if there are none)."""
        if self.pending:
            loop = self._loop()
            if loop is not None and not loop.is_closed():  # a flush is due this turn
                self.pending.append((transport, None))
                return
            self.flush()
        transport.close()

    def flush(self) -> None:
        """Send every pending write and close now, in order (skipping connections closed
        since)."""
        pending, self.pending = self.pending, []
        for transport, data in pending:
            if transport.is_closing():
                continue
            try:
                if data is None:
                    transport.close()
                else:
                    transport.write(data)
            except (OSError, RuntimeError) as exc:  # its protocol hears of it by itself
                log.debug("a batched write failed: %s", exc)


_BATCHES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WriteBatch] = (
    weakref.WeakKeyDictionary()
)


def batch_for(loop: asyncio.AbstractEventLoop) -> WriteBatch:
    """The write batch of `loop` (one per loop: test servers run several, in threads)."""
    batch = _BATCHES.get(loop)
    if batch is None:
        batch = _BATCHES[loop] = WriteBatch(loop)
    return batch


class BatchedTransport:
    """A client connection's transport whose writes and close go through the `WriteBatch`,
    for the HTTP protocol (ours and uvicorn's code alike); everything else is the
    transport's. Once closed it is closing at once, even while its close waits in the
    batch, and it takes no more writes."""

    __slots__ = ("_batch", "_closed", "transport")

    def __init__(self, transport: asyncio.Transport, batch: WriteBatch) -> None:
        self.transport = transport
        self._batch = batch
        self._closed = False

    def write(self, data: bytes) -> None:
        if not self._closed:
            self._batch.write(self.transport, data)

    def writelines(self, lines: Any) -> None:
        self.write(b"".join(lines))

    def _send_pending(self) -> None:
        """Before an abort or an end of writing: what is queued leaves first, in order."""
        if self._batch.pending:
            self._batch.flush()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._batch.close(self.transport)

    def abort(self) -> None:
        self._send_pending()
        self.transport.abort()

    def write_eof(self) -> None:
        self._send_pending()
        self.transport.write_eof()

    def is_closing(self) -> bool:
        return self._closed or self.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)
