"""Requests in progress, counted so that shutdown can wait for them to end.

uvicorn stops accepting connections on SIGTERM and waits up to its graceful-shutdown
timeout (`server.drain_timeout`) for open connections; only then does the app's lifespan
close the gateway. `Gateway.close()` still waits on this counter (bounded) before closing
upstream clients, so a stream that uvicorn cancelled at the deadline can finish its cleanup
(closing its upstream request) before the connection pools go away.
"""

from __future__ import annotations

import asyncio


class Drain:
    __slots__ = ("_idle", "active")

    def __init__(self) -> None:
        self.active = 0
        self._idle: asyncio.Event | None = None

    def enter(self) -> None:
        self.active += 1

    def leave(self) -> None:
        self.active -= 1
        if not self.active and self._idle is not None:
            self._idle.set()

    async def wait(self, timeout: float) -> bool:
        """Wait until no request is in progress; False if some still are after `timeout`."""
        if not self.active:
            return True
        self._idle = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        finally:
            self._idle = None
        return True
