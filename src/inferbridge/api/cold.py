"""The cheap GET routes, as raw ASGI: health, readiness, metrics, and the model list.

Served by the front door without FastAPI (which is only loaded for `/docs` and unknown
paths), so they cost little and the idle process stays small. Each route is one function
returning `(status, body, content type)`; the FastAPI documentation app calls the same
functions, so there is one implementation.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from inferbridge.errors import InferbridgeError, ModelNotFound
from inferbridge.gateway import Gateway

JSON = b"application/json"
PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"
Answer = tuple[int, bytes, bytes]


class ColdRoutes:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.started = int(time.time())

    # -- the routes ---------------------------------------------------------------------------
    def health(self) -> Answer:
        return 200, b'{"status":"ok"}', JSON

    def readiness(self) -> Answer:
        ready, report = self.gateway.readiness()
        return (200 if ready else 503), orjson.dumps(report), JSON

    def metrics(self) -> Answer:
        return 200, self.gateway.observability.exposition(), PROMETHEUS

    def list_models(self, authorization: bytes | None, api_key: bytes | None) -> Answer:
        self.gateway.authenticate(authorization, api_key)
        router = self.gateway.router
        data = [self._card(name) for name in router.public_names()]
        return 200, orjson.dumps({"object": "list", "data": data}), JSON

    def get_model(self, model: str, authorization: bytes | None, api_key: bytes | None) -> Answer:
        self.gateway.authenticate(authorization, api_key)
        router = self.gateway.router
        if model not in router.models and model not in router.aliases:
            raise ModelNotFound(model)
        return 200, orjson.dumps(self._card(model)), JSON

    def _card(self, name: str) -> dict[str, Any]:
        owner = self.gateway.router.deployments(name)[0].config.owned_by
        return {"id": name, "object": "model", "created": self.started, "owned_by": owner}

    # -- dispatch -----------------------------------------------------------------------------
    def answer(self, path: str, headers: dict[bytes, bytes]) -> Answer | None:
        """The answer for a GET of `path`, or None when it is not one of these routes."""
        if path == "/health":
            return self.health()
        if path == "/metrics":
            return self.metrics()
        if path == "/health/readiness":
            return self.readiness()
        auth, key = headers.get(b"authorization"), headers.get(b"api-key")
        if path in ("/v1/models", "/models"):
            return self.list_models(auth, key)
        for prefix in ("/v1/models/", "/models/"):
            if path.startswith(prefix) and len(path) > len(prefix):
                return self.get_model(path[len(prefix) :], auth, key)
        return None

    async def __call__(self, scope: dict[str, Any], send: Any) -> bool:
        """Serve the request if it is one of these routes; False otherwise."""
        try:
            found = self.answer(scope["path"], dict(scope["headers"]))
        except InferbridgeError as exc:
            found = exc.status, exc.body(), JSON
            extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
        else:
            extra = []
        if found is None:
            return False
        status, body, content_type = found
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type), *extra],
            }
        )
        await send({"type": "http.response.body", "body": body})
        return True
