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
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive

from inferbridge.api.gate import request_id_of as request_id_from_headers
from inferbridge.api.heartbeat import Heartbeats
from inferbridge.api.protocol import normalize
from inferbridge.api.responses import ResponseAssembler, StreamEncoder, error_event
from inferbridge.errors import InferbridgeError
from inferbridge.events import Event, aclose
from inferbridge.gateway import Gateway
from inferbridge.keys import IDENTITY
from inferbridge.observability import LOGGED, RequestTimer
from inferbridge.quotas import NO_LIMITS, Admission
from inferbridge.request import InferenceRequest, Kind, RouteInfo

log = logging.getLogger("inferbridge")
_now = time.perf_counter

T = TypeVar("T")
Batches = AsyncIterator[Sequence[Event]]

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
SSE_MEDIA_TYPE = "text/event-stream; charset=utf-8"

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid request (OpenAI error envelope naming the field)"},
    401: {"description": "Missing or wrong API key"},
    404: {"description": "Unknown model"},
    429: {"description": "Rate limited or every deployment busy"},
    502: {"description": "The backend failed"},
    503: {"description": "No deployment available"},
    504: {"description": "The backend timed out"},
}
"""The error answers of the OpenAI-dialect generation routes, for `/openapi.json`."""


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


async def until_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work` in this task, cancelling it if the client disconnects first: a watcher
    task waits for `http.disconnect` and cancels this one (`ClientGone`)."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()
        raise ClientGone from None
    finally:
        watcher.cancel()


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


SAFE_PARAM = re.compile(r"[A-Za-z0-9_.\-\[\]]{1,64}")
MAX_NAMED = 16
"""Ignored parameters named in the header at most (the rest are counted)."""


def ignored_header(ignored: Sequence[str], names: Mapping[str, str]) -> str:
    """`x-inferbridge-ignored-params`: the names (the dialect's) of ignored parameters;
    names a header cannot carry safely (the client chose them) are counted, not shown."""
    unique = list(dict.fromkeys(names.get(name, name) for name in ignored))
    shown = [name for name in unique if SAFE_PARAM.fullmatch(name)][:MAX_NAMED]
    if len(unique) > len(shown):
        shown.append(f"{len(unique) - len(shown)} more")
    return ", ".join(shown)


class Exchange:
    """One request in flight: what the service needs to answer it and to record it."""

    __slots__ = ("admission", "error", "request", "route", "timer")

    def __init__(
        self,
        request: InferenceRequest,
        route: RouteInfo,
        timer: RequestTimer,
        admission: Admission = NO_LIMITS,
    ) -> None:
        self.request = request
        self.route = route
        self.timer = timer
        self.error: Exception | None = None
        self.admission = admission

    def headers(self, names: Mapping[str, str]) -> dict[str, str]:
        """x-request-id, x-inferbridge-model (the model that answered, after fallbacks) and
        x-inferbridge-overhead-ms, computed when the response headers leave; the ignored
        parameters, by the dialect's `names` for them."""
        overhead = self.timer.overhead = self.timer.overhead_so_far()
        headers = {
            "x-request-id": self.request.request_id,
            "x-inferbridge-model": self.route.model,
            "x-inferbridge-overhead-ms": f"{overhead * 1000:.3f}",
        }
        if self.route.ignored:
            headers["x-inferbridge-ignored-params"] = ignored_header(self.route.ignored, names)
        if self.admission.headers:  # x-ratelimit-* of the key's and model's limits
            headers.update(self.admission.headers)
        return headers

    def as_error(self, exc: Exception) -> InferbridgeError:
        self.error = exc
        if isinstance(exc, InferbridgeError):
            return exc
        log.error("request %s failed in its backend stream", self.request.request_id, exc_info=exc)
        return internal_error(self.request.request_id)

    def failed(self, exc: Exception, render: Renderer) -> Response:
        """An HTTP error answer: nothing was sent yet."""
        err = self.as_error(exc)
        if self.admission.headers:
            err.headers = {**self.admission.headers, **err.headers}
        self.timer.status = err.status
        self.timer.overhead = self.timer.overhead_so_far()
        return render.error_response(err, self.request.request_id)


class Renderer(Protocol):
    """How one API dialect answers a routed request from its events.

    One renderer per request. A whole answer: `add` every batch, then `result`. A stream:
    `opening` (after the first batch was `encode`d: it may carry metadata such as the
    system fingerprint), `encode` each batch, then `closing`, or `failure` when the stream
    broke after it started. `error_response` answers an error before anything was sent.

    A dialect with keep-alive pings sets `heartbeat` (seconds) and `ping() -> bytes`: a
    stream silent for that long gets a ping (`inferbridge.api.heartbeat`).
    """

    media_type: str
    """The stream's content type."""
    param_names: Mapping[str, str]
    """Chat parameter -> the dialect's name for it (for `x-inferbridge-ignored-params`)."""

    def __init__(self, request: InferenceRequest, choices: int, keep_text: bool) -> None: ...

    def add(self, batch: Sequence[Event]) -> None: ...

    def result(self) -> tuple[dict[str, Any], dict[str, str]]:
        """The whole answer's body and extra headers."""
        ...

    def opening(self) -> bytes: ...

    def encode(self, batch: Sequence[Event]) -> bytes: ...

    def closing(self) -> bytes: ...

    def failure(self, err: InferbridgeError) -> bytes: ...

    def usage(self) -> dict[str, Any] | None:
        """Token counts in OpenAI's shape (prompt_tokens, completion_tokens), for metrics."""
        ...

    def completion(self) -> Any:
        """What was generated, for access logs when `log_prompts` is on."""
        ...

    @staticmethod
    def error_response(err: InferbridgeError, request_id: str) -> Response:
        """An error in the dialect's envelope (a static method: also used before there is a
        request to render)."""
        ...


RendererFactory = type[Renderer]
"""A renderer class: `cls(request, choice count, keep text for logs)`."""


class ChatRenderer:
    """The OpenAI chat and legacy completion dialect: `StreamEncoder` chunks and
    `ResponseAssembler` objects (they share one `ChoiceTracker`, so both agree)."""

    media_type = SSE_MEDIA_TYPE
    param_names: Mapping[str, str] = {}

    def __init__(self, request: InferenceRequest, choices: int, keep_text: bool) -> None:
        self.request = request
        self.keep_text = keep_text
        self.assembler = ResponseAssembler(request, choices)
        self.encoder = StreamEncoder(request, choices, keep_text=keep_text)
        self._usage: dict[str, Any] | None = None
        self._completion: Any = None

    def add(self, batch: Sequence[Event]) -> None:
        self.assembler.add(batch)

    def result(self) -> tuple[dict[str, Any], dict[str, str]]:
        response, estimated = self.assembler.result()
        self._usage = response["usage"]
        if self.keep_text:
            self._completion = [c.get("message", c.get("text")) for c in response["choices"]]
        return response, {"x-inferbridge-usage-estimated": "true"} if estimated else {}

    def opening(self) -> bytes:
        return self.encoder.opening()

    def encode(self, batch: Sequence[Event]) -> bytes:
        return self.encoder.encode(batch)

    def closing(self) -> bytes:
        self._usage, _ = self.encoder.tracker.final_usage(self.request)
        return self.encoder.closing()

    def failure(self, err: InferbridgeError) -> bytes:
        return error_event(err.envelope())

    def usage(self) -> dict[str, Any] | None:
        return self._usage

    def completion(self) -> Any:
        return self._completion if self._completion is not None else self.encoder.tracker.text

    @staticmethod
    def error_response(err: InferbridgeError, request_id: str) -> Response:
        return error_response(err, request_id)


class CompletionService:
    """Serves every generation route: routes a normalized request and answers it in the
    route's dialect (see module doc)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.observe = gateway.observability

    async def serve(self, kind: Kind, body: dict[str, Any], http: Request) -> Response:
        """The OpenAI chat and legacy completion routes."""
        return await self.answer(http, lambda: normalize(kind, body), ChatRenderer)

    async def answer(
        self,
        http: Request,
        build: Callable[[], InferenceRequest],
        renderer: RendererFactory,
    ) -> Response:
        """Build the request (`build` may raise a 4xx), route it, and answer it with the
        dialect's renderer, streamed or whole."""
        timer = RequestTimer()
        request_id = request_id_of(http)
        request: InferenceRequest | None = None
        state = http.scope.setdefault("state", {})
        try:
            identity = state.get(IDENTITY)
            request = build()
            request.request_id = request_id
            request.key = identity.name if identity is not None else ""
            route = RouteInfo()
            stream, choices = self.gateway.open_stream(request, route, identity)
            admission = await self.gateway.admit(identity, request)  # 429 over a limit
        except InferbridgeError as exc:
            state[LOGGED] = True  # logged here, not by the gate
            self.observe.rejected(
                exc.status,
                error=exc,
                path=http.scope["path"],
                method=http.scope["method"],
                request_id=request_id,
                model=request.model if request is not None else None,
                started=timer.start,
                key=request.key if request is not None else None,
            )
            return renderer.error_response(exc, request_id)

        timer.routed = _now()
        ex = Exchange(request, route, timer, admission)
        render = renderer(request, choices, self.observe.log_prompts)
        state[LOGGED] = True  # `_record` logs it, not the gate
        self.observe.started(request.model)
        streaming = False
        try:
            if request.stream:
                first = await until_disconnected(http.receive, anext(stream, ()))
                timer.first = _now()
                response = self._stream_response(ex, stream, render, first)
                streaming = True
                return response
            return await until_disconnected(http.receive, self._complete(ex, stream, render))
        except ClientGone:
            timer.disconnected = True
            log.info("request %s: client disconnected, upstream request cancelled", request_id)
            return Response(status_code=499)
        except Exception as exc:
            return ex.failed(exc, render)
        finally:
            if not streaming:  # a stream is recorded when its body ends
                self._record(ex, render)
                await aclose(stream)

    def _record(self, ex: Exchange, render: Renderer) -> None:
        ex.admission.finish(render.usage(), ex.timer.status)
        completion = render.completion() if self.observe.log_prompts else None
        self.observe.record(ex.request, ex.route, ex.timer, render.usage(), ex.error, completion)

    async def _complete(self, ex: Exchange, stream: Batches, render: Renderer) -> Response:
        timer = ex.timer
        async for batch in stream:
            if not timer.first:
                timer.first = _now()
            render.add(batch)
        timer.last = _now()
        body, extra = render.result()
        headers = {**ex.headers(render.param_names), **extra}
        timer.status = 200
        return Response(orjson.dumps(body), 200, headers, media_type="application/json")

    def _stream_response(
        self, ex: Exchange, stream: Batches, render: Renderer, first: Sequence[Event]
    ) -> StreamingResponse:
        ex.timer.status = 200
        return StreamingResponse(
            self._chunks(ex, stream, render, first),
            headers={**SSE_HEADERS, **ex.headers(render.param_names)},
            media_type=render.media_type,
        )

    async def _chunks(
        self, ex: Exchange, stream: Batches, render: Renderer, first: Sequence[Event]
    ) -> AsyncIterator[bytes]:
        """The streamed body: the opening and the first batch, then each batch as it
        arrives, then the closing (or the dialect's error event if the stream broke)."""
        heartbeat, ping = getattr(render, "heartbeat", None), getattr(render, "ping", None)
        batches = Heartbeats(stream, heartbeat) if heartbeat else stream
        try:
            data = render.encode(first)
            yield render.opening() + data
            try:
                async for batch in batches:
                    data = render.encode(batch) if batch is not None else ping()
                    if data:
                        yield data
                tail = render.closing()
            except Exception as exc:
                err = ex.as_error(exc)
                log.warning(
                    "request %s: stream failed after it started: %s",
                    ex.request.request_id,
                    err.message,
                )
                tail = render.failure(err)
            yield tail
        except asyncio.CancelledError:
            ex.timer.disconnected = True
            log.info(
                "request %s: client disconnected, upstream request cancelled",
                ex.request.request_id,
            )
            raise
        finally:
            self._record(ex, render)
            await aclose(batches)
