"""The ASGI application: a thin front door for the hot routes, FastAPI for everything else.

`create_app(config)` returns an ASGI callable. `POST /v1/chat/completions` and
`POST /v1/completions` (also without the `/v1` prefix) go straight to the raw handlers in
`inferbridge.api.handlers`; every other path (models, health, `/docs`, lifespan) is served by
a FastAPI app, whose OpenAPI document also describes the two hot routes. Errors everywhere
use the OpenAI envelope; FastAPI's 422 becomes a 400.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from inferbridge import __version__
from inferbridge.api.handlers import CompletionsEndpoint
from inferbridge.api.protocol import ChatCompletionRequest, CompletionRequest
from inferbridge.config import Config, load_config
from inferbridge.errors import InferbridgeError, InvalidRequest, ModelNotFound
from inferbridge.gateway import Gateway

log = logging.getLogger("inferbridge")


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers, media_type="application/json")


def _error(exc: InferbridgeError) -> Response:
    return _json(exc.envelope(), exc.status, exc.headers)


def build_api(gateway: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        gateway.observability.start()
        await gateway.start()
        log.info("inferbridge %s serving models: %s", __version__,
                 ", ".join(gateway.router.models) or "(none)")
        try:
            yield
        finally:
            await gateway.close()
            gateway.observability.stop()

    api = FastAPI(
        title="inferbridge",
        version=__version__,
        description="OpenAI-compatible API in front of self-hosted and hosted LLM backends.",
        lifespan=lifespan,
    )
    started = int(time.time())

    def model_card(name: str) -> dict[str, Any]:
        owner = gateway.router.deployments(name)[0].config.owned_by
        return {"id": name, "object": "model", "created": started, "owned_by": owner}

    def check_auth(request: Request) -> None:
        h = request.headers
        auth = h.get("authorization")
        key = h.get("api-key")
        gateway.authenticate(auth.encode() if auth else None, key.encode() if key else None)

    @api.exception_handler(InferbridgeError)
    async def _on_error(_: Request, exc: InferbridgeError) -> Response:
        return _error(exc)

    @api.exception_handler(RequestValidationError)
    async def _on_invalid(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(InvalidRequest(f"Invalid request: {first.get('msg', exc)}", param=param))

    @api.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> Response:
        detail = str(exc.detail)
        if exc.status_code in (404, 405):
            detail = f"{detail}: {request.method} {request.url.path}"
        err = InferbridgeError(detail, status=exc.status_code)
        err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error(err)

    @api.exception_handler(Exception)
    async def _on_unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unexpected error")
        return _error(InferbridgeError("Internal error in inferbridge."))

    @api.get("/health", tags=["health"], summary="Liveness check")
    async def health() -> Response:
        return _json({"status": "ok"})

    @api.get("/health/readiness", tags=["health"], summary="Readiness: deployment states")
    async def readiness() -> Response:
        ready, report = gateway.readiness()
        return _json(report, 200 if ready else 503)

    @api.get("/metrics", tags=["health"], summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(gateway.observability.exposition(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/v1/models", tags=["openai"], summary="List models")
    async def list_models(request: Request) -> Response:
        check_auth(request)
        return _json({"object": "list",
                      "data": [model_card(name) for name in gateway.router.public_names()]})

    @api.get("/v1/models/{model:path}", tags=["openai"], summary="Retrieve a model")
    async def get_model(model: str, request: Request) -> Response:
        check_auth(request)
        if model not in gateway.router.models and model not in gateway.router.aliases:
            raise ModelNotFound(model)
        return _json(model_card(model))

    api.add_api_route("/models", list_models, methods=["GET"], include_in_schema=False)
    api.add_api_route("/models/{model:path}", get_model, methods=["GET"],
                      include_in_schema=False)

    _document_hot_routes(api)
    return api


def _document_hot_routes(api: FastAPI) -> None:
    """Describe the two raw-ASGI routes in FastAPI's OpenAPI document (for /docs)."""
    base_openapi = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema:
            return api.openapi_schema
        schema = base_openapi()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, model, summary in (
            ("/v1/chat/completions", ChatCompletionRequest, "Create a chat completion"),
            ("/v1/completions", CompletionRequest, "Create a completion (legacy)"),
        ):
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(js.pop("$defs", {}))
            components[model.__name__] = js
            schema["paths"][path] = {"post": {
                "tags": ["openai"],
                "summary": summary,
                "description": "OpenAI-compatible. With `stream: true` the answer is a "
                "text/event-stream of chunks ending with `data: [DONE]`.",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}},
                "responses": {"200": {"description": "The completion (JSON or SSE)"},
                              "400": {"description": "Invalid request (OpenAI error)"},
                              "404": {"description": "Unknown model"}},
            }}
        api.openapi_schema = schema
        return schema

    api.openapi = openapi  # type: ignore[method-assign]


class FrontDoor:
    """ASGI entry point: hot POST routes by exact path, everything else to FastAPI."""

    def __init__(self, gateway: Gateway, api: FastAPI) -> None:
        self.gateway = gateway
        self.api = api
        chat = CompletionsEndpoint(gateway, "chat")
        completion = CompletionsEndpoint(gateway, "completion")
        self.hot = {
            "/v1/chat/completions": chat,
            "/chat/completions": chat,
            "/v1/completions": completion,
            "/completions": completion,
        }

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self.hot.get(scope["path"])
            if handler is not None:
                await handler(scope, receive, send)
                return
        await self.api(scope, receive, send)


def create_app(config: Config | None = None) -> FrontDoor:
    gateway = Gateway(config or load_config())
    return FrontDoor(gateway, build_api(gateway))


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
