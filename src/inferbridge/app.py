"""The FastAPI application: `create_app(config)`.

It holds one `Gateway` (backends, router, auth, observability) in `app.state`, opens the
backends' clients at start-up and closes them at shutdown (the lifespan), checks every
request at the door (`api.gate.RequestGate`), serves the routes of `api.routes`, and turns
every error into the OpenAI envelope (Anthropic's on the Anthropic routes).
`inferbridge serve` and
`uvicorn --factory inferbridge.app:create_app` run the same app; without a config
argument it reads the file named by `INFERBRIDGE_CONFIG` and the `INFERBRIDGE_*` overrides.
"""

from __future__ import annotations

import gc
import inspect
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException

from inferbridge import __version__
from inferbridge.api.anthropic import errors as anthropic_errors
from inferbridge.api.anthropic.schema import invalid_body as anthropic_invalid_body
from inferbridge.api.gate import RequestGate
from inferbridge.api.protocol import invalid_body
from inferbridge.api.routes import include_routes
from inferbridge.api.serving import (
    CompletionService,
    error_response,
    internal_error,
    request_id_of,
)
from inferbridge.config import Config, load_config
from inferbridge.errors import InferbridgeError, shown_name
from inferbridge.gateway import Gateway
from inferbridge.logs import log_startup

log = logging.getLogger("inferbridge")

# Allocations between two young-generation collections (CPython's default is 700): a
# request allocates a few hundred short-lived containers, and collecting every few requests
# promoted the live ones of requests in flight (bench/RESULTS.md has the measurements).
GC_YOUNG_THRESHOLD = 2_000


def settle_heap() -> None:
    """After start-up: move what is loaded by now out of the collector's sight (modules,
    config, clients live for the whole process) and collect the young generation less
    often. Reference cycles are still collected."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def auth_state(config: Config) -> str:
    auth = config.auth
    count = len(auth.api_keys) + len(auth.named_keys) + len(auth.admin_keys)
    if auth.required:
        return f"on ({count} key(s))"
    if count:
        return "OFF (INFERBRIDGE_AUTH=off)"
    return "off (no keys configured)"


def config_from_env() -> Config:
    """The config `inferbridge serve` hands each worker process: the file named by
    INFERBRIDGE_CONFIG, the INFERBRIDGE_* variables and the command line's overrides."""
    overrides = os.environ.get("INFERBRIDGE_CLI_OVERRIDES")
    return load_config(
        os.environ.get("INFERBRIDGE_CONFIG") or None,
        overrides=orjson.loads(overrides) if overrides else None,
    )


def framework_options() -> dict[str, Any]:
    """FastAPI's own per-request OpenTelemetry instrumentation (in the releases that have
    it) off: inferbridge has its metrics and access log, and the instrumentation costs
    every request whether or not an exporter is configured."""
    if "telemetry" not in inspect.signature(FastAPI).parameters:
        return {}
    off = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}
    return {"telemetry": off}


def create_app(config: Config | None = None) -> FastAPI:
    gateway = Gateway(config or config_from_env())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        gateway.observability.start()
        await gateway.start()
        settle_heap()
        log_startup(gateway, __version__, auth_state(gateway.config))
        try:
            yield
        finally:
            try:
                await gateway.close()
            finally:
                gateway.observability.stop()

    app = FastAPIOffline(  # /docs and /redoc with their assets served by the app, no CDN
        title="inferbridge",
        version=__version__,
        description="OpenAI-compatible API in front of self-hosted and hosted LLM backends.",
        lifespan=lifespan,
        **framework_options(),
    )
    app.state.gateway = gateway
    app.state.completions = CompletionService(gateway)
    include_routes(app)
    app.add_middleware(RequestGate, gateway=gateway)
    cors = gateway.config.server.cors
    if cors is not None:  # outside the gate: a preflight carries no key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors.allow_origins,
            allow_methods=cors.allow_methods,
            allow_headers=cors.allow_headers,
            allow_credentials=cors.allow_credentials,
            max_age=cors.max_age,
        )
    add_error_handlers(app)
    return app


def answer_error(request: Request, err: InferbridgeError) -> Response:
    """`err` in the envelope of the API the request's path belongs to."""
    if anthropic_errors.is_anthropic_path(request.url.path):
        return anthropic_errors.error_response(err, request_id_of(request))
    return error_response(err, request_id_of(request))


HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
"""The envelope's `code` for the framework's own errors (an unknown path, a wrong method)."""


def add_error_handlers(app: FastAPI) -> None:
    """Every error a client sees is an OpenAI envelope (Anthropic's on `/v1/messages*`)."""

    @app.exception_handler(InferbridgeError)
    async def on_error(request: Request, exc: InferbridgeError) -> Response:
        return answer_error(request, exc)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> Response:
        if anthropic_errors.is_anthropic_path(request.url.path):
            return answer_error(request, anthropic_invalid_body(exc.errors()))
        return error_response(invalid_body(exc.errors()), request_id_of(request))

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> Response:
        detail = str(exc.detail)
        if exc.status_code in (404, 405):
            detail = f"{detail}: {request.method} {shown_name(request.url.path)}"
        err = InferbridgeError(detail, status=exc.status_code, headers=exc.headers)
        err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        err.code = HTTP_CODES.get(exc.status_code)
        return answer_error(request, err)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> Response:
        request_id = request_id_of(request)
        log.error("request %s: unexpected error", request_id, exc_info=exc)
        return answer_error(request, internal_error(request_id))
