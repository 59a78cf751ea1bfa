"""HttpUpstream (aiohttp underneath) against scripted raw-socket upstreams.

Scripted raw servers (asyncio.start_server) give byte-level control: close-delimited bodies,
connections closed between requests, garbage, stalls, oversized heads and bodies, proxies,
redirects. Each protection of the client has a test against an upstream that misbehaves on
purpose. Every test runs on the default asyncio loop and on uvloop (the proxy's loop), each
in its own `asyncio.Runner`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import inspect
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import uvloop

from inferbridge.backends.http import HttpUpstream, ItemParser
from inferbridge.config import TLSConfig
from inferbridge.decoders import ServerSentEvent, SSEDecoder
from inferbridge.errors import (
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from inferbridge.events import Event, Finish, TextDelta

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def both_loops(case: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test case once on each event loop (its other fixtures pass through)."""

    def test(loop: str, **kw: Any) -> None:
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            runner.run(case(**kw))  # type: ignore[arg-type]

    params = inspect.signature(case).parameters.values()
    loop_param = inspect.Parameter("loop", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    test.__signature__ = inspect.Signature([loop_param, *params])  # type: ignore[attr-defined]
    test.__name__ = test.__qualname__ = case.__name__
    return pytest.mark.parametrize("loop", list(LOOPS))(test)


Handler = Callable[["Conn"], Awaitable[None]]


class Conn:
    """One accepted connection of a `Server`, with helpers to read requests and answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(self) -> tuple[str, dict[str, str], bytes] | None:
        """(request line, headers by lower-cased name, body), or None at EOF."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        line, *fields = head.decode().split("\r\n")[:-2]
        headers = {k.lower(): v for k, v in (f.split(": ", 1) for f in fields)}
        body = await self.reader.readexactly(int(headers.get("content-length", 0)))
        return line, headers, body

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, body: bytes = b"{}", status: str = "200 OK", extra: str = "") -> None:
        await self.send(
            f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body
        )

    async def client_closed(self) -> bool:
        """True once the client closes its side (EOF or reset) within 2 s."""
        with contextlib.suppress(ConnectionError):
            return await asyncio.wait_for(self.reader.read(), 2) == b""
        return True


class Server:
    """A scripted HTTP/1.1 server on 127.0.0.1; `handler(conn)` runs per connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.ssl: ssl.SSLContext | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await self.handler(Conn(reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or the test ended
        finally:
            writer.close()

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self.tasks:
            task.cancel()
        self.server.close()


async def keep_answering(conn: Conn) -> None:
    """Answer every request with a JSON echo of what was received."""
    while await conn.request() is not None:
        await conn.answer(b'{"ok": true}')


@contextlib.asynccontextmanager
async def upstream(url: str, **kw: Any) -> AsyncIterator[HttpUpstream]:
    kw.setdefault("timeout", 5.0)
    http = HttpUpstream(url, label="backend 'x'", connect_timeout=2.0, **kw)
    await http.start()
    try:
        yield http
    finally:
        await http.close()


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests talk to 127.0.0.1 directly, whatever proxy the machine is configured with."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class SSEParser(ItemParser):
    """An OpenAI-style stream: `data: text` events, ended by `data: [DONE]`."""

    def __init__(self) -> None:
        super().__init__("backend 'x'", SSEDecoder())

    def take(self, item: ServerSentEvent, batch: list[Event]) -> bool:
        if item.data == b"[DONE]":
            batch.append(Finish("stop"))
            return True
        batch.append(TextDelta(item.data.decode()))
        return False


async def wait_for(condition: Callable[[], bool], seconds: float = 3.0) -> None:
    """Poll until `condition()` holds (or fail after `seconds`)."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 (state kept by server handlers)
            await asyncio.sleep(0.01)


# -- the basics --------------------------------------------------------------------------------
@both_loops
async def test_content_length_body_headers_and_json() -> None:
    async def handle(conn: Conn) -> None:
        req = await conn.request()
        assert req is not None
        await conn.answer(b'{"a": [1, 2]}', extra="X-Prompt-Tokens: 7\r\n")

    async with (
        Server(handle) as srv,
        upstream(srv.url) as http,
        http.post("/generate", {"q": 1}) as resp,
    ):
        assert resp.status == 200
        assert resp.headers.get("x-prompt-tokens") == "7"
        assert resp.headers.get("X-PROMPT-TOKENS") == "7"
        assert resp.headers.get("missing") is None
        assert await http.read_json(resp) == {"a": [1, 2]}
        assert await resp.read() == b'{"a": [1, 2]}'  # read twice: same body


@both_loops
async def test_request_line_headers_query_and_authorization() -> None:
    async def handle(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            srv.seen.append(req)
            await conn.answer()

    srv = Server(handle)
    async with (
        srv,
        upstream(srv.url + "/v1/", headers={"Authorization": "Bearer sk-1", "X-Org": "o"}) as http,
    ):
        async with http.post("/chat/completions", {"m": "é"}, params={"api-version": "a b"}):
            pass
        async with http.request("GET", "/models", headers={"Accept": "text/event-stream"}):
            pass
        async with http.request("GET", "/x", headers={"Cache-Control": "no-store"}):
            pass
    (line, headers, body), (line2, headers2, _), (_, headers3, _) = srv.seen
    assert line == "POST /v1/chat/completions?api-version=a+b HTTP/1.1"
    assert headers["authorization"] == "Bearer sk-1" and headers["x-org"] == "o"
    assert headers["host"] == srv.url.removeprefix("http://")
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "inferbridge"
    assert body == '{"m":"é"}'.encode() and headers["content-length"] == str(len(body))
    assert line2 == "GET /v1/models HTTP/1.1" and "content-length" not in headers2
    assert headers2["accept"] == "text/event-stream"  # replaces the default, no duplicate
    assert headers3["cache-control"] == "no-store" and headers3["accept"] == "*/*"
    assert headers3["authorization"] == "Bearer sk-1"


@both_loops
async def test_a_base_url_with_a_query_keeps_it_on_every_call() -> None:
    """`url: http://host/v1?api-version=...`: the route joins the path, the query stays."""

    async def handle(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            srv.seen.append(req)
            await conn.answer()

    srv = Server(handle)
    async with srv, upstream(srv.url + "/v1/?api-version=2024-01-01") as http:
        async with http.post("/chat/completions", {}):
            pass
        async with http.post("/chat/completions", {}, params={"x": "1"}):
            pass
        async with http.request("GET", "/models?page=2"):
            pass
    assert [line for line, _, _ in srv.seen] == [
        "POST /v1/chat/completions?api-version=2024-01-01 HTTP/1.1",
        "POST /v1/chat/completions?api-version=2024-01-01&x=1 HTTP/1.1",
        "GET /v1/models?api-version=2024-01-01&page=2 HTTP/1.1",
    ]


@both_loops
async def test_header_injection_is_refused() -> None:
    async with Server(keep_answering) as srv, upstream(srv.url) as http:
        with pytest.raises(ValueError, match="header injection"):
            async with http.request("GET", "/", headers={"X": "a\r\nEvil: 1"}):
                pass


@both_loops
async def test_chunked_stream_arrives_before_the_end() -> None:
    more = asyncio.Event()

    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.send(CHUNKED_HEAD + chunk(b"first"))
        await asyncio.wait_for(more.wait(), 3)  # only once the client saw the first chunk
        await conn.send(chunk(b"second") + b"0\r\n\r\n")

    chunks = []
    async with Server(handle) as srv, upstream(srv.url) as http, http.post("/s", {}) as resp:
        async for data in http.iter_chunks(resp):
            chunks.append(data)
            more.set()
    assert chunks == [b"first", b"second"]


@both_loops
async def test_events_yields_one_batch_per_read_before_the_end() -> None:
    more = asyncio.Event()

    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.send(CHUNKED_HEAD + chunk(b"data: He\n\ndata: l"))
        await asyncio.wait_for(more.wait(), 3)  # only once the client saw the first batch
        await conn.send(chunk(b"lo\n\ndata: [DONE]\n\n") + b"0\r\n\r\n")

    batches = []
    async with Server(handle) as srv, upstream(srv.url) as http, http.post("/s", {}) as resp:
        async for batch in http.events(resp, SSEParser()):
            batches.append([getattr(e, "text", getattr(e, "reason", None)) for e in batch])
            more.set()
    assert batches == [["He"], ["llo", "stop"]]


@both_loops
async def test_close_delimited_body_and_no_reuse() -> None:
    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello ")
        await conn.send(b"world")

    async with Server(handle) as srv, upstream(srv.url) as http:
        for _ in range(2):
            async with http.request("GET", "/") as resp:
                assert await resp.read() == b"hello world"
    assert srv.connections == 2


@both_loops
async def test_keep_alive_reuses_connections() -> None:
    async def handle(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            await asyncio.sleep(0.05 if req[0].startswith("POST /slow") else 0)
            await conn.answer(b'{"n": 1}')

    async with Server(handle) as srv, upstream(srv.url) as http:
        for _ in range(5):
            async with http.post("/fast", {}) as resp:
                await http.read_json(resp)
        assert srv.connections == 1

        async def one() -> None:
            async with http.post("/slow", {}) as resp:
                await resp.read()

        await asyncio.gather(one(), one(), one())  # no idle one left: opens two more
        assert srv.connections == 3
        await asyncio.gather(one(), one(), one())
        assert srv.connections == 3


@both_loops
async def test_unread_complete_answer_keeps_the_connection() -> None:
    async with Server(keep_answering) as srv, upstream(srv.url) as http:
        for _ in range(3):
            async with http.request("GET", "/health"):
                await asyncio.sleep(0.01)  # the whole answer arrives, nobody reads it
    assert srv.connections == 1


@both_loops
async def test_connection_closed_while_idle_is_not_reused() -> None:
    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.answer(b'{"n": 1}')  # keep-alive answer, then close anyway

    async with Server(handle) as srv, upstream(srv.url) as http:
        for _ in range(3):
            async with http.post("/generate", {}) as resp:
                assert await http.read_json(resp) == {"n": 1}
            await asyncio.sleep(0.05)
    assert srv.connections == 3


@both_loops
async def test_fresh_connection_closed_without_answer_is_an_error() -> None:
    async def handle(conn: Conn) -> None:
        await conn.request()

    async with Server(handle) as srv, upstream(srv.url) as http:
        with pytest.raises(UpstreamError, match="closed the connection mid-response"):
            async with http.post("/generate", {}):
                pass
    assert srv.connections == 1


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this", "closed the connection"),
        (CHUNKED_HEAD + chunk(b"data"), "closed the connection"),
        (b"NOT HTTP AT ALL\r\n\r\n", "sent an invalid answer"),
    ],
    ids=["short-content-length", "chunked-cut", "garbage"],
)
@both_loops
async def test_broken_answers_are_mapped(answer: bytes, message: str) -> None:
    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.send(answer)

    async with Server(handle) as srv, upstream(srv.url) as http:
        with pytest.raises(UpstreamError, match=f"backend 'x' {message}"):
            async with http.request("GET", "/") as resp:
                async for _ in http.iter_chunks(resp):
                    pass


@both_loops
async def test_connect_refused_is_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with upstream(f"http://127.0.0.1:{port}") as http:
        with pytest.raises(UpstreamError, match="backend 'x' is unreachable"):
            async with http.post("/generate", {}):
                pass


@both_loops
async def test_error_statuses_are_mapped_with_the_body_message() -> None:
    answers = iter(
        [
            (b'{"error": {"message": "bad prompt", "code": "bad"}}', "400 Bad Request", ""),
            (b'{"error": "slow down"}', "429 Too Many Requests", "Retry-After: 3\r\n"),
            (b"boom", "500 Internal Server Error", ""),
        ]
    )

    async def handle(conn: Conn) -> None:
        while await conn.request() is not None:
            await conn.answer(*next(answers))

    async with Server(handle) as srv, upstream(srv.url) as http:
        with pytest.raises(UpstreamRejected) as bad:
            async with http.post("/generate", {}):
                pass
        assert bad.value.status == 400 and "bad prompt (from backend 'x')" in bad.value.message
        with pytest.raises(UpstreamRejected) as limited:
            async with http.post("/generate", {}):
                pass
        assert limited.value.status == 429 and limited.value.headers == {"Retry-After": "3"}
        with pytest.raises(UpstreamError, match="failed with HTTP 500: boom"):
            async with http.post("/generate", {}):
                pass
    assert srv.connections == 1  # error bodies were read: the connection stayed usable


@both_loops
async def test_large_stream_is_intact_under_flow_control() -> None:
    blob = bytes(range(256)) * (5 * 1024 * 1024 // 256)

    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.send(CHUNKED_HEAD)
        for i in range(0, len(blob), 16384):
            conn.writer.write(chunk(blob[i : i + 16384]))
        await conn.send(b"0\r\n\r\n")

    digest, sizes = hashlib.sha256(), []
    async with Server(handle) as srv, upstream(srv.url) as http, http.post("/big", {}) as resp:
        async for data in http.iter_chunks(resp):
            digest.update(data)
            sizes.append(len(data))
            await asyncio.sleep(0.002)  # a slow reader: the client must stop reading
    assert sum(sizes) == len(blob) and digest.digest() == hashlib.sha256(blob).digest()
    assert max(sizes) <= 2 * 1024 * 1024, max(sizes)  # buffered, not the whole 5 MiB


@both_loops
async def test_absolute_url_to_another_origin() -> None:
    async def handle(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            other.seen.append(req)
            await conn.answer()

    other = Server(handle)
    async with (
        Server(keep_answering) as srv,
        other,
        upstream(srv.url, headers={"Authorization": "Bearer k"}) as http,
        http.request("GET", other.url + "/p/1?x=y") as resp,
    ):
        assert resp.status == 200
    ((line, headers, _),) = other.seen
    assert line == "GET /p/1?x=y HTTP/1.1" and headers["authorization"] == "Bearer k"
    assert srv.connections == 0


@both_loops
async def test_close_closes_pooled_connections_and_stops_the_client() -> None:
    closed: list[bool] = []

    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.answer()
        closed.append(await conn.client_closed())

    async with Server(handle) as srv, upstream(srv.url) as http:
        async with http.request("GET", "/") as resp:
            await resp.read()
        await http.close()  # closing the upstream closes its idle connections
        await wait_for(lambda: closed == [True])
        with pytest.raises(UpstreamError, match="client not started"):
            async with http.request("GET", "/"):
                pass


# -- 1. a connection limit per origin, with a queue and a wait limit -------------------------
@both_loops
async def test_connection_limit_queues_then_times_out() -> None:
    release = asyncio.Event()

    async def handle(conn: Conn) -> None:
        while await conn.request() is not None:
            await asyncio.wait_for(release.wait(), 3)
            await conn.answer()

    async def call() -> int:
        async with http.request("GET", "/") as resp:
            await resp.read()
            return resp.status

    srv = Server(handle)
    async with srv, upstream(srv.url, max_connections=2, pool_timeout=0.3) as http:
        held = [asyncio.create_task(call()) for _ in range(2)]
        await wait_for(lambda: srv.connections == 2)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(UpstreamUnavailable, match=r"backend 'x' has no free connection.*2"):
            await call()  # waits pool_timeout for one of the two, then gives up
        assert 0.25 < loop.time() - start < 2
        queued = asyncio.create_task(call())  # waits in the queue ...
        await asyncio.sleep(0.1)
        assert srv.connections == 2 and not queued.done()
        release.set()  # ... and gets a connection once one is free
        assert await asyncio.gather(*held, queued) == [200, 200, 200]
    assert srv.connections == 2


# -- 2. connect, read (idle) and total timeouts --------------------------------------------
@both_loops
async def test_connect_timeout() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []  # fill the accept queue: the next connect is not answered
    for _ in range(3):
        sock = socket.socket()
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect(("127.0.0.1", port))
        fillers.append(sock)
    http = HttpUpstream(f"http://127.0.0.1:{port}", label="backend 'x'", timeout=5.0,
                        connect_timeout=0.2)  # fmt: skip
    await http.start()
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(UpstreamTimeout, match="backend 'x' did not answer in time"):
            async with http.request("GET", "/"):
                pass
        assert loop.time() - start < 1.5
    finally:
        await http.close()
        for sock in (*fillers, listener):
            sock.close()


@both_loops
async def test_read_timeout_is_the_silence_between_reads() -> None:
    async def handle(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            if req[0].startswith("GET /trickle"):  # a byte every 0.1 s for 0.6 s: never idle
                await conn.send(CHUNKED_HEAD)
                for _ in range(6):
                    await asyncio.sleep(0.1)
                    await conn.send(chunk(b"."))
                await conn.send(b"0\r\n\r\n")
            else:  # the head and a first piece, then silence
                await conn.send(CHUNKED_HEAD + chunk(b"x"))
                await asyncio.sleep(5)

    async with Server(handle) as srv, upstream(srv.url, read_timeout=0.3) as http:
        async with http.request("GET", "/trickle") as resp:
            assert await resp.read() == b"......"
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(UpstreamTimeout, match=r"backend 'x' did not answer.*read_timeout"):
            async with http.request("GET", "/stall") as resp:
                await resp.read()
        with pytest.raises(UpstreamTimeout, match="read_timeout"):
            async with http.request("GET", "/stall") as resp:
                async for _ in http.iter_chunks(resp):
                    pass
        assert loop.time() - start < 1.5


@both_loops
async def test_read_timeout_does_not_poison_pooled_connections() -> None:
    """A large body that ends while the reader is behind (reading paused) goes back to the
    pool; with aiohttp's own `sock_read`, its timer would be re-armed there and the next
    request on the connection would fail at once."""
    body = b"x" * 600_000

    async def handle(conn: Conn) -> None:
        while await conn.request() is not None:
            await conn.answer(body)

    async with Server(handle) as srv, upstream(srv.url, read_timeout=0.2) as http:
        for _ in range(4):
            async with http.request("GET", "/big") as resp:
                await asyncio.sleep(0.05)  # the whole answer arrives before the first read
                size = 0
                async for data in http.iter_chunks(resp):
                    size += len(data)
                    await asyncio.sleep(0.001)
                assert size == len(body)
            await asyncio.sleep(0.3)  # longer than read_timeout, idle in the pool
    assert srv.connections == 1


@both_loops
async def test_total_timeout_before_the_head_and_mid_body() -> None:
    async def handle(conn: Conn) -> None:
        req = await conn.request()
        assert req is not None
        if req[0].startswith("GET /body"):
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await asyncio.sleep(5)

    async with Server(handle) as srv, upstream(srv.url, timeout=0.2) as http:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(UpstreamTimeout, match="did not answer in time"):
            async with http.request("GET", "/head"):
                pass
        with pytest.raises(UpstreamTimeout):
            async with http.request("GET", "/body") as resp:
                await http.read_json(resp)
        with pytest.raises(UpstreamTimeout):  # a per-request timeout, as tgi/ollama pass it
            async with http.request("GET", "/head", timeout=0.1):
                pass
        assert loop.time() - start < 2


@both_loops
async def test_timeout_does_not_fire_once_the_body_is_complete() -> None:
    async with (
        Server(keep_answering) as srv,
        upstream(srv.url, timeout=0.1) as http,
        http.request("GET", "/") as resp,
    ):
        await resp.read()
        await asyncio.sleep(0.2)  # holding a complete answer past the timeout is fine
        assert await resp.read() == b'{"ok": true}'


@both_loops
async def test_per_request_timeouts_on_one_connection() -> None:
    async def handle(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            if req[0].startswith("GET /hang"):
                await asyncio.sleep(5)
            if req[0].startswith("GET /slow"):
                await asyncio.sleep(0.6)
            await conn.answer(b'{"ok": true}')

    async with Server(handle) as srv, upstream(srv.url, timeout=1.0) as http:
        loop = asyncio.get_running_loop()
        async with http.request("GET", "/") as resp:
            await resp.read()
        start = loop.time()
        with pytest.raises(UpstreamTimeout):
            async with http.request("GET", "/hang", timeout=0.1):
                pass
        assert loop.time() - start < 0.8  # its own 0.1 s, not the entry's 1 s
        async with http.request("GET", "/") as resp:  # a new connection (that one was closed)
            await resp.read()
        await asyncio.sleep(0.5)
        async with http.request("GET", "/slow") as resp:  # its own 1 s, from its start
            assert await http.read_json(resp) == {"ok": True}
    assert srv.connections == 2


# -- 3. response head limits -----------------------------------------------------------------
@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 40_000 + b"Content-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100_000 + b"\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 " + b"O" * 100_000 + b"\r\nContent-Length: 2\r\n\r\n{}",
    ],
    ids=["40k-headers", "huge-field", "huge-status-line"],
)
@both_loops
async def test_oversized_answer_heads_are_refused_quickly(head: bytes) -> None:
    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.send(head)
        await asyncio.sleep(5)

    async with Server(handle) as srv, upstream(srv.url) as http:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(UpstreamError, match="backend 'x' sent an invalid answer"):
            async with http.post("/generate", {}) as resp:
                await resp.read()
        assert loop.time() - start < 1.0


# -- 4. the non-streamed body limit --------------------------------------------------------
@both_loops
async def test_body_limit_refuses_and_drops_large_answers() -> None:
    closed: list[str] = []

    async def handle(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            path = req[0].split()[1]
            if path == "/declared":  # a Content-Length above the limit: refused unread
                await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n")
            elif path == "/endless":  # no declared length, and no end
                await conn.send(CHUNKED_HEAD)
                with contextlib.suppress(ConnectionError):
                    for _ in range(1000):
                        await conn.send(chunk(b"x" * 500))
                        await asyncio.sleep(0.001)
            elif path == "/bomb":  # small on the wire, too large once decompressed
                bomb = gzip.compress(b"0" * 1_000_000)
                await conn.answer(bomb, extra="Content-Encoding: gzip\r\n")
                continue
            else:
                await conn.answer(b"y" * 1000)  # exactly the limit
                continue
            if await conn.client_closed():
                closed.append(path)
            return

    async with Server(handle) as srv, upstream(srv.url, max_response_bytes=1000) as http:
        for path in ("/declared", "/endless", "/bomb"):
            with pytest.raises(UpstreamError, match=r"backend 'x' sent an answer larger than"):
                async with http.request("GET", path) as resp:
                    await http.read_json(resp)
        async with http.request("GET", "/fits") as resp:
            assert await resp.read() == b"y" * 1000
        await wait_for(lambda: len(closed) == 2)
    assert sorted(closed) == ["/declared", "/endless"]  # the aborted bodies were cut off


# -- 5. proxies: the entry's, or the environment's -------------------------------------------
def proxy_server() -> Server:
    """A stand-in forward proxy: records the absolute-form requests, answers them itself."""

    async def handle(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            srv.seen.append(req)
            await conn.answer(b'{"via": "proxy"}')

    srv = Server(handle)
    return srv


@both_loops
async def test_proxy_of_the_entry() -> None:
    async with proxy_server() as proxy:
        url = "http://upstream.invalid:8000/v1"
        async with upstream(url, proxy=proxy.url) as http, http.post("/x", {}) as resp:
            assert await http.read_json(resp) == {"via": "proxy"}
    ((line, headers, _),) = proxy.seen
    assert line == "POST http://upstream.invalid:8000/v1/x HTTP/1.1"
    assert headers["host"] == "upstream.invalid:8000"


@both_loops
async def test_proxy_from_the_environment_and_no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    async with proxy_server() as proxy, Server(keep_answering) as direct:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        async with upstream("http://upstream.invalid") as http, http.request("GET", "/a"):
            pass
        assert [line for line, _, _ in proxy.seen] == ["GET http://upstream.invalid/a HTTP/1.1"]
        monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
        async with upstream(direct.url) as http, http.request("GET", "/b") as resp:
            assert await resp.read() == b'{"ok": true}'
        assert len(proxy.seen) == 1 and direct.connections == 1
        monkeypatch.setenv("NO_PROXY", "*")  # the entry's own proxy still applies
        async with (
            upstream("http://upstream.invalid", proxy=proxy.url) as http,
            http.request("GET", "/c"),
        ):
            pass
        assert len(proxy.seen) == 2


# -- 6. TLS: CA file, verification, client certificate ---------------------------------------
def make_cert(directory: Any, name: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (openssl CLI) and its key."""
    cert, key = str(directory / f"{name}.pem"), str(directory / f"{name}.key")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", f"/CN={name}", "-addext",
         "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
        check=True, capture_output=True, timeout=20,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def tls_files(tmp_path: Any) -> dict[str, tuple[str, str]]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    return {"server": make_cert(tmp_path, "server"), "client": make_cert(tmp_path, "client")}


def tls_server(files: dict[str, tuple[str, str]], client_cert: bool = False) -> Server:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*files["server"])
    if client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(files["client"][0])
    srv = Server(keep_answering)
    srv.ssl = ctx
    return srv


@both_loops
async def test_https_verifies_the_certificate_against_ca_file(
    tls_files: dict[str, tuple[str, str]],
) -> None:
    srv = tls_server(tls_files)
    async with srv:
        url = srv.url.replace("http://", "https://")
        async with upstream(url) as http:  # the system's CAs do not trust it
            with pytest.raises(UpstreamError, match=r"unreachable.*certificate is not trusted"):
                async with http.request("GET", "/"):
                    pass
        async with upstream(url, tls=TLSConfig(ca_file=tls_files["server"][0])) as http:
            for _ in range(3):
                async with http.post("/x", {}) as resp:
                    assert await http.read_json(resp) == {"ok": True}
        async with (
            upstream(url, tls=TLSConfig(verify=False)) as http,
            http.request("GET", "/") as resp,
        ):
            assert resp.status == 200
    assert srv.connections == 2  # one kept-alive TLS connection per client that trusted it


@both_loops
async def test_https_client_certificate(tls_files: dict[str, tuple[str, str]]) -> None:
    srv = tls_server(tls_files, client_cert=True)
    async with srv:
        url = srv.url.replace("http://", "https://")
        ca = tls_files["server"][0]
        async with upstream(url, tls=TLSConfig(ca_file=ca)) as http:  # no client certificate
            with pytest.raises(UpstreamError, match="backend 'x'"):
                async with http.request("GET", "/") as resp:
                    await resp.read()
        cert, key = tls_files["client"]
        tls = TLSConfig(ca_file=ca, client_cert=cert, client_key=key)
        async with upstream(url, tls=tls) as http, http.request("GET", "/") as resp:
            assert await http.read_json(resp) == {"ok": True}


# -- 7. compressed answers -------------------------------------------------------------------
@both_loops
async def test_gzip_answers_are_decompressed() -> None:
    async def handle(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            srv.seen.append(req)
            body = gzip.compress(b'{"text": "' + b"la " * 1000 + b'"}')
            await conn.answer(body, extra="Content-Encoding: gzip\r\n")

    srv = Server(handle)
    async with srv, upstream(srv.url) as http, http.post("/generate", {}) as resp:
        assert await http.read_json(resp) == {"text": "la " * 1000}
    ((_, headers, _),) = srv.seen
    assert "gzip" in headers["accept-encoding"]


# -- 8. redirects are errors, never followed -------------------------------------------------
@both_loops
async def test_redirect_is_an_error_and_is_not_followed(caplog: pytest.LogCaptureFixture) -> None:
    """The target is named in the log (without its query string), not in the error."""

    async def handle(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            srv.seen.append(req)
            where = f"Location: {srv.url}/elsewhere?token=abc\r\n"
            await conn.answer(b"", "307 Temporary Redirect", where)

    srv = Server(handle)
    async with srv, upstream(srv.url) as http:
        with pytest.raises(
            UpstreamError, match=r"backend 'x' answered with an unexpected redir"
        ) as info:
            async with http.post("/generate", {"q": 1}):
                pass
    assert "elsewhere" not in info.value.message and "token" not in info.value.message
    assert [line for line, _, _ in srv.seen] == ["POST /generate HTTP/1.1"]
    warning = [r for r in caplog.records if r.levelname == "WARNING"][-1]
    assert (
        warning.getMessage() == f"backend 'x' answered HTTP 307, a redirect to {srv.url}/elsewhere"
    )


# -- 9. a request that may have reached the upstream is never sent again ---------------------
@both_loops
async def test_post_is_never_replayed_on_a_reused_connection() -> None:
    async def handle(conn: Conn) -> None:
        srv.seen.append(await conn.request())  # type: ignore[arg-type]
        await conn.answer(b'{"n": 1}')  # a keep-alive answer ...
        srv.seen.append(await conn.request())  # type: ignore[arg-type]
        # ... then the next request is read, and the connection closed without an answer

    srv = Server(handle)
    async with srv, upstream(srv.url) as http:
        async with http.post("/generate", {"x": 1}) as resp:
            assert await http.read_json(resp) == {"n": 1}
        with pytest.raises(UpstreamError, match="closed the connection mid-response"):
            async with http.post("/generate", {"x": 2}):
                pass
        await asyncio.sleep(0.1)
    assert srv.connections == 1 and [body for _, _, body in srv.seen] == [b'{"x":1}', b'{"x":2}']


@both_loops
async def test_stale_pooled_connection_is_retried_once_for_a_get() -> None:
    async def handle(conn: Conn) -> None:
        number = srv.connections
        srv.seen.append(await conn.request())  # type: ignore[arg-type]
        if number == 1:
            await conn.answer(b'{"n": 1}')
            srv.seen.append(await conn.request())  # type: ignore[arg-type]
            return  # closed without answering: a keep-alive race lost
        await conn.answer(b'{"n": 2}')

    srv = Server(handle)
    async with srv, upstream(srv.url) as http:
        for expected in ({"n": 1}, {"n": 2}):
            async with http.request("GET", "/status") as resp:
                assert await http.read_json(resp) == expected
    assert srv.connections == 2 and len(srv.seen) == 3  # GET is idempotent: sent again


# -- 10. a connection with part of an answer left is never reused ----------------------------
@both_loops
async def test_early_exit_closes_the_connection() -> None:
    closed = asyncio.Event()

    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.send(CHUNKED_HEAD + chunk(b"one"))
        if await conn.client_closed():
            closed.set()

    async with Server(handle) as srv, upstream(srv.url) as http:
        async with http.post("/stream", {}) as resp:
            async for _ in http.iter_chunks(resp):
                break
        await asyncio.wait_for(closed.wait(), 3)
        async with http.post("/stream", {}) as resp:  # a new connection, not the closed one
            pass
    assert srv.connections == 2


@both_loops
async def test_unread_partial_body_is_not_pooled() -> None:
    """The rest of a body sent after the client left it must never reach the next request."""

    async def handle(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            if req[0].startswith("GET /partial"):
                await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nstale")
                await asyncio.sleep(0.1)
                with contextlib.suppress(ConnectionError):
                    await conn.send(b"stale")  # the body's end, once the client has left
            else:
                await conn.answer(b'{"fresh": true}')

    async with Server(handle) as srv, upstream(srv.url) as http:
        async with http.request("GET", "/partial"):
            pass
        await asyncio.sleep(0.2)
        async with http.request("GET", "/next") as resp:
            assert await http.read_json(resp) == {"fresh": True}
    assert srv.connections == 2


@both_loops
async def test_cancelled_reader_closes_the_connection() -> None:
    closed = asyncio.Event()

    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.send(CHUNKED_HEAD + chunk(b"one"))
        if await conn.client_closed():
            closed.set()

    async def consume(http: HttpUpstream, first: asyncio.Event) -> None:
        async with http.post("/stream", {}) as resp:
            async for _ in http.iter_chunks(resp):
                first.set()

    async with Server(handle) as srv, upstream(srv.url) as http:
        first = asyncio.Event()
        task = asyncio.create_task(consume(http, first))
        await asyncio.wait_for(first.wait(), 3)
        task.cancel()  # the client of the proxy went away
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(closed.wait(), 3)


# -- 11. a stream's end marker before the body's end still lets the connection be reused -----
@both_loops
async def test_stream_ended_before_its_final_chunk_keeps_the_connection() -> None:
    async def handle(conn: Conn) -> None:
        while await conn.request() is not None:
            await conn.send(CHUNKED_HEAD + chunk(b"data: hi\n\n") + chunk(b"data: [DONE]\n\n"))
            await asyncio.sleep(0.05)  # the terminator comes in a later read
            await conn.send(b"0\r\n\r\n")

    async with Server(handle) as srv, upstream(srv.url) as http:
        for _ in range(2):
            events: list[Event] = []
            async with http.post("/stream", {}) as resp:
                async for batch in http.events(resp, SSEParser()):
                    events.extend(batch)
            assert isinstance(events[-1], Finish)
        async with http.post("/stream", {}) as resp:  # a consumer that stops at the end
            async for batch in http.events(resp, SSEParser()):
                if isinstance(batch[-1], Finish):
                    break
    assert srv.connections == 1


@both_loops
async def test_stream_that_never_ends_after_its_marker_is_dropped_in_time() -> None:
    async def handle(conn: Conn) -> None:
        while await conn.request() is not None:
            await conn.send(CHUNKED_HEAD + chunk(b"data: [DONE]\n\n"))
            await asyncio.sleep(10)  # and never the terminator

    async with Server(handle) as srv, upstream(srv.url) as http:
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with http.post("/stream", {}) as resp:
            async for _ in http.events(resp, SSEParser()):
                pass
        assert loop.time() - start < 2.5
        with pytest.raises(UpstreamTimeout):  # a new connection: the old one was dropped
            async with http.post("/stream", {}, timeout=0.2) as resp:
                await resp.read()
    assert srv.connections == 2


# -- 12. line breaks from upstream data never reach the request line --------------------------
@both_loops
async def test_line_breaks_in_a_path_do_not_inject() -> None:
    async def handle(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            srv.seen.append(req)
            await conn.answer()

    srv = Server(handle)
    evil = "abc\r\nX-Injected: 1\r\n\r\nGET /smuggled HTTP/1.1"
    async with srv, upstream(srv.url) as http:
        for path in (f"/predictions/{evil}", f"{srv.url}/predictions/{evil}/cancel"):
            with contextlib.suppress(UpstreamError, ValueError):  # refusing it is fine too
                async with http.request("POST", path):
                    pass
        await asyncio.sleep(0.1)
    for line, headers, _ in srv.seen:
        assert "x-injected" not in headers and "\r" not in line and "\n" not in line
        assert line.startswith("POST /predictions/abc")
    assert all(not line.startswith("GET") for line, _, _ in srv.seen)


# -- 13. one aiohttp session per upstream ----------------------------------------------------
@both_loops
async def test_one_session_per_upstream(monkeypatch: pytest.MonkeyPatch) -> None:
    sessions: list[aiohttp.ClientSession] = []
    real = aiohttp.ClientSession

    def counting(*args: Any, **kw: Any) -> aiohttp.ClientSession:
        sessions.append(real(*args, **kw))
        return sessions[-1]

    monkeypatch.setattr(aiohttp, "ClientSession", counting)

    async def call() -> None:
        async with http.post("/x", {}) as resp:
            await http.read_json(resp)

    async with Server(keep_answering) as srv:
        http = HttpUpstream(srv.url, label="backend 'x'", timeout=5.0, connect_timeout=2.0)
        assert sessions == []  # nothing before start()
        await http.start()
        await http.start()
        await asyncio.gather(*(call() for _ in range(5)))
        await call()
        assert len(sessions) == 1 and not sessions[0].closed
        await http.close()
        assert sessions[0].closed
