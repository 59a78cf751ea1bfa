"""A lean HTTP/1.1 client for the upstream hot path: keep-alive pools over asyncio.Protocol.

Why not aiohttp: the benchmark (bench/RESULTS.md) measured aiohttp's client at ~205 µs of
CPU per proxied request (28% of the proxy's total) and ~25% of the per-chunk read path
(`StreamReader`, per-request `TimeoutHandle`, yarl/multidict work). inferbridge needs much
less: one request at a time per connection, JSON bodies, streamed answers. This module does
just that, with `httptools` (llhttp) parsing the responses:

- `Pool`: one per origin (scheme, host, port). Idle connections are reused newest first
  (LIFO); a new one is opened whenever none is idle (no concurrency limit); idle ones are
  closed after `KEEPALIVE` seconds and at `Client.close()`.
- `Client.send()` writes the request in one `transport.write`: a request head built once per
  (origin, method, path, query) and cached, the per-request headers, `Content-Length`, the
  body. A pooled connection that turns out to be closed before any response byte arrives
  (the upstream's keep-alive timer won the race) is retried once on a fresh connection,
  whatever the method: without a single answer byte, the upstream almost surely closed the
  idle connection before reading the request (aiohttp retried only idempotent methods).
- `Response`: status, headers (lower-cased names), and a body the protocol pushes into a
  list: `read_any()` returns everything buffered since the last read as one `bytes`, so a
  reader that falls behind pays once per read, not once per network chunk. Above
  `HIGH_WATER` buffered bytes the socket stops being read until the reader catches up.
- Push mode (`Response.relay(feed)`): from then on each body piece goes straight to
  `feed(data)` from the connection's `data_received`, with no buffering and no task
  wake-up per read; `hold()` / `unhold()` stop and restart reading the socket (the
  consumer's flow control) and the returned future ends with the body (or its failure).
- Timeouts: the connect timeout wraps `create_connection`; the total timeout is a deadline
  per response, watched by one timer per connection that re-arms itself for the deadline
  of the answer in progress when it fires (`Connection._deadline_due`). A timed-out answer
  fails with `TimeoutError` and closes its connection. Arming and cancelling a timer around
  every request cost ~2.4 µs (a libuv timer each time); a pooled connection now arms one
  about once per `timeout`.
- A connection goes back to the pool only after a complete body with keep-alive allowed;
  a response released early (client gone, `async with` left) closes its connection, so the
  upstream sees the disconnect and stops generating.

Failures: `ConnectError` (refused, DNS, TLS: nothing was sent), `ConnectionClosed` (closed
or unparsable before the answer was complete), `TimeoutError`. No HEAD, no 1xx handling
beyond skipping informational answers, no compression (`Accept-Encoding: identity`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import httptools

from inferbridge.write_batch import batch_for

HIGH_WATER = 256 * 1024  # buffered body bytes above which the socket is paused
KEEPALIVE = 60.0  # seconds an idle connection stays pooled
DEFAULT_HEADERS = {"User-Agent": "inferbridge", "Accept": "*/*", "Accept-Encoding": "identity"}
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_SAFE_PATH = "/%:@!$&'()*+,;=-._~?"
_ssl_context: ssl.SSLContext | None = None


class HttpClientError(Exception):
    """Base of this client's own failures."""


class ConnectError(HttpClientError):
    """The connection could not be opened (refused, DNS, TLS); nothing was sent."""

    def __init__(self, os_error: OSError) -> None:
        super().__init__(str(os_error))
        self.os_error = os_error


class ConnectionClosed(HttpClientError):
    """The connection closed, or the answer could not be parsed, before its end."""


class Headers(dict[str, str]):
    """Response headers by lower-cased name; `get`, `[]` and `in` ignore case."""

    __slots__ = ()

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return dict.get(self, key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return dict.__getitem__(self, key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and dict.__contains__(self, key.lower())


class Response:
    """One answer: `status`, `headers`, and the body through `read_any()` / `read()`."""

    __slots__ = (
        "_body", "_chunks", "_conn", "_deadline", "_done", "_ended", "_exc", "_feed", "_got_bytes",
        "_head", "_held", "_loop", "_paused", "_size", "_until_close", "_waiter", "headers",
        "status",
    )  # fmt: skip

    def __init__(self, conn: Connection) -> None:
        self.status = 0
        self.headers = Headers()
        self._conn: Connection | None = conn
        self._loop = conn.loop
        self._chunks: list[bytes] = []
        self._size = 0
        self._body: bytes | None = None
        self._head = self._done = self._paused = self._got_bytes = self._until_close = False
        self._held = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._deadline: float | None = None  # loop time the total timeout ends at
        self._feed: Callable[[bytes], None] | None = None
        self._ended: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read_any(self) -> bytes:
        """Everything received since the last read, as one `bytes`; b"" at the end."""
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._done:
                return b""
            self._waiter = waiter = self._loop.create_future()
            await waiter  # a finished or cancelled waiter is simply replaced next time
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._size = 0
        if self._paused:
            self._paused = False
            self._resume()
        return data

    async def read(self) -> bytes:
        """The whole body (kept, so reading twice gives it twice)."""
        if self._body is None:
            parts = []
            while data := await self.read_any():
                parts.append(data)
            self._body = b"".join(parts)
        return self._body

    # -- push mode ------------------------------------------------------------------------
    def relay(self, feed: Callable[[bytes], None]) -> asyncio.Future[None]:
        """Hand the body to `feed` as it arrives, from the connection's callbacks: what is
        buffered now at once, then everything one socket read brings in one call. The
        future ends with the body, fails with the answer's failure (or `feed`'s
        exception), or ends at `stop_relay()`."""
        self._ended = ended = self._loop.create_future()
        self._feed = feed
        if self._paused:
            self._paused = False
            self._resume()
        self._flush()  # may end the relay already (the feed saw the protocol's end)
        if not ended.done():
            if self._exc is not None:
                ended.set_exception(self._exc)
            elif self._done:
                ended.set_result(None)
        return ended

    def stop_relay(self) -> None:
        """Back to buffering (what arrives later waits for `read_any`); ends the relay."""
        self._feed = None
        ended = self._ended
        if ended is not None and not ended.done():
            ended.set_result(None)

    def hold(self) -> None:
        """Stop reading the socket until `unhold()` (the consumer cannot take more)."""
        if not self._held:
            self._held = True
            if not self._paused and self._conn is not None:
                self._conn.transport.pause_reading()

    def unhold(self) -> None:
        if self._held:
            self._held = False
            self._resume()

    def _resume(self) -> None:
        if not self._held and not self._paused and self._conn is not None:
            self._conn.transport.resume_reading()

    def _flush(self) -> None:
        """Relaying: hand what was buffered to the feed, as one piece."""
        chunks, feed = self._chunks, self._feed
        if not chunks or feed is None:
            return
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._size = 0
        try:
            feed(data)
        except Exception as exc:  # the consumer's failure ends the relay (and the answer,
            self._feed = None  # when the relay's owner releases it unfinished)
            self._fail(exc)

    # -- called by the connection ---------------------------------------------------------
    def _push(self, data: bytes) -> None:
        self._chunks.append(data)
        if self._feed is not None:
            return  # delivered once the socket read is parsed (`_flush`)
        self._size += len(data)
        if self._size > HIGH_WATER and not self._paused and self._conn is not None:
            self._paused = True
            self._conn.transport.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self._flush()
        self._done = True
        self._over(None)

    def _fail(self, exc: BaseException) -> None:
        if not self._done and self._exc is None:
            self._exc = exc
            self._over(exc)

    def _over(self, exc: BaseException | None) -> None:
        """The answer is complete (or failed with `exc`): wake its reader, end its relay."""
        self._deadline = None
        self._wake()
        ended = self._ended
        if ended is not None and not ended.done():
            if exc is None:
                ended.set_result(None)
            else:
                ended.set_exception(exc)

    def _on_timeout(self) -> None:
        self._fail(TimeoutError("the upstream did not answer in time"))
        self.release()

    def release(self) -> None:
        """Done with the answer: an unfinished one closes its connection."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.resp = None
            conn.close()
            if not self._done:
                self._fail(ConnectionClosed("released before the end of the answer"))


class Connection(asyncio.Protocol):
    """One upstream socket: writes requests, parses answers into the current `Response`."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made
        self.parser = httptools.HttpResponseParser(self)
        self.resp: Response | None = None
        self.closed = False
        self.idle_since = 0.0
        self.timer: asyncio.TimerHandle | None = None  # see `_deadline_due`
        self.timer_at = 0.0

    def send(self, data: bytes, deadline: float | None) -> Response:
        resp = self.resp = Response(self)
        if deadline is not None:
            resp._deadline = deadline
            if self.timer is None or deadline < self.timer_at:
                self._arm(deadline)
        try:
            self.pool.batch.write(self.transport, data)
        except (OSError, RuntimeError) as exc:  # closed under us: like a close before answering
            resp._fail(ConnectionClosed(f"write failed: {exc}"))
        return resp

    def _arm(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = when
        self.timer = self.loop.call_at(when, self._deadline_due)

    def _deadline_due(self) -> None:
        """The connection's timer: time out the answer in progress if its deadline has
        come, else wait for that deadline (an idle connection needs no timer)."""
        self.timer = None
        resp = self.resp
        deadline = resp._deadline if resp is not None else None
        if deadline is None:
            return
        if deadline - self.loop.time() > 0.001:  # a later request's deadline
            self._arm(deadline)
        else:
            resp._on_timeout()  # type: ignore[union-attr]

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close(self) -> None:
        self._disarm()
        if not self.closed:
            self.closed = True
            if self.pool.batch.pending:  # a request written this turn goes first
                self.pool.batch.flush()
            self.transport.close()

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None:  # bytes nobody asked for: the connection is unusable
            self.close()
            return
        resp._got_bytes = True
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self.resp is not None:
                self.resp._fail(ConnectionClosed(f"invalid HTTP answer: {exc}"))
            self.close()
        if resp._feed is not None:
            resp._flush()  # one delivery per socket read, however many HTTP chunks it held

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        self.closed = True
        self.pool.conns.discard(self)
        resp, self.resp = self.resp, None
        if resp is not None:
            if resp._until_close and resp._head and exc is None:
                resp._finish()
            else:
                resp._fail(ConnectionClosed(str(exc) if exc else "closed by the upstream"))

    # -- httptools callbacks ------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self.resp.headers  # type: ignore[union-attr]
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        prev = dict.get(headers, key)  # names are lower-cased already: skip Headers.get
        headers[key] = text if prev is None else f"{prev}, {text}"

    def on_headers_complete(self) -> None:
        resp = self.resp
        assert resp is not None
        resp.status = status = self.parser.get_status_code()
        if status < 200:  # informational: the real answer follows
            return
        h = resp.headers
        resp._until_close = (
            dict.get(h, "content-length") is None
            and "chunked" not in dict.get(h, "transfer-encoding", "")
            and status not in (204, 304)
        )
        resp._head = True
        resp._wake()

    def on_body(self, body: bytes) -> None:
        self.resp._push(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        resp = self.resp
        assert resp is not None
        if not resp._head:  # end of an informational answer
            resp.headers.clear()
            return
        self.resp = resp._conn = None
        resp._finish()
        if resp._paused or resp._held:
            resp._paused = resp._held = False
            self.transport.resume_reading()
        if self.parser.should_keep_alive() and not self.closed:
            self.pool.put(self)
        else:
            self.close()


class Pool:
    """Keep-alive connections to one origin."""

    def __init__(self, loop: asyncio.AbstractEventLoop, scheme: str, netloc: str) -> None:
        self.loop = loop
        parts = urlsplit(f"{scheme}://{netloc}")
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if scheme == "https" else 80)
        self.tls = scheme == "https"
        self.host_line = f"Host: {netloc.rpartition('@')[2]}\r\n".encode()
        self.batch = batch_for(loop)
        self.idle: list[Connection] = []  # oldest first; reuse from the end
        self.conns: set[Connection] = set()
        self.heads: dict[tuple[str, str, str | None], bytes] = {}  # cached request heads
        self._sweeper: asyncio.TimerHandle | None = None

    def reuse(self) -> Connection | None:
        """The most recently used idle connection still open, if any."""
        idle, now = self.idle, self.loop.time()
        while idle:
            conn = idle.pop()
            if conn.closed or conn.transport.is_closing() or now - conn.idle_since >= KEEPALIVE:
                conn.close()
                continue
            return conn
        return None

    async def connect(self, timeout: float | None) -> Connection:
        ssl_ctx = None
        if self.tls:
            global _ssl_context
            ssl_ctx = _ssl_context = _ssl_context or ssl.create_default_context()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await self.loop.create_connection(
                    lambda: Connection(self),
                    self.host,
                    self.port,
                    ssl=ssl_ctx,
                    server_hostname=self.host if ssl_ctx else None,
                )
        except TimeoutError:
            raise
        except OSError as exc:
            raise ConnectError(exc) from exc
        self.conns.add(conn)
        return conn

    def put(self, conn: Connection) -> None:
        conn.idle_since = self.loop.time()
        self.idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(KEEPALIVE, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for KEEPALIVE seconds; come back for the rest."""
        self._sweeper = None
        expiry = self.loop.time() - KEEPALIVE
        while self.idle and (self.idle[0].closed or self.idle[0].idle_since <= expiry):
            self.idle.pop(0).close()
        if self.idle:
            delay = self.idle[0].idle_since - expiry
            self._sweeper = self.loop.call_later(delay, self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.idle.clear()
        for conn in list(self.conns):
            conn.close()
            if conn.resp is not None:
                conn.resp._fail(ConnectionClosed("the client was closed"))


class Client:
    """Pools per origin, sharing the default headers; requests by path or absolute URL."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        self.loop = asyncio.get_running_loop()
        base = urlsplit(base_url)
        self.base = (base.scheme, base.netloc)
        self.prefix = base.path.rstrip("/")
        merged = {k.lower(): (k, v) for k, v in (*DEFAULT_HEADERS.items(), *headers.items())}
        self.defaults = dict(merged.values())  # the configured ones replace ours
        self.pools: dict[tuple[str, str], Pool] = {}

    def _pool(self, origin: tuple[str, str]) -> Pool:
        pool = self.pools.get(origin)
        if pool is None:
            if origin[0] not in ("http", "https"):
                raise ValueError(f"unsupported URL scheme {origin[0]!r}")
            pool = self.pools[origin] = Pool(self.loop, *origin)
        return pool

    async def send(
        self,
        method: str,
        url: str,
        body: bytes | None,
        params: dict[str, str] | None,
        headers: dict[str, str] | None,
        total: float | None,
        connect: float | None,
        content_type: str | None = None,
    ) -> Response:
        """Send a request; return once the answer's head has arrived."""
        if url.startswith(("http://", "https://")):
            parts = urlsplit(url)
            pool = self._pool((parts.scheme, parts.netloc))
            path = parts.path + (f"?{parts.query}" if parts.query else "")
        else:
            pool, path = self._pool(self.base), self.prefix + url
        head = self._head(pool, method, path or "/", params, headers, body, content_type)
        data = head + body if body else head
        deadline = None if total is None else self.loop.time() + total
        for attempt in (1, 2):
            conn = pool.reuse() if attempt == 1 else None
            reused = conn is not None
            if conn is None:
                if deadline is not None:
                    left = deadline - self.loop.time()
                    connect = left if connect is None else min(connect, left)
                conn = await pool.connect(connect)
            resp = conn.send(data, deadline)
            try:
                while not resp._head:
                    if resp._exc is not None:
                        raise resp._exc
                    resp._waiter = waiter = self.loop.create_future()
                    await waiter
            except ConnectionClosed:
                resp.release()
                if reused and not resp._got_bytes:
                    continue  # a stale pooled connection: once more on a fresh one
                raise
            except BaseException:
                resp.release()
                raise
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    def _head(
        self,
        pool: Pool,
        method: str,
        path: str,
        params: dict[str, str] | None,
        headers: dict[str, str] | None,
        body: bytes | None,
        content_type: str | None,
    ) -> bytes:
        """Request line and headers, ending with the blank line. Per-request headers replace
        default ones of the same name; without them the head is cached per pool."""
        if params:
            path += ("&" if "?" in path else "?") + urlencode(params)
        if headers:
            names = {k.lower() for k in headers}
            if content_type and "content-type" not in names:
                headers, names = {"Content-Type": content_type, **headers}, names | {"content-type"}
            kept = {k: v for k, v in self.defaults.items() if k.lower() not in names}
            head = _line(method, path) + pool.host_line + _encode({**kept, **headers})
            return head + _length(method, body) + b"\r\n"
        key = (method, path, content_type)
        static = pool.heads.get(key)
        if static is None:
            if len(pool.heads) >= 256:
                pool.heads.clear()
            fields = self.defaults
            if content_type:
                fields = {k: v for k, v in fields.items() if k.lower() != "content-type"}
                fields["Content-Type"] = content_type
            static = pool.heads[key] = _line(method, path) + pool.host_line + _encode(fields)
        return static + _length(method, body) + b"\r\n"

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()


def _line(method: str, path: str) -> bytes:
    if not path.isascii() or " " in path:
        path = quote(path, safe=_SAFE_PATH)
    return f"{method} {path} HTTP/1.1\r\n".encode()


def _encode(headers: dict[str, str]) -> bytes:
    text = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    if text.count("\n") != len(headers) or text.count("\r") != len(headers):
        raise ValueError("newline or carriage return in an HTTP header")
    return text.encode()


def _length(method: str, body: bytes | None) -> bytes:
    if body is None and method not in _BODY_METHODS:
        return b""
    return b"Content-Length: %d\r\n" % len(body or b"")
