"""The HTTP routes: thin functions that hand each request to the service behind it.

The request bodies are declared with the OpenAI schemas of `inferbridge.api.protocol`, so
FastAPI validates them and `/openapi.json` documents them. Every OpenAI route is served
under `/v1` and, for clients configured without it, at the root too (not documented twice).
Authentication and body limits are checked before a route runs (`inferbridge.api.gate`).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from inferbridge.api.anthropic.routes import router as anthropic
from inferbridge.api.embeddings import include_embeddings
from inferbridge.api.protocol import ChatCompletionRequest, CompletionRequest
from inferbridge.api.responses_api import include_responses_api
from inferbridge.api.serving import ERRORS, CompletionService
from inferbridge.api.usage import identity_of
from inferbridge.api.usage import router as usage_routes
from inferbridge.errors import AuthenticationFailed, ModelNotFound
from inferbridge.gateway import Gateway

JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway


def completions_of(request: Request) -> CompletionService:
    return request.app.state.completions


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status, media_type=JSON)


openai = APIRouter(tags=["openai"])


@openai.post("/chat/completions", summary="Create a chat completion", responses=ERRORS)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    """OpenAI-compatible. With `stream: true` the answer is a text/event-stream of chunks
    ending with `data: [DONE]`."""
    return await completions_of(request).serve("chat", dict(body), request)


@openai.post("/completions", summary="Create a completion (legacy)", responses=ERRORS)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    """OpenAI-compatible. With `stream: true` the answer is a text/event-stream of chunks
    ending with `data: [DONE]`."""
    return await completions_of(request).serve("completion", dict(body), request)


@openai.get("/models", summary="List models")
async def list_models(request: Request) -> Response:
    gateway = gateway_of(request)
    identity = identity_of(request)
    names = [n for n in gateway.router.public_names() if gateway.allows(identity, n)]
    cards = [model_card(request, name) for name in names]
    return json_response({"object": "list", "data": cards})


@openai.get("/models/{model:path}", summary="Retrieve a model", responses={404: ERRORS[404]})
async def retrieve_model(model: str, request: Request) -> Response:
    gateway = gateway_of(request)
    router = gateway.router
    if model not in router.models and model not in router.aliases:
        raise ModelNotFound(model)
    if not gateway.allows(identity_of(request), model):
        raise ModelNotFound(model)  # a model the key may not use does not exist for it
    return json_response(model_card(request, model))


def model_card(request: Request, name: str) -> dict[str, Any]:
    owner = gateway_of(request).router.deployments(name)[0].config.owned_by
    created = request.app.state.started
    return {"id": name, "object": "model", "created": created, "owned_by": owner}


health = APIRouter(tags=["health"])


@health.get("/health", summary="Liveness check")
async def liveness() -> Response:
    return Response(b'{"status":"ok"}', media_type=JSON)


@health.get("/health/readiness", summary="Readiness: each deployment's state")
async def readiness(request: Request) -> Response:
    """Ready when every model has a usable deployment. The per-model report (names,
    deployments, states) is shown only to an authenticated caller when keys are on."""
    gateway = gateway_of(request)
    ready, report = gateway.readiness()
    try:
        identity = gateway.authenticate(
            request.headers.get("authorization"),
            request.headers.get("api-key") or request.headers.get("x-api-key"),
        )
    except AuthenticationFailed:
        return json_response({"status": report["status"]}, 200 if ready else 503)
    if identity is not None and identity.models is not None:  # only what the key may use
        report["models"] = {
            name: row for name, row in report["models"].items() if gateway.allows(identity, name)
        }
        report["aliases"] = {
            alias: name
            for alias, name in report["aliases"].items()
            if gateway.allows(identity, alias)
        }
    return json_response(report, 200 if ready else 503)


@health.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    return Response(gateway_of(request).observability.exposition(), media_type=PROMETHEUS)


def include_routes(app: FastAPI) -> None:
    app.include_router(openai, prefix="/v1")
    app.include_router(openai, include_in_schema=False)
    app.include_router(health)
    app.include_router(anthropic)
    app.include_router(usage_routes)
    include_embeddings(app)
    include_responses_api(app)
    app.state.started = int(time.time())
