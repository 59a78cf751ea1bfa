"""The hot routes, `POST /v1/chat/completions` and `POST /v1/completions`.

These bypass FastAPI's request machinery: the body is read and validated once, the answer
is written as pre-encoded bytes. `CompletionsEndpoint.serve` holds the logic and writes
through a `Reply`; two transports feed it:
- `inferbridge.api.http_protocol` (what `inferbridge serve` runs): uvicorn's httptools
  protocol with these two routes served straight from the connection, no ASGI cycle;
- `CompletionsEndpoint.__call__`: plain ASGI, for any other ASGI server.

Flow of `serve`:
1. check the API key (401); parse and validate (400 naming the field), route (404);
2. pull the first batch of events *before* sending any header, so a failure that happens
   before the first token is an HTTP error with its real status, not a 200 stream;
3. stream chunks as each batch arrives, or assemble one JSON response. On a transport
   that can write without awaiting (`Reply.can_push`), the batches after the first are
   pushed from the upstream socket's callback (`PushedChunks`, `events.Delivery`).

When the client disconnects before the end, the transport cancels the request's task,
which closes the upstream request too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import orjson

from inferbridge import ids
from inferbridge.api.protocol import build_request, parse_body
from inferbridge.api.responses import ResponseAssembler, StreamEncoder, error_event
from inferbridge.errors import InferbridgeError, PayloadTooLarge
from inferbridge.events import Delivery, Event, aclose
from inferbridge.gateway import Gateway
from inferbridge.observability import RequestTimer
from inferbridge.request import InferenceRequest, Kind, RouteInfo

log = logging.getLogger("inferbridge")
_now = time.perf_counter

Headers = list[tuple[bytes, bytes]]
Scope = dict[str, Any]
Receive = Any
Send = Any

JSON_HEADERS: Headers = [(b"content-type", b"application/json")]
SSE_HEADERS: Headers = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class ClientGone(Exception):
    """The client disconnected; nothing more can be sent."""


class Reply:
    """Where one response goes. `whole` sends a complete response; `start`, `chunk` and
    `end` send a 200 event stream. `gone` is set by the transport when the client left
    before the end (it also cancels the request's task); `done` is set by the handler once
    the last bytes are on their way, after which a disconnect is the normal end."""

    __slots__ = ("done", "gone")

    can_push = False
    """Whether `write_now` / `when_writable` work: stream chunks can be written from a
    callback, without awaiting (see `inferbridge.events.Delivery`)."""

    def __init__(self) -> None:
        self.done = False
        self.gone = False

    def watch(self) -> None:
        """From now on, cancel the running task if the client disconnects (transports that
        know their request's task, like `HotCycle`, need not do anything here)."""

    def unwatch(self) -> None:
        """Stop watching (the request is over)."""

    async def whole(self, status: int, headers: Headers, body: bytes) -> None:
        raise NotImplementedError

    async def start(self, headers: Headers, body: bytes) -> None:
        raise NotImplementedError

    async def chunk(self, body: bytes) -> None:
        raise NotImplementedError

    async def end(self, body: bytes) -> None:
        raise NotImplementedError

    def write_now(self, body: bytes) -> bool:
        """Send a stream chunk at once; False when the client's buffer is full."""
        raise NotImplementedError

    def when_writable(self, resume: Callable[[], None]) -> None:
        """Call `resume` once the client's buffer has drained (or the client is gone)."""
        raise NotImplementedError


class PushedChunks:
    """The OpenAI layer's `BatchSink`: encodes each pushed batch and writes it at once."""

    __slots__ = ("encoder", "reply")

    def __init__(self, encoder: StreamEncoder, reply: Reply) -> None:
        self.encoder = encoder
        self.reply = reply

    def push(self, batch: Sequence[Event]) -> bool:
        data = self.encoder.encode(batch)
        return self.reply.write_now(data) if data else True

    def when_writable(self, resume: Callable[[], None]) -> None:
        self.reply.when_writable(resume)


def internal_error(request_id: str) -> InferbridgeError:
    return InferbridgeError(f"Internal error in inferbridge (request id {request_id}).")


def request_id_of(headers: dict[bytes, bytes]) -> str:
    """The client's `x-request-id` when it is a sane token, else a new id."""
    given = headers.get(b"x-request-id")
    if given and len(given) <= 200 and given.isascii():
        text = given.decode("ascii")
        if text.isprintable():
            return text
    return ids.new_id()


def error_reply(exc: InferbridgeError, request_id: str) -> tuple[int, Headers, bytes]:
    headers = [*JSON_HEADERS, (b"x-request-id", request_id.encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    return exc.status, headers, exc.body()


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")


def declared_too_large(headers: dict[bytes, bytes], limit: int) -> bool:
    """Whether the request's `content-length` alone is past `limit`."""
    declared = headers.get(b"content-length")
    return declared is not None and declared.isdigit() and int(declared) > limit


class CompletionsEndpoint:
    """One of the two hot routes (`kind` "chat" or "completion")."""

    def __init__(self, gateway: Gateway, kind: Kind) -> None:
        self.gateway = gateway
        self.kind: Kind = kind
        self.limit = gateway.config.server.max_body_bytes
        self.observe = gateway.observability

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry: read the body, then `serve` through an `AsgiReply`."""
        headers = dict(scope["headers"])
        reply = AsgiReply(send, receive)
        try:
            body = await read_body(receive, headers, self.limit)
        except ClientGone:
            return
        except PayloadTooLarge as exc:
            self.observe.rejected(exc.status)
            await reply.whole(*error_reply(exc, request_id_of(headers)))
            return
        await self.serve(headers, body, reply)

    async def serve(self, headers: dict[bytes, bytes], body: bytes, reply: Reply) -> None:
        timer = RequestTimer()
        request_id = request_id_of(headers)
        try:
            self.gateway.authenticate(headers.get(b"authorization"), headers.get(b"api-key"))
            request = build_request(self.kind, parse_body(body))
            request.request_id = request_id
            if request.stream and reply.can_push:
                request.delivery = Delivery()
            route = RouteInfo()
            stream, choices = self.gateway.open_stream(request, route)
        except InferbridgeError as exc:
            self.observe.rejected(exc.status)
            await reply.whole(*error_reply(exc, request_id))
            return
        except Exception:
            log.exception("request %s failed before reaching a backend", request_id)
            self.observe.rejected(500)
            await reply.whole(*error_reply(internal_error(request_id), request_id))
            return

        timer.routed = _now()
        exchange = Exchange(request, route, timer, reply)
        self.observe.started(request.model)
        reply.watch()
        try:
            if request.stream:
                await self._stream(exchange, stream, choices)
            else:
                await self._complete(exchange, stream, choices)
        except asyncio.CancelledError:
            if not reply.gone:
                raise
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
            timer.disconnected = True
            log.info("request %s: client disconnected, upstream request cancelled", request_id)
        finally:
            reply.unwatch()
            await aclose(stream)
            if request.delivery is not None:
                request.delivery.sink = None  # it refers back to the request: no cycle left
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
        ex.reply.done = True  # from here on, a disconnect is the normal end
        await ex.reply.whole(200, headers, orjson.dumps(response))
        timer.status = 200

    async def _stream(
        self, ex: Exchange, stream: AsyncIterator[Sequence[Event]], choices: int
    ) -> None:
        timer = ex.timer
        reply = ex.reply
        opening = Opening(ex.request, choices, self.observe.log_prompts)
        iterator = stream.__aiter__()
        try:
            first: Sequence[Event] = await iterator.__anext__()
        except StopAsyncIteration:
            first = ()
        except Exception as exc:
            await ex.fail(exc)
            return
        timer.first = _now()

        encoder, head = opening.made()
        timer.status = 200
        await reply.start([*SSE_HEADERS, *ex.route_headers()], head + encoder.encode(first))
        delivery = ex.request.delivery
        if delivery is not None:  # later batches may come by callback, straight to the client
            delivery.sink = PushedChunks(encoder, reply)
        try:
            async for batch in iterator:
                data = encoder.encode(batch)
                if data:
                    await reply.chunk(data)
            tail = encoder.closing()
            ex.usage, _ = encoder.tracker.final_usage(ex.request)
        except Exception as exc:
            tail = error_event(ex.stream_failed(exc).envelope())
        ex.completion = encoder.tracker.text
        reply.done = True
        await reply.end(tail)


class Opening:
    """A stream's encoder and its opening chunk, made while the upstream works: by a
    callback that runs once the request's task waits for the upstream's answer. So neither
    the way to the upstream nor the way from its first bytes to the first chunk pays for
    them; the second runs cold after the wait (measured ~20 µs for this after a 200 µs idle,
    against ~5 µs hot: bench/RESULTS.md). Made on the spot if asked for before that."""

    __slots__ = ("args", "encoder", "head")

    def __init__(self, request: InferenceRequest, choices: int, keep_text: bool) -> None:
        self.args = (request, choices, keep_text)
        self.encoder: StreamEncoder | None = None
        self.head = b""
        asyncio.get_running_loop().call_soon(self.make)

    def make(self) -> None:
        if self.encoder is None:
            request, choices, keep_text = self.args
            self.encoder = StreamEncoder(request, choices, keep_text=keep_text)
            self.head = self.encoder.opening()

    def made(self) -> tuple[StreamEncoder, bytes]:
        self.make()
        assert self.encoder is not None
        return self.encoder, self.head


class Exchange:
    """One request in flight: what the handler needs to answer and to record it."""

    __slots__ = ("completion", "error", "reply", "request", "route", "timer", "usage")

    def __init__(
        self, request: InferenceRequest, route: RouteInfo, timer: RequestTimer, reply: Reply
    ) -> None:
        self.request = request
        self.route = route
        self.timer = timer
        self.reply = reply
        self.usage: dict[str, Any] | None = None
        self.error: Exception | None = None
        self.completion: Any = None

    def route_headers(self) -> Headers:
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
        self.reply.done = True
        await self.reply.whole(*error_reply(err, self.request.request_id))

    def stream_failed(self, exc: Exception) -> InferbridgeError:
        """The stream broke after it started: the error goes out as an SSE event."""
        err = self._as_error(exc)
        log.warning(
            "request %s: stream failed after it started: %s", self.request.request_id, err.message
        )
        return err


# -- plain ASGI transport -----------------------------------------------------------------


async def read_body(receive: Receive, headers: dict[bytes, bytes], limit: int) -> bytes:
    if declared_too_large(headers, limit):
        raise too_large(limit)
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
                raise too_large(limit)
            chunks.append(chunk)
        if not message.get("more_body"):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class AsgiReply(Reply):
    """A `Reply` over ASGI `send`; a watcher task on `receive` notices disconnects."""

    __slots__ = ("_receive", "_send", "_task", "_watcher")

    def __init__(self, send: Send, receive: Receive) -> None:
        super().__init__()
        self._send = send
        self._receive = receive
        self._task: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None

    def watch(self) -> None:
        self._task = asyncio.current_task()
        self._watcher = asyncio.create_task(self._watch())

    def unwatch(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                if not self.done and self._task is not None:
                    self.gone = True
                    self._task.cancel()
                return

    async def whole(self, status: int, headers: Headers, body: bytes) -> None:
        headers = [*headers, (b"content-length", b"%d" % len(body))]
        await self._send({"type": "http.response.start", "status": status, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})

    async def start(self, headers: Headers, body: bytes) -> None:
        await self._send({"type": "http.response.start", "status": 200, "headers": headers})
        await self.chunk(body)

    async def chunk(self, body: bytes) -> None:
        await self._send({"type": "http.response.body", "body": body, "more_body": True})

    async def end(self, body: bytes) -> None:
        await self._send({"type": "http.response.body", "body": body, "more_body": False})
