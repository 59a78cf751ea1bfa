"""HttpUpstream on inferbridge's own HTTP/1.1 client (backends/http1.py), against real sockets.

Scripted raw servers (asyncio.start_server) give byte-level control: close-delimited bodies,
connections closed between requests, garbage, stalls. Every test runs on the default asyncio
loop and on uvloop (the proxy's loop), each in its own `asyncio.Runner`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop

from inferbridge.backends import http1
from inferbridge.backends.http import HttpUpstream
from inferbridge.errors import UpstreamError, UpstreamRejected, UpstreamTimeout

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
    assert headers["accept-encoding"] == "identity"
    assert body == '{"m":"é"}'.encode() and headers["content-length"] == str(len(body))
    assert line2 == "GET /v1/models HTTP/1.1" and "content-length" not in headers2
    assert headers2["accept"] == "text/event-stream"  # replaces the default, no duplicate
    assert headers3["cache-control"] == "no-store" and headers3["accept"] == "*/*"
    assert headers3["authorization"] == "Bearer sk-1"


@both_loops
async def test_header_injection_is_refused() -> None:
    async with Server(keep_answering) as srv, upstream(srv.url) as http:
        with pytest.raises(ValueError, match="newline"):
            async with http.request("GET", "/", headers={"X": "a\r\nEvil: 1"}):
                pass


@both_loops
async def test_chunked_stream_arrives_before_the_end() -> None:
    more = asyncio.Event()

    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await asyncio.wait_for(more.wait(), 3)  # only once the client saw the first chunk
        await conn.send(b"6\r\nsecond\r\n0\r\n\r\n")

    chunks = []
    async with Server(handle) as srv, upstream(srv.url) as http, http.post("/s", {}) as resp:
        async for chunk in http.iter_chunks(resp):
            chunks.append(chunk)
            more.set()
    assert chunks == [b"first", b"second"]


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
async def test_stale_pooled_connection_is_retried_once_on_a_fresh_one() -> None:
    both = asyncio.Event()

    async def handle(conn: Conn) -> None:
        number = srv.connections
        srv.seen.append(await conn.request())  # type: ignore[arg-type]
        while number > 2:
            await conn.answer(b'{"n": 1}')
            if (req := await conn.request()) is None:
                return
            srv.seen.append(req)
        if number == 2:
            both.set()
        await asyncio.wait_for(both.wait(), 3)  # two requests at once: two pooled connections
        await conn.answer(b'{"n": 1}')
        srv.seen.append(await conn.request())  # type: ignore[arg-type]
        # ... and hang up without answering the next request (a keep-alive race lost)

    async def call() -> Any:
        async with http.post("/generate", {"x": 1}) as resp:
            return await http.read_json(resp)

    srv = Server(handle)
    async with srv, upstream(srv.url) as http:
        assert await asyncio.gather(call(), call()) == [{"n": 1}, {"n": 1}]
        assert await call() == {"n": 1}  # stale connection 2, then a new one (not stale 1)
        assert await call() == {"n": 1}
    assert srv.connections == 3 and len(srv.seen) == 5


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
    assert srv.connections == 1  # not retried: it was not a pooled connection


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\ndata\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
    ids=["short-content-length", "chunked-cut", "garbage"],
)
@both_loops
async def test_broken_answers_are_mapped(answer: bytes) -> None:
    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.send(answer)

    async with Server(handle) as srv, upstream(srv.url) as http:
        with pytest.raises(UpstreamError, match="closed the connection mid-response"):
            async with http.request("GET", "/") as resp:
                async for _ in http.iter_chunks(resp):
                    pass


@both_loops
async def test_early_exit_closes_the_connection() -> None:
    closed = asyncio.Event()

    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n")
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
async def test_cancelled_reader_closes_the_connection() -> None:
    closed = asyncio.Event()

    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n")
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
async def test_timer_is_cancelled_once_the_body_is_complete() -> None:
    async with (
        Server(keep_answering) as srv,
        upstream(srv.url, timeout=0.1) as http,
        http.request("GET", "/") as resp,
    ):
        await resp.read()
        await asyncio.sleep(0.2)  # holding a complete answer past the timeout is fine
        assert await resp.read() == b'{"ok": true}'


@both_loops
async def test_deadlines_of_successive_requests_on_one_connection() -> None:
    """One timer per connection serves every request on it: a later request's deadline,
    earlier or later than the one the timer was armed for, is the one kept."""

    async def handle(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            if req[0].startswith("GET /hang"):
                await asyncio.sleep(5)
            if req[0].startswith("GET /slow"):
                await asyncio.sleep(0.25)
            await conn.answer(b'{"ok": true}')

    async with Server(handle) as srv, upstream(srv.url, timeout=0.3) as http:
        loop = asyncio.get_running_loop()
        async with http.request("GET", "/") as resp:  # arms the connection's timer: +0.3 s
            await resp.read()
        # an earlier deadline than the one armed (its 0.05 s, against the first one's 0.3 s)
        start = loop.time()
        with pytest.raises(UpstreamTimeout):
            async with http.request("GET", "/hang", timeout=0.05):
                pass
        assert loop.time() - start < 0.2
        # (that connection was closed) a later one: it must not time out at the first's
        async with http.request("GET", "/") as resp:
            await resp.read()
        await asyncio.sleep(0.15)
        async with http.request("GET", "/slow") as resp:
            assert await http.read_json(resp) == {"ok": True}
    assert srv.connections == 2


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
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(blob), 16384):
            piece = blob[i : i + 16384]
            conn.writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        await conn.send(b"0\r\n\r\n")

    digest, sizes = hashlib.sha256(), []
    async with Server(handle) as srv, upstream(srv.url) as http, http.post("/big", {}) as resp:
        async for chunk in http.iter_chunks(resp):
            digest.update(chunk)
            sizes.append(len(chunk))
            await asyncio.sleep(0.002)  # a slow reader: the client must stop reading
    assert sum(sizes) == len(blob) and digest.digest() == hashlib.sha256(blob).digest()
    assert max(sizes) <= 2 * http1.HIGH_WATER + 65536, max(sizes)


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
async def test_close_and_idle_expiry_close_pooled_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http1, "KEEPALIVE", 0.1)
    closed: list[bool] = []

    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.answer()
        closed.append(await conn.client_closed())

    async with Server(handle) as srv, upstream(srv.url) as http:
        async with http.request("GET", "/") as resp:
            await resp.read()
        for _ in range(40):  # the idle sweep closes it after KEEPALIVE
            if closed:
                break
            await asyncio.sleep(0.05)
        assert closed == [True]
        monkeypatch.setattr(http1, "KEEPALIVE", 60.0)
        async with http.request("GET", "/") as resp:
            await resp.read()
        await http.close()  # closing the upstream closes its idle connections
        for _ in range(40):
            if len(closed) == 2:
                break
            await asyncio.sleep(0.05)
        assert closed == [True, True]
        with pytest.raises(UpstreamError, match="client not started"):
            async with http.request("GET", "/"):
                pass


@pytest.fixture
def tls_files(tmp_path: Any) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (openssl CLI) and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
         "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
        check=True, capture_output=True, timeout=20,
    )  # fmt: skip
    return cert, key


@both_loops
async def test_https_verifies_the_certificate(
    tls_files: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    srv = Server(keep_answering)
    srv.ssl = server_ctx
    async with srv:
        url = srv.url.replace("http://", "https://")
        async with upstream(url) as http:  # the default context does not trust it
            with pytest.raises(UpstreamError, match=r"unreachable.*CERTIFICATE_VERIFY_FAILED"):
                async with http.request("GET", "/"):
                    pass
        monkeypatch.setattr(http1, "_ssl_context", ssl.create_default_context(cafile=cert))
        async with upstream(url) as http:
            for _ in range(3):
                async with http.post("/x", {}) as resp:
                    assert await http.read_json(resp) == {"ok": True}
    assert (
        srv.connections == 1
    )  # one kept-alive TLS connection (handshakes that failed never count)
