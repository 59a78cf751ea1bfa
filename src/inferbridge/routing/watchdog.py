"""`stream_idle_timeout` without a timer per chunk.

Rather than an `asyncio.timeout()` (a Timeout object and a timer handle) around every
`__anext__` of a stream, `IdleWatchdog` keeps one timer per stream: the stream marks when it
starts waiting for the upstream (`since`) and clears the mark when a batch arrives, two
attribute writes per chunk. The timer fires at most once per `idle` seconds; when the stream
has been waiting for longer than `idle` it cancels the task, and the stream turns that
cancellation into an `UpstreamTimeout` (`expired()`), the way `asyncio.timeout` does, so a
real cancellation (client gone) still propagates.

A stream suspended at its `yield` (the client is slow to read) is not waiting for the
upstream, so it is not idle.
"""

from __future__ import annotations

import asyncio


class IdleWatchdog:
    __slots__ = ("_cancelling", "_fired", "_handle", "_task", "idle", "loop", "since")

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self.loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self._fired = False
        self.since: float | None = None
        """When the stream started waiting for its next batch; None while not waiting."""
        self._handle = self.loop.call_at(self.loop.time() + idle, self._check)

    def _check(self) -> None:
        since = self.since
        now = self.loop.time()
        if since is not None and now - since >= self.idle:
            self._fired = True
            self._task.cancel()
            return
        self._handle = self.loop.call_at((now if since is None else since) + self.idle, self._check)

    def expired(self) -> bool:
        """Call on CancelledError: True when the watchdog caused it (and absorbs it)."""
        if not self._fired:
            return False
        self._fired = False
        return self._task.uncancel() <= self._cancelling

    def stop(self) -> None:
        self._handle.cancel()
