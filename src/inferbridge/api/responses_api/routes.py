"""The `/v1/responses` routes: create (through `CompletionService.answer`, like chat),
retrieve and delete stored responses.

`include_responses_api(app)` adds them (under `/v1` and at the root, like the OpenAI routes)
and is the one line `api.routes.include_routes` needs. The response store is made on first
use from the config's `responses:` section: `RedisResponseStore` with `state: {store:
redis}` (shared by every replica), `MemoryResponseStore` else.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.responses import StreamingResponse

from inferbridge.api.responses_api.render import ResponsesRenderer, response_shell
from inferbridge.api.responses_api.schema import ResponsesRequest, invalid_responses_body
from inferbridge.api.responses_api.store import (
    MemoryResponseStore,
    RedisResponseStore,
    ResponseStore,
    StoredResponse,
)
from inferbridge.api.responses_api.translate import ResponsesCall, new_id
from inferbridge.api.serving import ERRORS as SERVING_ERRORS
from inferbridge.api.serving import CompletionService
from inferbridge.errors import InferbridgeError, InvalidRequest, NotFound, shown_name
from inferbridge.gateway import Gateway
from inferbridge.request import InferenceRequest

ERRORS: dict[int | str, dict[str, Any]] = {
    **SERVING_ERRORS,
    404: {"description": "Unknown model, or unknown previous_response_id"},
    503: {"description": "No deployment available, or the response store did not answer"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such stored response"},
    503: {"description": "The response store did not answer"},
}


class ResponsesRoute(APIRoute):
    """Validation errors of a Responses body become a 400 naming the Responses field
    (`input[2].call_id`); the app's handler knows the chat schemas' names only."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                raise invalid_responses_body(exc.errors()) from None

        return route


router = APIRouter(tags=["responses"], route_class=ResponsesRoute)


# -- state --------------------------------------------------------------------------------------
def store_of(request: Request) -> ResponseStore:
    """The app's response store, made on first use from the `responses:` config: in the
    state store's Redis when there is one (`max_stored: 0` stores nothing there either)."""
    state = request.app.state
    store = getattr(state, "response_store", None)
    if store is None:
        gateway: Gateway = state.gateway
        settings = gateway.config.responses
        if gateway.shared is not None and settings.max_stored > 0:
            store = RedisResponseStore(
                gateway.shared,
                ttl=settings.store_ttl,
                max_record_bytes=settings.max_record_bytes,
            )
        else:
            store = MemoryResponseStore(
                ttl=settings.store_ttl,
                max_items=settings.max_stored,
                max_bytes=settings.max_stored_bytes,
            )
        state.response_store = store
    return store


def owner_of(request: Request) -> str:
    """Whose records these are: a hash of the API key presented (when keys are on)."""
    gateway: Gateway = request.app.state.gateway
    if not gateway.auth_required:
        return ""
    key = request.headers.get("api-key") or ""
    authorization = request.headers.get("authorization")
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer":
            key = token.strip()
    return hashlib.sha256(key.encode()).hexdigest()[:32]


# -- one request --------------------------------------------------------------------------------
class ResponsesExchange:
    """A `/v1/responses` request on its way: what `CompletionService.answer` builds and
    renders (this object is the renderer factory it is given), then what is stored."""

    def __init__(self, call: ResponsesCall, store: ResponseStore, owner: str) -> None:
        self.call = call
        self.store = store
        self.owner = owner
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self.renderer: ResponsesRenderer | None = None

    def build(self) -> InferenceRequest:
        return self.call.build()

    def __call__(self, request: InferenceRequest, choices: int, keep_text: bool) -> Any:
        shell = response_shell(self.call.body, self.id, self.created_at)
        self.renderer = ResponsesRenderer(request, choices, keep_text, shell)
        return self.renderer

    @staticmethod
    def error_response(err: InferbridgeError, request_id: str) -> Response:
        return ResponsesRenderer.error_response(err, request_id)

    async def save(self) -> None:
        render = self.renderer
        if render is None or render.final is None or not self.call.store:
            return
        record = StoredResponse(self.id, self.owner, render.final, self.call.items)
        await self.store.put(record)

    async def saving(self, body: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """The streamed body, storing the response before its last event leaves (a client
        may continue from it as soon as it sees `response.completed`)."""
        saved = False
        try:
            async for chunk in body:
                if not saved and self.renderer is not None and self.renderer.final is not None:
                    saved = True
                    await self.save()
                yield chunk
        finally:  # cancelled while saving: the body still records and closes its stream
            close = getattr(body, "aclose", None)
            if close is not None:
                await close()


# -- routes -------------------------------------------------------------------------------------
@router.post("/responses", summary="Create a model response", responses=ERRORS)
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    """OpenAI's Responses API, served by any model through the chat path. With
    `stream: true` the answer is a text/event-stream of typed events (`event: <type>`)."""
    data = dict(body)
    store = store_of(request)
    owner = owner_of(request)
    previous = None
    previous_id = data.get("previous_response_id")
    if previous_id is not None:
        found = await store.get(previous_id, owner)
        if found is not None:
            previous = {"response": found.response, "input_items": found.input_items}
    exchange = ResponsesExchange(ResponsesCall(data, previous), store, owner)
    service: CompletionService = request.app.state.completions
    response = await service.answer(request, exchange.build, exchange)  # type: ignore[arg-type]
    if isinstance(response, StreamingResponse):
        response.body_iterator = exchange.saving(response.body_iterator)
    elif response.status_code == 200:
        await exchange.save()
    return response


@router.get("/responses/{response_id}", summary="Retrieve a model response", responses=NOT_FOUND)
async def retrieve_response(response_id: str, request: Request) -> Response:
    """A response created with `store: true` (kept for `responses.store_ttl` seconds)."""
    if request.query_params.get("stream") in ("true", "1"):
        raise InvalidRequest("Streaming a stored response is not supported.", param="stream")
    found = await store_of(request).get(response_id, owner_of(request))
    if found is None:
        raise _not_found(response_id)
    return Response(orjson.dumps(found.response), media_type="application/json")


@router.delete("/responses/{response_id}", summary="Delete a model response", responses=NOT_FOUND)
async def delete_response(response_id: str, request: Request) -> Response:
    if not await store_of(request).delete(response_id, owner_of(request)):
        raise _not_found(response_id)
    body = {"id": response_id, "object": "response", "deleted": True}
    return Response(orjson.dumps(body), media_type="application/json")


def _not_found(response_id: str) -> NotFound:
    return NotFound(f"Response with id '{shown_name(response_id)}' not found.")


def include_responses_api(app: FastAPI) -> None:
    app.include_router(router, prefix="/v1")
    app.include_router(router, include_in_schema=False)
