"""The hot routes, `POST /v1/chat/completions` and `POST /v1/completions`, as raw ASGI.

These bypass FastAPI's request machinery (which measured ~40% of a naive proxy's CPU): the
body is read and validated once, the answer is written as pre-encoded bytes. Flow:

1. read the body (413 past the size limit), check the API key (401);
2. parse and validate (400 naming the field), route (404 unknown model);
3. pull the first batch of events *before* sending any header, so a failure that happens
   before the first token is an HTTP error with its real status, not a 200 stream;
4. stream chunks as each batch arrives, or assemble one JSON response.

A task watches the connection meanwhile: when the client disconnects, the request is
cancelled, which closes the upstream request too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson

from inferbridge import ids
from inferbridge.api.protocol import build_request, parse_body
from inferbridge.api.responses import ResponseAssembler, StreamEncoder, error_event
from inferbridge.errors import InferbridgeError, PayloadTooLarge
from inferbridge.events import Event, aclose
from inferbridge.gateway import Gateway
from inferbridge.observability import RequestTimer
from inferbridge.request import InferenceRequest, Kind, RouteInfo

log = logging.getLogger("inferbridge")
_now = time.perf_counter

Scope = dict[str, Any]
Receive = Any
Send = Any

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class ClientGone(Exception):
    """The client disconnected; nothing more can be sent."""


def internal_error(request_id: str) -> InferbridgeError:
    return InferbridgeError(f"Internal error in inferbridge (request id {request_id}).")


async def send_json(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, exc: InferbridgeError, request_id: str) -> None:
    headers = [*JSON_HEADERS, (b"x-request-id", request_id.encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    await send_json(send, exc.status, exc.body(), headers)


async def read_body(receive: Receive, headers: dict[bytes, bytes], limit: int) -> bytes:
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(
                    f"The request body is larger than the limit of {limit} bytes."
                )
            chunks.append(chunk)
        if not message.get("more_body"):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class CompletionsEndpoint:
    """One of the two hot routes (`kind` "chat" or "completion")."""

    def __init__(self, gateway: Gateway, kind: Kind) -> None:
        self.gateway = gateway
        self.kind: Kind = kind
        self.limit = gateway.config.server.max_body_bytes
        self.observe = gateway.observability

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        timer = RequestTimer()
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id")
        request_id = rid.decode("latin-1") if rid else ids.new_id()
        try:
            self.gateway.authenticate(headers.get(b"authorization"), headers.get(b"api-key"))
            body = await read_body(receive, headers, self.limit)
            request = build_request(self.kind, parse_body(body))
            request.request_id = request_id
            route = RouteInfo()
            stream, choices = self.gateway.open_stream(request, route)
        except ClientGone:
            return
        except InferbridgeError as exc:
            self.observe.rejected(exc.status)
            await send_error(send, exc, request_id)
            return
        except Exception:
            log.exception("request %s failed before reaching a backend", request_id)
            self.observe.rejected(500)
            await send_error(send, internal_error(request_id), request_id)
            return

        timer.routed = _now()
        exchange = Exchange(request, route, timer, send)
        self.observe.started(request.model)
        task = asyncio.current_task()
        assert task is not None
        watch = exchange.watch = DisconnectWatch(receive, task)
        try:
            if request.stream:
                await self._stream(exchange, stream, choices)
            else:
                await self._complete(exchange, stream, choices)
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            task.uncancel()
            timer.disconnected = True
            log.info("request %s: client disconnected, upstream request cancelled", request_id)
        finally:
            watch.stop()
            await aclose(stream)
            self.observe.record(
                request, route, timer, exchange.usage, exchange.error, exchange.completion
            )

    async def _complete(
        self, ex: Exchange, stream: AsyncIterator[Sequence[Event]], choices: int
    ) -> None:
        timer = ex.timer
        assembler = ResponseAssembler(ex.request, choices)
        try:
            async for batch in stream:
                if not timer.first:
                    timer.first = _now()
                assembler.add(batch)
        except Exception as exc:
            await ex.fail(exc)
            return
        timer.last = _now()
        response, estimated = assembler.result()
        ex.usage = response["usage"]
        if self.observe.log_prompts:
            ex.completion = [c.get("message", c.get("text")) for c in response["choices"]]
        headers = [*JSON_HEADERS, *ex.route_headers()]
        if estimated:
            headers.append((b"x-inferbridge-usage-estimated", b"true"))
        ex.watch.done = True  # from here on, a disconnect is the normal end
        await send_json(ex.send, 200, orjson.dumps(response), headers)
        timer.status = 200

    async def _stream(
        self, ex: Exchange, stream: AsyncIterator[Sequence[Event]], choices: int
    ) -> None:
        timer = ex.timer
        send = ex.send
        iterator = stream.__aiter__()
        try:
            first: Sequence[Event] = await iterator.__anext__()
        except StopAsyncIteration:
            first = ()
        except Exception as exc:
            await ex.fail(exc)
            return
        timer.first = _now()

        encoder = StreamEncoder(ex.request, choices, keep_text=self.observe.log_prompts)
        timer.status = 200
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [*SSE_HEADERS, *ex.route_headers()],
            }
        )
        await send(
            {
                "type": "http.response.body",
                "body": encoder.opening() + encoder.encode(first),
                "more_body": True,
            }
        )
        try:
            async for batch in iterator:
                data = encoder.encode(batch)
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            tail = encoder.closing()
            ex.usage, _ = encoder.tracker.final_usage(ex.request)
        except Exception as exc:
            tail = error_event(ex.stream_failed(exc).envelope())
        ex.completion = encoder.tracker.text
        ex.watch.done = True
        await send({"type": "http.response.body", "body": tail, "more_body": False})


class Exchange:
    """One request in flight: what the handler needs to answer and to record it."""

    __slots__ = ("completion", "error", "request", "route", "send", "timer", "usage", "watch")

    def __init__(
        self, request: InferenceRequest, route: RouteInfo, timer: RequestTimer, send: Send
    ) -> None:
        self.request = request
        self.route = route
        self.timer = timer
        self.send = send
        self.usage: dict[str, Any] | None = None
        self.error: Exception | None = None
        self.completion: Any = None
        self.watch: DisconnectWatch

    def route_headers(self) -> list[tuple[bytes, bytes]]:
        """x-request-id, x-inferbridge-model (the model that answered, after fallbacks) and
        x-inferbridge-overhead-ms; computed when the response headers leave."""
        overhead = self.timer.overhead = self.timer.overhead_so_far()
        return [
            (b"x-request-id", self.request.request_id.encode()),
            (b"x-inferbridge-model", self.route.model.encode()),
            (b"x-inferbridge-overhead-ms", f"{overhead * 1000:.3f}".encode()),
        ]

    def _as_error(self, exc: Exception) -> InferbridgeError:
        self.error = exc
        if isinstance(exc, InferbridgeError):
            return exc
        log.error("request %s failed in its backend stream", self.request.request_id, exc_info=exc)
        return internal_error(self.request.request_id)

    async def fail(self, exc: Exception) -> None:
        """Answer with an HTTP error: nothing was sent yet."""
        err = self._as_error(exc)
        self.timer.status = err.status
        self.timer.overhead = self.timer.overhead_so_far()
        self.watch.done = True
        await send_error(self.send, err, self.request.request_id)

    def stream_failed(self, exc: Exception) -> InferbridgeError:
        """The stream broke after it started: the error goes out as an SSE event."""
        err = self._as_error(exc)
        log.warning(
            "request %s: stream failed after it started: %s", self.request.request_id, err.message
        )
        return err


class DisconnectWatch:
    """Cancels the request's task when the client disconnects before the response ends."""

    __slots__ = ("_task", "_watcher", "done", "gone")

    def __init__(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        self.gone = False
        self.done = False
        self._task = task
        self._watcher = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self.done:
                    self.gone = True
                    self._task.cancel()
                return

    def stop(self) -> None:
        self._watcher.cancel()
