"""The FastAPI app behind `/docs` and `/openapi.json`, loaded on first use.

It documents every route (the raw-ASGI ones included: their request schemas come from
`inferbridge.api.protocol`), serves the cold routes through the same functions as the front
door, and answers unknown paths and methods with OpenAI-envelope 404/405 errors.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import TypeAdapter
from starlette.exceptions import HTTPException as StarletteHTTPException

from inferbridge import __version__
from inferbridge.api.cold import ColdRoutes
from inferbridge.api.protocol import ChatCompletionRequest, CompletionRequest
from inferbridge.errors import InferbridgeError, InvalidRequest

log = logging.getLogger("inferbridge")


def build_docs_app(cold: ColdRoutes) -> FastAPI:
    """The FastAPI app behind `/docs`: documents every route and answers unknown paths."""

    def reply(answer: tuple[int, bytes, bytes]) -> Response:
        status, body, content_type = answer
        return Response(body, status, media_type=content_type.decode())

    def error(exc: InferbridgeError) -> Response:
        return Response(exc.body(), exc.status, exc.headers, media_type="application/json")

    def credentials(request: Request) -> tuple[bytes | None, bytes | None]:
        auth, key = request.headers.get("authorization"), request.headers.get("api-key")
        return (auth.encode() if auth else None), (key.encode() if key else None)

    api = FastAPI(
        title="inferbridge",
        version=__version__,
        description="OpenAI-compatible API in front of self-hosted and hosted LLM backends.",
    )

    @api.exception_handler(InferbridgeError)
    async def _on_error(_: Request, exc: InferbridgeError) -> Response:
        return error(exc)

    @api.exception_handler(RequestValidationError)
    async def _on_invalid(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error(InvalidRequest(f"Invalid request: {first.get('msg', exc)}", param=param))

    @api.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> Response:
        detail = str(exc.detail)
        if exc.status_code in (404, 405):
            detail = f"{detail}: {request.method} {request.url.path}"
        err = InferbridgeError(detail, status=exc.status_code)
        err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error(err)

    @api.exception_handler(Exception)
    async def _on_unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unexpected error")
        return error(InferbridgeError("Internal error in inferbridge."))

    @api.get("/health", tags=["health"], summary="Liveness check")
    async def health() -> Response:
        return reply(cold.health())

    @api.get("/health/readiness", tags=["health"], summary="Readiness: deployment states")
    async def readiness() -> Response:
        return reply(cold.readiness())

    @api.get("/metrics", tags=["health"], summary="Prometheus metrics")
    async def metrics() -> Response:
        return reply(cold.metrics())

    @api.get("/v1/models", tags=["openai"], summary="List models")
    async def list_models(request: Request) -> Response:
        return reply(cold.list_models(*credentials(request)))

    @api.get("/v1/models/{model:path}", tags=["openai"], summary="Retrieve a model")
    async def get_model(model: str, request: Request) -> Response:
        return reply(cold.get_model(model, *credentials(request)))

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
        for path, request_schema, summary in (
            ("/v1/chat/completions", ChatCompletionRequest, "Create a chat completion"),
            ("/v1/completions", CompletionRequest, "Create a completion (legacy)"),
        ):
            name = request_schema.__name__
            js = TypeAdapter(request_schema).json_schema(
                ref_template="#/components/schemas/{model}"
            )
            components.update(js.pop("$defs", {}))
            components[name] = js
            schema["paths"][path] = {
                "post": {
                    "tags": ["openai"],
                    "summary": summary,
                    "description": "OpenAI-compatible. With `stream: true` the answer is a "
                    "text/event-stream of chunks ending with `data: [DONE]`.",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}
                        },
                    },
                    "responses": {
                        "200": {"description": "The completion (JSON or SSE)"},
                        "400": {"description": "Invalid request (OpenAI error)"},
                        "404": {"description": "Unknown model"},
                    },
                }
            }
        api.openapi_schema = schema
        return schema

    api.openapi = openapi  # type: ignore[method-assign]
