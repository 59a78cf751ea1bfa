"""The ASGI application: a raw front door, with FastAPI only for the documentation.

`create_app(config)` returns an ASGI callable (`FrontDoor`) that serves, without FastAPI:
- `POST /v1/chat/completions` and `POST /v1/completions` (also without `/v1`): the hot
  routes in `inferbridge.api.handlers`;
- `GET /health`, `/health/readiness`, `/metrics`, `/v1/models`, `/v1/models/{id}`:
  `inferbridge.api.cold`;
- the lifespan (backends' clients opened at start-up and closed at shutdown; the heap
  settled for the garbage collector once started, `settle_heap`).

Every other path goes to a FastAPI app built on first use: `/docs` and `/openapi.json`
(which describe every route above) and OpenAI-envelope 404/405 answers. FastAPI's import
alone is ~12 MB of a ~60 MB process, so an instance nobody browses never loads it.
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Any

import orjson

from inferbridge import __version__
from inferbridge.api.cold import ColdRoutes
from inferbridge.api.handlers import CompletionsEndpoint
from inferbridge.config import Config, load_config
from inferbridge.gateway import Gateway

log = logging.getLogger("inferbridge")

# Allocations between two young-generation collections (CPython's default is 700). A
# request allocates a few hundred containers that mostly die by reference counting; at 700
# the collector ran every few requests and promoted the live ones of requests in flight,
# whose later deaths then triggered full collections. Measured under load: 3-5% of the CPU
# and ~20 ms pauses (a full pass over the ~40,000 objects of the loaded modules); at 2,000,
# 0.4%. 10,000 saved that 0.4% too but let RSS creep 6% over a 10-minute soak.
GC_YOUNG_THRESHOLD = 2_000


def settle_heap() -> None:
    """After start-up: move what is loaded by now out of the collector's sight (modules,
    config, clients live for the whole process) and collect the young generation less
    often. Reference cycles are still collected."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


class FrontDoor:
    """ASGI entry point: hot POST routes and cold GET routes by exact path, the lifespan,
    and everything else to the documentation app."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.cold = ColdRoutes(gateway)
        self._docs: Any = None
        chat = CompletionsEndpoint(gateway, "chat")
        completion = CompletionsEndpoint(gateway, "completion")
        self.hot = {
            "/v1/chat/completions": chat,
            "/chat/completions": chat,
            "/v1/completions": completion,
            "/completions": completion,
        }

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            method = scope["method"]
            if method == "POST":
                handler = self.hot.get(scope["path"])
                if handler is not None:
                    await handler(scope, receive, send)
                    return
            elif method == "GET" and await self.cold(scope, send):
                return
        elif kind == "lifespan":
            await self.lifespan(receive, send)
            return
        if self._docs is None:
            from inferbridge.api.docs import build_docs_app  # imports FastAPI: on first use

            self._docs = build_docs_app(self.cold)
        await self._docs(scope, receive, send)

    async def lifespan(self, receive: Any, send: Any) -> None:
        gateway = self.gateway
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    gateway.observability.start()
                    await gateway.start()
                except Exception as exc:
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                settle_heap()
                log.info(
                    "inferbridge %s serving models: %s",
                    __version__,
                    ", ".join(gateway.router.models) or "(none)",
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await gateway.close()
                finally:
                    gateway.observability.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app(config: Config | None = None) -> FrontDoor:
    return FrontDoor(Gateway(config or load_config()))


def app_from_env() -> FrontDoor:
    """Factory used by `inferbridge serve` (one per worker process): reads the config file
    named by INFERBRIDGE_CONFIG and the INFERBRIDGE_* overrides."""
    overrides = os.environ.get("INFERBRIDGE_CLI_OVERRIDES")
    return create_app(
        load_config(
            os.environ.get("INFERBRIDGE_CONFIG") or None,
            overrides=orjson.loads(overrides) if overrides else None,
        )
    )
