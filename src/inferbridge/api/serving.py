"""Serving one completion request: from a validated OpenAI body to the HTTP response.

`CompletionService.serve` is what the chat and legacy completion routes call:

1. `normalize` turns the (validated) body into an `InferenceRequest`; `Gateway.open_stream` routes
   it (an unknown model is a 404 here) and returns a stream of event batches;
2. the first batch is pulled *before* any header is sent, so a failure before the first
   token (no deployment, upstream errors after retries and fallbacks) is an HTTP error with
   its real status, not a 200 stream;
3. streamed: a `StreamingResponse` whose body generator encodes each later batch as SSE
   chunks as soon as it arrives (`StreamEncoder`); not streamed: the batches are assembled
   into one response object (`ResponseAssembler`).

A client that disconnects cancels the request: while the first batch (or a whole answer)
is awaited, `until_disconnected` races it against `http.disconnect`; during a stream,
Starlette's `StreamingResponse` cancels the body generator. Either way the event stream is
closed, which closes the upstream request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive

from inferbridge.api.gate import request_id_of as request_id_from_headers
from inferbridge.api.protocol import normalize
from inferbridge.api.responses import ResponseAssembler, StreamEncoder, error_event
from inferbridge.errors import InferbridgeError
from inferbridge.events import Event, aclose
from inferbridge.gateway import Gateway
from inferbridge.observability import RequestTimer
from inferbridge.request import InferenceRequest, Kind, RouteInfo

log = logging.getLogger("inferbridge")
_now = time.perf_counter

T = TypeVar("T")
Batches = AsyncIterator[Sequence[Event]]

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
SSE_MEDIA_TYPE = "text/event-stream; charset=utf-8"


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


async def until_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (`ClientGone`)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGone


def request_id_of(request: Request) -> str:
    """The request's id, as the gate chose it (the client's `x-request-id` when sane)."""
    found = request.scope.get("state", {}).get("request_id")
    return found or request_id_from_headers(request.headers)


def error_response(exc: InferbridgeError, request_id: str | None = None) -> Response:
    """`exc` as an OpenAI error envelope with its status and headers."""
    headers = dict(exc.headers)
    if request_id:
        headers["x-request-id"] = request_id
    return Response(exc.body(), exc.status, headers, media_type="application/json")


def internal_error(request_id: str) -> InferbridgeError:
    return InferbridgeError(f"Internal error in inferbridge (request id {request_id}).")


class Exchange:
    """One request in flight: what the service needs to answer it and to record it."""

    __slots__ = ("completion", "error", "request", "route", "timer", "usage")

    def __init__(self, request: InferenceRequest, route: RouteInfo, timer: RequestTimer) -> None:
        self.request = request
        self.route = route
        self.timer = timer
        self.usage: dict[str, Any] | None = None
        self.error: Exception | None = None
        self.completion: Any = None

    def headers(self) -> dict[str, str]:
        """x-request-id, x-inferbridge-model (the model that answered, after fallbacks) and
        x-inferbridge-overhead-ms, computed when the response headers leave."""
        overhead = self.timer.overhead = self.timer.overhead_so_far()
        headers = {
            "x-request-id": self.request.request_id,
            "x-inferbridge-model": self.route.model,
            "x-inferbridge-overhead-ms": f"{overhead * 1000:.3f}",
        }
        if self.route.ignored:
            headers["x-inferbridge-ignored-params"] = ", ".join(dict.fromkeys(self.route.ignored))
        return headers

    def as_error(self, exc: Exception) -> InferbridgeError:
        self.error = exc
        if isinstance(exc, InferbridgeError):
            return exc
        log.error("request %s failed in its backend stream", self.request.request_id, exc_info=exc)
        return internal_error(self.request.request_id)

    def failed(self, exc: Exception) -> Response:
        """An HTTP error answer: nothing was sent yet."""
        err = self.as_error(exc)
        self.timer.status = err.status
        self.timer.overhead = self.timer.overhead_so_far()
        return error_response(err, self.request.request_id)


class CompletionService:
    """Serves `POST /v1/chat/completions` and `POST /v1/completions` (see module doc)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.observe = gateway.observability

    async def serve(self, kind: Kind, body: dict[str, Any], http: Request) -> Response:
        timer = RequestTimer()
        request_id = request_id_of(http)
        try:
            request = normalize(kind, body)
            request.request_id = request_id
            route = RouteInfo()
            stream, choices = self.gateway.open_stream(request, route)
        except InferbridgeError as exc:
            self.observe.rejected(exc.status)
            return error_response(exc, request_id)

        timer.routed = _now()
        ex = Exchange(request, route, timer)
        self.observe.started(request.model)
        streaming = False
        try:
            if request.stream:
                first = await until_disconnected(http.receive, anext(stream, ()))
                timer.first = _now()
                response = self._stream_response(ex, stream, choices, first)
                streaming = True
                return response
            return await until_disconnected(http.receive, self._complete(ex, stream, choices))
        except ClientGone:
            timer.disconnected = True
            log.info("request %s: client disconnected, upstream request cancelled", request_id)
            return Response(status_code=499)
        except Exception as exc:
            return ex.failed(exc)
        finally:
            if not streaming:  # a stream is recorded when its body ends
                self.observe.record(request, route, timer, ex.usage, ex.error, ex.completion)
                await aclose(stream)

    async def _complete(self, ex: Exchange, stream: Batches, choices: int) -> Response:
        timer = ex.timer
        assembler = ResponseAssembler(ex.request, choices)
        async for batch in stream:
            if not timer.first:
                timer.first = _now()
            assembler.add(batch)
        timer.last = _now()
        response, estimated = assembler.result()
        ex.usage = response["usage"]
        if self.observe.log_prompts:
            ex.completion = [c.get("message", c.get("text")) for c in response["choices"]]
        headers = ex.headers()
        if estimated:
            headers["x-inferbridge-usage-estimated"] = "true"
        timer.status = 200
        return Response(orjson.dumps(response), 200, headers, media_type="application/json")

    def _stream_response(
        self, ex: Exchange, stream: Batches, choices: int, first: Sequence[Event]
    ) -> StreamingResponse:
        encoder = StreamEncoder(ex.request, choices, keep_text=self.observe.log_prompts)
        ex.timer.status = 200
        return StreamingResponse(
            self._chunks(ex, stream, encoder, first),
            headers={**SSE_HEADERS, **ex.headers()},
            media_type=SSE_MEDIA_TYPE,
        )

    async def _chunks(
        self, ex: Exchange, stream: Batches, encoder: StreamEncoder, first: Sequence[Event]
    ) -> AsyncIterator[bytes]:
        """The SSE body: the opening chunk and the first batch, then each batch as it
        arrives, then the closing chunks (or an error event if the stream broke)."""
        try:
            data = encoder.encode(first)  # first: it may carry the system_fingerprint
            yield encoder.opening() + data
            try:
                async for batch in stream:
                    data = encoder.encode(batch)
                    if data:
                        yield data
                tail = encoder.closing()
                ex.usage, _ = encoder.tracker.final_usage(ex.request)
            except Exception as exc:
                err = ex.as_error(exc)
                log.warning(
                    "request %s: stream failed after it started: %s",
                    ex.request.request_id,
                    err.message,
                )
                tail = error_event(err.envelope())
            ex.completion = encoder.tracker.text
            yield tail
        except asyncio.CancelledError:
            ex.timer.disconnected = True
            log.info(
                "request %s: client disconnected, upstream request cancelled",
                ex.request.request_id,
            )
            raise
        finally:
            self.observe.record(ex.request, ex.route, ex.timer, ex.usage, ex.error, ex.completion)
            await aclose(stream)
