"""The Anthropic routes: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

Keys are checked by the gate (`x-api-key` or `Authorization: Bearer`); `anthropic-version`
and `anthropic-beta` headers are accepted and not used.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from inferbridge.api.anthropic.render import MessagesRenderer
from inferbridge.api.anthropic.schema import (
    CountTokensRequest,
    MessagesRequest,
    build_request,
    to_chat,
)
from inferbridge.api.protocol import normalize
from inferbridge.api.serving import CompletionService
from inferbridge.errors import UpstreamError
from inferbridge.gateway import Gateway
from inferbridge.request import InferenceRequest
from inferbridge.usage import estimate_prompt_tokens, estimate_tokens

log = logging.getLogger("inferbridge")

ESTIMATED_HEADER = "x-inferbridge-tokens-estimated"

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid request (Anthropic error envelope, naming the field)"},
    401: {"description": "Missing or wrong API key (authentication_error)"},
    404: {"description": "Unknown model (not_found_error)"},
    429: {"description": "Rate limited or every deployment busy (rate_limit_error)"},
    502: {"description": "The backend failed (api_error)"},
    503: {"description": "No deployment available (overloaded_error)"},
    504: {"description": "The backend timed out (timeout_error)"},
}

router = APIRouter(tags=["anthropic"])


@router.post("/v1/messages", summary="Create a message (Anthropic Messages API)", responses=ERRORS)
async def create_message(body: MessagesRequest, request: Request) -> Response:
    """Anthropic-compatible, served by the model's chat path. With `stream: true` the answer
    is a text/event-stream of Anthropic's events, from `message_start` to `message_stop`."""
    service: CompletionService = request.app.state.completions
    data = dict(body)
    return await service.answer(request, lambda: build_request(data), MessagesRenderer)


@router.post(
    "/v1/messages/count_tokens",
    summary="Count the input tokens of a message (Anthropic Messages API)",
    responses={k: ERRORS[k] for k in (400, 401, 404)},
)
async def count_tokens(body: CountTokensRequest, request: Request) -> Response:
    """`{"input_tokens": N}`: counted by the model's backend when it has a tokenizer
    endpoint (TGI, llama.cpp, vLLM), estimated otherwise, which the header
    `x-inferbridge-tokens-estimated: true` says."""
    gateway: Gateway = request.app.state.gateway
    inference = normalize("chat", to_chat(dict(body)))
    backends = gateway.router.deployments(inference.model)  # 404 for an unknown model
    count: int | None = None
    for backend in backends:
        counter = getattr(backend, "count_tokens", None)
        if counter is None:
            continue
        try:
            count = await counter(inference)
        except UpstreamError as exc:
            log.warning("token count from %s failed, estimated instead: %s", backend.label, exc)
        break  # the first deployment that can count answers (or its failure is estimated)
    headers = {}
    if count is None:
        count = estimate_input_tokens(inference)
        headers[ESTIMATED_HEADER] = "true"
    return Response(
        orjson.dumps({"input_tokens": count}), headers=headers, media_type="application/json"
    )


def estimate_input_tokens(request: InferenceRequest) -> int:
    """The message text's estimate (`inferbridge.usage`), plus the tool calls' arguments and
    the tool definitions."""
    extra = 0
    for message in request.messages or ():
        for call in message.get("tool_calls") or ():
            extra += len(call["function"]["name"]) + len(call["function"]["arguments"])
    tools = request.params.get("tools")
    if tools:
        extra += len(orjson.dumps(tools))
    return estimate_prompt_tokens(request) + estimate_tokens(extra)
