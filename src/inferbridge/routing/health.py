"""Active health checks: ask each deployment's server whether it is up, in the background.

Enabled by `router.health_check_interval`. Every interval, each deployment whose adapter
defines `async def health(self) -> None` (raising `UpstreamError` when the server is not
ready: TGI and llama.cpp `/health`, Ollama `/api/tags`...) is checked, with
`health_check_timeout`. A failing deployment is marked unhealthy and gets no traffic until a
later check passes. Adapters without `health()` are only judged by the requests they serve
(the circuit breaker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from inferbridge.router import Deployment, Router

log = logging.getLogger("inferbridge.router")


def health_probe(deployment: Deployment) -> Callable[[], Awaitable[Any]] | None:
    return getattr(deployment.backend, "health", None)


class HealthChecker:
    def __init__(self, router: Router, *, interval: float, timeout: float) -> None:
        self.router = router
        self.interval = interval
        self.timeout = timeout
        self.checked = [
            (d, probe)
            for group in router.groups.values()
            for d in group.deployments
            if (probe := health_probe(d)) is not None
        ]
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.checked and self._task is None:
            self._task = asyncio.create_task(self._run(), name="inferbridge-health-checks")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.interval)

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(d, probe) for d, probe in self.checked))

    async def _check(self, d: Deployment, probe: Callable[[], Awaitable[Any]]) -> None:
        store = self.router.store
        try:
            async with asyncio.timeout(self.timeout):
                await probe()
        except Exception as exc:  # any failure means "not ready"
            if not store.unhealthy(d.id):
                log.warning(
                    "deployment %s failed its health check: %s",
                    d.id,
                    exc if str(exc) else type(exc).__name__,
                )
            store.set_unhealthy(d.id, True)
            return
        if store.unhealthy(d.id):
            log.info("deployment %s passed its health check again", d.id)
        store.set_unhealthy(d.id, False)
