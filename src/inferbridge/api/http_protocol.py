"""The HTTP protocol `inferbridge serve` runs: uvicorn's httptools protocol, with the two
hot routes served straight from the connection instead of through an ASGI cycle.

For `POST /v1/chat/completions` and `POST /v1/completions` (with or without `/v1`) the
body is collected as the parser delivers it, and the connection's worker task runs
`CompletionsEndpoint.serve` with a `HotCycle` as its `Reply`, which writes the status line,
headers and body to the transport itself: a whole JSON response in one write, each stream
batch as one chunk. Measured in bench/, this saves the per-request ASGI plumbing (scope,
receive/send messages, header re-validation, two writes per response) and the disconnect
watcher task: `connection_lost` cancels the request directly.

Per request, three more costs of uvicorn's protocol are avoided (measured together in
bench/RESULTS.md, seventh pass):
- one worker task per connection runs its hot requests one after another, woken by a
  future, instead of a new task per request (Python 3.11 registers every task in a
  Python-level `WeakSet`: creating one costs ~4 µs more than waking one);
- the keep-alive timeout is one timer per connection that re-arms itself from the time the
  connection last went idle, instead of a timer armed and cancelled around every response;
- the ASGI scope is only built for requests that go to the ASGI app, and the connection's
  addresses, which only the scope needs, are looked up then (per connection, uvicorn's
  lookup costs two socket objects and five system calls on uvloop: 7% of the CPU of a
  request made on a new connection).

Everything else (other paths and methods, the lifespan, keep-alive, pipelining, flow
control, graceful shutdown, limits, bad requests) stays uvicorn's: requests that are not
hot go through `HttpToolsProtocol` unchanged, and a hot request behaves the same way on
the wire as under plain ASGI (tests run both).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.logging import TRACE_LOG_LEVEL
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.utils import get_local_addr, get_remote_addr, is_ssl

from inferbridge.api.handlers import (
    CompletionsEndpoint,
    Headers,
    Reply,
    declared_too_large,
    error_reply,
    internal_error,
    request_id_of,
    too_large,
)
from inferbridge.write_batch import BatchedTransport, batch_for

log = logging.getLogger("inferbridge")

_LAST_CHUNK = b"0\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


_defaults: tuple[object, bytes] = (None, b"")


def _encoded(default_headers: Headers) -> bytes:
    """uvicorn's default headers (`date`, `server`...) as header lines. uvicorn replaces the
    list every second (the date); until then each response reuses the same bytes."""
    global _defaults
    cached = _defaults  # (one read: test servers run in threads, each with its own list)
    if cached[0] is not default_headers:
        lines = b"".join(b"%b: %b\r\n" % (name, value) for name, value in default_headers)
        cached = _defaults = (default_headers, lines)
    return cached[1]


_hot: tuple[object, dict[bytes, CompletionsEndpoint]] = (None, {})


def hot_routes(app: Any) -> dict[bytes, CompletionsEndpoint]:
    """The hot routes of an inferbridge `FrontDoor`, looked for under uvicorn's wrappers;
    empty for any other app (then this protocol is plain `HttpToolsProtocol`). Each
    connection asks: the last app's answer is kept."""
    global _hot
    cached = _hot  # (one read, as in `_encoded`)
    if cached[0] is not app:
        cached = _hot = (app, _find_hot_routes(app))
    return cached[1]


def _find_hot_routes(app: Any) -> dict[bytes, CompletionsEndpoint]:
    for _ in range(8):
        routes = getattr(app, "hot", None)
        if isinstance(routes, dict):
            return {path.encode(): endpoint for path, endpoint in routes.items()}
        app = getattr(app, "app", None)
        if app is None:
            break
    return {}


class InferbridgeHttpProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` plus the hot routes (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hot = hot_routes(self.app)
        self.worker: asyncio.Task[None] | None = None
        self.waiting: asyncio.Future[HotCycle | None] | None = None  # the idle worker's
        self.queued: HotCycle | None = None  # for the worker, when it was busy
        self.running: HotCycle | None = None  # the worker's
        self.idle_since: float | None = None  # loop time the last response completed at

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # uvicorn's, with every write and close of this connection going through the
        # process's write batch, and without looking up the connection's addresses: only an
        # ASGI scope needs them (`_asgi_scope`), and on uvloop they cost two socket objects
        # and five system calls per connection
        self.batch = batch_for(self.loop)
        batched = BatchedTransport(transport, self.batch)
        self.connections.add(self)
        self.transport = batched  # type: ignore[assignment]
        self.flow = FlowControl(batched)  # type: ignore[arg-type]
        self.scheme = "https" if is_ssl(batched) else "http"  # type: ignore[arg-type]
        if self.logger.level <= TRACE_LOG_LEVEL:
            self._look_up_addresses()
            client = self.client
            prefix = f"{client[0]}:{client[1]} - " if client else ""
            self.logger.log(TRACE_LOG_LEVEL, "%sHTTP connection made", prefix)

    def _look_up_addresses(self) -> None:
        if self.server is None and self.client is None:
            self.server = get_local_addr(self.transport)
            self.client = get_remote_addr(self.transport)

    def on_message_begin(self) -> None:
        # uvicorn builds the request's ASGI scope here; only a request for the ASGI app
        # needs one (`_asgi_scope`)
        self.url = b""
        self.expect_100_continue = False
        self.headers = []

    def _asgi_scope(self) -> None:
        """uvicorn's scope for the request whose URL and headers were just parsed."""
        url, headers, expect = self.url, self.headers, self.expect_100_continue
        self._look_up_addresses()
        super().on_message_begin()
        self.url, self.expect_100_continue = url, expect
        self.headers = self.scope["headers"] = headers

    def on_headers_complete(self) -> None:
        parser = self.parser
        hot = self.hot
        if hot and parser.get_method() == b"POST" and not parser.should_upgrade():
            endpoint = hot.get(self.url) or hot.get(httptools.parse_url(self.url).path)
            if endpoint is not None and not self._over_concurrency_limit():
                self._begin_hot(endpoint)
                return
        self._asgi_scope()
        super().on_headers_complete()

    def _over_concurrency_limit(self) -> bool:
        limit = self.limit_concurrency
        return limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit)

    def _begin_hot(self, endpoint: CompletionsEndpoint) -> None:
        previous = self.cycle
        http10 = self.parser.get_http_version() == "1.0"
        keep_alive = not http10 and self.parser.should_keep_alive()
        cycle = HotCycle(self, endpoint, dict(self.headers), keep_alive, chunked=not http10)
        if previous is not None and not previous.response_complete:
            cycle.previous = previous  # pipelined: answer only after `previous`
        self.cycle = cycle  # type: ignore[assignment]
        if declared_too_large(cycle.headers, endpoint.limit):
            cycle.refuse_too_large()
        elif self.expect_100_continue:
            if cycle.previous is None:
                self.transport.write(_CONTINUE)
            else:  # a 100 now would land inside the previous response: on its turn
                cycle.expect_continue = True

    def on_response_complete(self) -> None:
        # uvicorn's, with the keep-alive timer re-armed by itself (`_keep_alive_due`)
        self.server_state.total_requests += 1
        if not self.transport.is_closing():
            self.flow.resume_reading()
            if self.pipeline:
                cycle, app = self.pipeline.pop()
                self._start_asgi_task(cycle, app)
            else:
                self.idle_since = self.loop.time()
                if self.timeout_keep_alive_task is None:
                    self.timeout_keep_alive_task = self.loop.call_later(
                        self.timeout_keep_alive, self._keep_alive_due
                    )
        cycle = self.cycle
        previous = cycle.previous if isinstance(cycle, HotCycle) else None
        if previous is not None and previous.response_complete:
            cycle.previous = None
            cycle.take_turn()

    def _unset_keepalive_if_required(self) -> None:
        # uvicorn calls this on every read: the connection is busy, its timer stays
        self.idle_since = None

    def _keep_alive_due(self) -> None:
        """The keep-alive timer: close the connection if it has been idle for
        `timeout_keep_alive` seconds, else wait for the rest of that time (if it is busy
        now, the end of its response arms the timer again)."""
        self.timeout_keep_alive_task = None
        since = self.idle_since
        if since is None or self.transport.is_closing():
            return
        left = since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self.timeout_keep_alive_task = self.loop.call_later(left, self._keep_alive_due)
        else:
            self.timeout_keep_alive_handler()

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if isinstance(cycle, HotCycle):
            cycle.add_body(body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if not isinstance(cycle, HotCycle):
            super().on_message_complete()
        elif not cycle.response_complete:
            previous, cycle.previous = cycle.previous, None
            if previous is not None and not previous.response_complete:
                # Pipelined behind a response still being written: its completion starts it.
                self.flow.pause_reading()
                self.pipeline.appendleft((cycle, None))  # type: ignore[arg-type]
            else:
                self._start_hot(cycle)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if isinstance(cycle, HotCycle):
            self._start_hot(cycle)
        else:
            super()._start_asgi_task(cycle, app)

    def _start_hot(self, cycle: HotCycle) -> None:
        """Hand `cycle` to the connection's worker (started by the first hot request)."""
        waiting = self.waiting
        if waiting is not None and not waiting.done():  # (done: cancelled, at shutdown)
            self.waiting = None
            waiting.set_result(cycle)
            return
        self.queued = cycle  # the worker takes it once its current request is over
        if self.worker is None:
            self.worker = self.loop.create_task(self._work())

    async def _work(self) -> None:
        """The worker: the connection's hot requests, one after another. A request is in
        `tasks` (uvicorn's count for graceful shutdown and `limit_concurrency`) while it
        runs; a response completes before the next request on the connection starts, so
        the worker never makes one wait for more than the previous one's bookkeeping."""
        task = self.worker
        assert task is not None
        tasks = self.tasks
        try:
            while True:
                cycle = self.queued
                if cycle is not None:
                    self.queued = None
                elif self.parser is None:  # uvicorn's sign that the connection was lost
                    return
                else:
                    waiting = self.waiting = self.loop.create_future()
                    cycle = await waiting
                    if cycle is None:
                        return
                if cycle.gone:  # disconnected before its turn
                    continue
                cycle.task = task
                self.running = cycle
                tasks.add(task)
                try:
                    await cycle.run()
                finally:
                    tasks.discard(task)
                    cycle.task = self.running = None
        finally:
            self.worker = self.waiting = None

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        if isinstance(cycle, HotCycle):
            self.cycle = None  # type: ignore[assignment]
            cycle.connection_lost()
        running = self.running
        if running is not None and running is not cycle:  # a pipelined request is behind it
            running.connection_lost()
        super().connection_lost(exc)
        waiting = self.waiting
        if waiting is not None and not waiting.done():  # the idle worker ends
            self.waiting = None
            waiting.set_result(None)
        timer = self.timeout_keep_alive_task
        if timer is not None:
            self.timeout_keep_alive_task = None
            timer.cancel()


class HotCycle(Reply):
    """One hot request on a connection: its body as it arrives, then its response."""

    can_push = True

    __slots__ = (
        "body",
        "chunked",
        "endpoint",
        "expect_continue",
        "flow",
        "headers",
        "keep_alive",
        "previous",
        "protocol",
        "response_complete",
        "resumer",
        "size",
        "started",
        "task",
        "too_large",
        "transport",
    )

    def __init__(
        self,
        protocol: InferbridgeHttpProtocol,
        endpoint: CompletionsEndpoint,
        headers: dict[bytes, bytes],
        keep_alive: bool,
        *,
        chunked: bool = True,
    ) -> None:
        super().__init__()
        self.protocol = protocol
        self.transport = protocol.transport
        self.flow = protocol.flow
        self.endpoint = endpoint
        self.headers = headers
        self.keep_alive = keep_alive
        self.chunked = chunked  # HTTP/1.0 has no chunked framing: the close ends a stream
        self.body: list[bytes] = []
        self.size = 0
        self.previous: Any = None  # the cycle whose response must go out first
        self.too_large = False
        self.expect_continue = False
        self.started = False
        self.response_complete = False
        self.task: asyncio.Task[None] | None = None
        self.resumer: asyncio.Task[None] | None = None

    # -- request --------------------------------------------------------------------------
    def add_body(self, data: bytes) -> None:
        if self.response_complete or self.too_large:
            return
        self.size += len(data)
        if self.size > self.endpoint.limit:
            self.refuse_too_large()
        else:
            self.body.append(data)

    def refuse_too_large(self) -> None:
        """413 and close, at once unless a previous response is still being written: the
        rest of the body is not worth reading."""
        self.too_large = True
        self.body = []
        previous = self.previous
        if previous is None or previous.response_complete:
            self._refuse()

    def take_turn(self) -> None:
        """The response before this pipelined request is complete: do what waited for it."""
        if self.too_large:
            self._refuse()
        elif self.expect_continue:
            self.transport.write(_CONTINUE)

    def _refuse(self) -> None:
        self.endpoint.observe.rejected(413)
        self.keep_alive = False
        status, headers, body = error_reply(
            too_large(self.endpoint.limit), request_id_of(self.headers)
        )
        self._write_whole(status, headers, body)

    async def run(self) -> None:
        if self.too_large:
            self._refuse()
            return
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body = []
        batch = self.protocol.batch
        batch.busy += 1
        try:
            await self.endpoint.serve(self.headers, body, self)
        except asyncio.CancelledError:
            if not self.gone:
                raise
        except Exception:
            request_id = request_id_of(self.headers)
            log.exception("request %s failed", request_id)
            if not self.started and not self.gone:
                self.keep_alive = False
                self._write_whole(*error_reply(internal_error(request_id), request_id))
        finally:
            batch.busy -= 1
        if not self.response_complete and not self.gone:
            self.transport.close()  # the response cannot be completed

    def connection_lost(self) -> None:
        if not self.response_complete:
            self.gone = True
            if self.task is not None and not self.done:
                self.task.cancel()

    # -- Reply ----------------------------------------------------------------------------
    async def whole(self, status: int, headers: Headers, body: bytes) -> None:
        if not self.gone:
            self._write_whole(status, headers, body)

    async def start(self, headers: Headers, body: bytes) -> None:
        if self.gone:
            return
        self.started = True
        if not self.chunked:
            self.keep_alive = False
            self.transport.write(self._head(200, headers, b"") + body)
        else:
            head = self._head(200, headers, b"transfer-encoding: chunked\r\n")
            self.transport.write(head + b"%x\r\n%b\r\n" % (len(body), body) if body else head)
        if self.flow.write_paused:
            await self.flow.drain()

    async def chunk(self, body: bytes) -> None:
        if self.gone:
            return
        self.transport.write(b"%x\r\n%b\r\n" % (len(body), body) if self.chunked else body)
        if self.flow.write_paused:
            await self.flow.drain()

    def write_now(self, body: bytes) -> bool:
        if self.gone:
            return True
        self.transport.write(b"%x\r\n%b\r\n" % (len(body), body) if self.chunked else body)
        return not self.flow.write_paused

    def when_writable(self, resume: Callable[[], None]) -> None:
        self.resumer = asyncio.ensure_future(self._resume_when_drained(resume))

    async def _resume_when_drained(self, resume: Callable[[], None]) -> None:
        if self.flow.write_paused and not self.gone:
            await self.flow.drain()
        resume()

    async def end(self, body: bytes) -> None:
        if self.gone:
            return
        if not self.chunked:
            self.transport.write(body)
        elif body:
            self.transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body))
        else:
            self.transport.write(_LAST_CHUNK)
        self._complete()

    # -- writing --------------------------------------------------------------------------
    def _head(self, status: int, headers: Headers, framing: bytes) -> bytes:
        parts = [STATUS_LINE[status], _encoded(self.protocol.server_state.default_headers)]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(framing)
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _write_whole(self, status: int, headers: Headers, body: bytes) -> None:
        self.started = True
        head = self._head(status, headers, b"content-length: %d\r\n" % len(body))
        self.transport.write(head + body)
        self._complete()

    def _complete(self) -> None:
        self.response_complete = True
        if not self.keep_alive:
            self.transport.close()
        self.protocol.on_response_complete()
