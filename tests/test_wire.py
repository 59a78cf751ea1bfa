"""The API on the wire: the one serving path (the FastAPI app behind `RequestGate`, under
uvicorn's `httptools` protocol), over raw sockets where the exact bytes matter (framing,
keep-alive, HTTP/1.0, interim responses, pipelining, body limits, request ids, closes) and
httpx otherwise.

Requests with a body say `Content-Type: application/json` (anything else is a 415).
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest

from tests.server import InferbridgeServer

LIMIT = 1000
CONFIG: dict[str, Any] = {
    "server": {"max_body_bytes": LIMIT},
    "models": [
        {"name": "echo", "backend": "echo"},
        {"name": "slow", "backend": "echo", "delay": 0.05},
    ],
}
CHAT = "/v1/chat/completions"
TOO_LARGE = {
    "error": {
        "message": f"The request body is larger than the limit of {LIMIT} bytes "
        "(server.max_body_bytes).",
        "type": "invalid_request_error",
        "param": None,
        "code": "request_too_large",
    }
}


# -- servers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[InferbridgeServer]:
    """One server for the whole module."""
    with InferbridgeServer(CONFIG) as server:
        yield server


def close_connections_and_stop(server: InferbridgeServer) -> None:
    """Stop a server that may have a connection stuck open: the connections still open are
    closed from the server's loop first, else the graceful shutdown would wait for them for
    ever (and `stop` give up after 10 s)."""
    assert server._server is not None and server.loop is not None
    connections = server._server.server_state.connections
    closed = threading.Event()

    def close_all() -> None:
        for connection in list(connections):
            connection.transport.close()
        closed.set()

    server.loop.call_soon_threadsafe(close_all)
    closed.wait(5)
    server.stop()


@pytest.fixture
def own_server() -> Iterator[InferbridgeServer]:
    """A server for one test that may leave a connection stuck open."""
    server = InferbridgeServer(CONFIG).start()
    yield server
    close_connections_and_stop(server)


# -- raw HTTP/1.1 client --------------------------------------------------------------------


@dataclass
class Response:
    status: int
    head: bytes  # status line and header lines, without the blank line
    headers: list[tuple[str, str]]
    body: bytes  # de-chunked
    chunked: bool
    chunks: list[bytes] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        assert len(values) <= 1, f"{name} sent {len(values)} times: {values}"
        return values[0] if values else None

    def json(self) -> Any:
        return orjson.loads(self.body)


class Conn:
    """A client socket with a read buffer, so pipelined responses can be split exactly."""

    def __init__(self, server: InferbridgeServer, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
        self.buf = b""
        self.raw = b""  # every byte consumed by the read_* methods

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError(f"server closed the connection; unparsed: {self.buf[:200]!r}")
        self.buf += data

    def read_until(self, separator: bytes) -> bytes:
        while separator not in self.buf:
            self._fill()
        out, _, self.buf = self.buf.partition(separator)
        self.raw += out + separator
        return out

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        self.raw += out
        return out

    def read_to_eof(self) -> bytes:
        while True:
            try:
                self._fill()
            except EOFError:
                out, self.buf = self.buf, b""
                self.raw += out
                return out

    def read_response(self, *, eof_framed: bool = False) -> Response:
        return self.read_body(self.read_head(), eof_framed=eof_framed)

    def read_head(self) -> Response:
        """The status line and headers of the next response (its body not read yet)."""
        head = self.read_until(b"\r\n\r\n")
        status_line, *lines = head.split(b"\r\n")
        assert re.fullmatch(rb"HTTP/1\.1 \d{3} [^\r\n]*", status_line), status_line
        headers = []
        for line in lines:
            name, sep, value = line.partition(b":")
            assert sep and name == name.strip(), f"bad header line {line!r}"
            headers.append((name.decode().lower(), value.strip().decode("latin-1")))
        return Response(int(status_line.split()[1]), head, headers, b"", chunked=False)

    def read_body(self, response: Response, *, eof_framed: bool = False) -> Response:
        """The body of `response`, by its framing: chunked, content-length or (when
        `eof_framed`) the connection's end."""
        te = response.header("transfer-encoding")
        length = response.header("content-length")
        if response.status < 200 or response.status in (204, 304):
            assert te is None and length is None
        elif te is not None:
            assert te == "chunked" and length is None, response.head
            response.chunked = True
            while True:
                size = self.read_until(b"\r\n")
                assert re.fullmatch(rb"[0-9a-f]+", size), f"bad chunk size line {size!r}"
                data = self.read_exact(int(size, 16) + 2)
                assert data.endswith(b"\r\n"), data[-20:]
                if size == b"0":
                    break
                response.chunks.append(data[:-2])
            response.body = b"".join(response.chunks)
        elif length is not None:
            response.body = self.read_exact(int(length))
        else:
            assert eof_framed, f"response without framing: {response.head!r}"
            response.body = self.read_to_eof()
        return response

    def closed_by_server(self, timeout: float = 2.0) -> bool:
        """True when the server closes the connection within `timeout` with nothing more
        to read; False when it stays open."""
        assert not self.buf, self.buf
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def request(
    body: bytes | dict[str, Any],
    path: str = CHAT,
    *,
    version: str = "1.1",
    headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """A raw POST; content-length framed unless `headers` say transfer-encoding."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    lines = [f"POST {path} HTTP/{version}", "host: 127.0.0.1", "content-type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers]
    if not any(k.lower() == "transfer-encoding" for k, _ in headers):
        lines.append(f"content-length: {len(data)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


def chat(text: str, model: str = "echo", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def answer(response: Response) -> str:
    """The assistant text of a non-streaming chat response."""
    assert response.status == 200, (response.head, response.body)
    data = response.json()
    assert data["object"] == "chat.completion"
    return data["choices"][0]["message"]["content"]


def events(response: Response) -> list[bytes]:
    """The SSE events of a stream: each must be one `data:` line ended by a blank line."""
    assert response.body.endswith(b"\n\n"), response.body[-60:]
    found = response.body[:-2].split(b"\n\n")
    for event in found:
        assert event.startswith(b"data: ") and b"\n" not in event, event
    return [event[6:] for event in found]


def streamed_text(response: Response) -> str:
    data = events(response)
    assert data[-1] == b"[DONE]" and b"[DONE]" not in data[:-1], data[-3:]
    chunks = [orjson.loads(d) for d in data[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


def padded(body: dict[str, Any], size: int) -> bytes:
    """`body` as JSON padded with trailing whitespace to exactly `size` bytes."""
    data = orjson.dumps(body)
    assert len(data) <= size
    return data + b" " * (size - len(data))


def assert_envelope(response: Response, status: int, error_type: str = "invalid_request_error"):
    assert response.status == status, (response.head, response.body)
    assert response.header("content-type") == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == error_type and error["message"]
    return error


def metric(server: InferbridgeServer, name: str, model: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    found = re.search(rf'^{name}\{{model="{model}"\}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def wait_until(condition: Any, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- 1. non-streaming -----------------------------------------------------------------------


def test_whole_response_and_keep_alive(server):
    with Conn(server) as conn:
        conn.send(request(chat("hello there"), headers=(("x-request-id", "req-one"),)))
        first = conn.read_response()
        assert answer(first) == "hello there"
        assert first.header("x-request-id") == "req-one"
        assert first.header("x-inferbridge-model") == "echo"
        assert re.fullmatch(r"\d+\.\d{3}", first.header("x-inferbridge-overhead-ms") or "")
        assert first.header("connection") is None
        assert first.json()["usage"] == {
            "prompt_tokens": 2,
            "completion_tokens": 2,
            "total_tokens": 4,
        }

        # The same connection serves the next request (the completions route this time).
        body = {"model": "echo", "prompt": "one two three"}
        conn.send(request(body, "/completions"))
        second = conn.read_response()
        assert second.status == 200
        assert second.json()["choices"][0]["text"] == "one two three"
        generated = second.header("x-request-id")
        assert generated and generated != "req-one"
        assert not conn.closed_by_server(timeout=0.2)


def test_whole_responses_are_content_length_framed(server):
    with Conn(server) as conn:
        conn.send(request(chat("framed by length")))
        ok = conn.read_response()
        conn.send(request(b"{nope"))
        bad = conn.read_response()
        conn.send(request(b"x" * 2000))
        large = conn.read_response()
    assert answer(ok) == "framed by length"
    assert_envelope(bad, 400)
    assert large.json() == TOO_LARGE
    for response in (ok, bad, large):
        assert not response.chunked and response.header("content-length") == str(
            len(response.body)
        ), response.head


# -- 2. streaming ---------------------------------------------------------------------------


def test_stream_then_next_request_on_same_connection(server):
    with Conn(server) as conn:
        conn.send(request(chat("one two three four", stream=True)))
        stream = conn.read_response()
        assert stream.status == 200
        assert stream.chunked and stream.header("content-length") is None
        assert stream.header("content-type") == "text/event-stream; charset=utf-8"
        assert stream.header("cache-control") == "no-cache"
        assert stream.header("x-inferbridge-model") == "echo"
        assert stream.header("x-request-id")
        assert streamed_text(stream) == "one two three four"
        assert stream.chunks[-1].endswith(b"data: [DONE]\n\n")

        conn.send(request(chat("after the stream")))
        assert answer(conn.read_response()) == "after the stream"


def test_slow_stream_arrives_in_several_chunks(server):
    with Conn(server) as conn:
        conn.send(request(chat("a b c d", model="slow", stream=True)))
        stream = conn.read_response()
    assert streamed_text(stream) == "a b c d"
    # one chunk per token batch (the delay separates them), the last one with [DONE]
    assert len(stream.chunks) >= 4
    assert all(chunk.endswith(b"\n\n") for chunk in stream.chunks)


def test_stream_framing_bytes(server):
    """The exact framing of a stream: each HTTP chunk holds whole SSE events, `[DONE]` is
    the last event and the zero-length chunk ends the body, with nothing after it."""
    with Conn(server) as conn:
        conn.send(
            request(chat("same bytes please", stream=True), headers=(("x-request-id", "same-id"),))
        )
        stream = conn.read_response()
        assert not conn.buf
        raw = conn.raw
    assert streamed_text(stream) == "same bytes please"
    assert stream.header("x-request-id") == "same-id"
    assert stream.header("transfer-encoding") == "chunked"
    assert stream.header("content-length") is None and stream.header("connection") is None
    for chunk in stream.chunks:
        assert re.fullmatch(rb"(data: [^\n]+\n\n)+", chunk), chunk
    assert stream.chunks[-1] == b"data: [DONE]\n\n"
    assert raw.endswith(b"\n\n\r\ne\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"), raw[-60:]


# -- 3. HTTP/1.0 and connection: close -----------------------------------------------------


@pytest.mark.parametrize(
    ("version", "headers"),
    [("1.0", ()), ("1.0", (("connection", "keep-alive"),)), ("1.1", (("connection", "close"),))],
    ids=["http1.0", "http1.0-keep-alive", "http1.1-close"],
)
def test_no_keep_alive_closes(server, version, headers):
    with Conn(server) as conn:
        conn.send(request(chat("closing time"), version=version, headers=headers))
        response = conn.read_response()
        assert answer(response) == "closing time"
        assert response.header("connection") == "close"
        assert conn.closed_by_server()


def test_http10_whole_response_is_not_chunked(server):
    with Conn(server) as conn:
        conn.send(request(chat("old client"), version="1.0"))
        response = conn.read_response()
    assert response.header("transfer-encoding") is None
    assert response.header("content-length") == str(len(response.body))


@pytest.mark.xfail(
    strict=True,
    reason="uvicorn's httptools protocol frames every response without a length with chunked "
    "encoding, whatever the request's HTTP version (RFC 9112 6.1 forbids it for HTTP/1.0)",
)
def test_http10_stream_is_not_chunked(server):
    """An HTTP/1.0 client does not know chunked framing (RFC 9112 section 6.1: no
    Transfer-Encoding in an answer to an HTTP/1.0 request): a stream goes unframed, ended
    by the close."""
    with Conn(server) as conn:
        conn.send(request(chat("old stream", stream=True), version="1.0"))
        response = conn.read_response(eof_framed=True)
    assert response.header("transfer-encoding") is None
    assert streamed_text(response) == "old stream"


# -- 4. Expect: 100-continue ----------------------------------------------------------------


def test_expect_100_continue(server):
    body = orjson.dumps(chat("continue please"))
    head, _, rest = request(body, headers=(("expect", "100-continue"),)).partition(b"\r\n\r\n")
    assert rest == body
    with Conn(server) as conn:
        conn.send(head + b"\r\n\r\n")
        interim = conn.read_response()  # before any byte of the body was sent
        assert interim.status == 100
        assert interim.head == b"HTTP/1.1 100 Continue"
        conn.send(body)
        assert answer(conn.read_response()) == "continue please"
        assert not conn.buf


def test_expect_100_continue_refused_when_too_large(server):
    with Conn(server) as conn:
        conn.send(
            f"POST {CHAT} HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
            f"content-type: application/json\r\ncontent-length: {LIMIT + 1}\r\n\r\n".encode()
        )
        response = conn.read_response()
    assert response.status == 413  # no 100 Continue first: the body is not wanted
    assert response.json() == TOO_LARGE


def test_expect_100_continue_refused_without_json_content_type(server):
    with Conn(server) as conn:
        conn.send(
            f"POST {CHAT} HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
            "content-type: text/plain\r\ncontent-length: 10\r\n\r\n".encode()
        )
        response = conn.read_response()  # a 415, not a 100 Continue
    error = assert_envelope(response, 415)
    assert error["code"] == "unsupported_media_type"


# -- 5. body size and time limits -----------------------------------------------------------


def test_declared_length_over_limit(server):
    with Conn(server) as conn:
        # headers only: the answer must not wait for a body it will refuse anyway
        conn.send(
            f"POST {CHAT} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"x-request-id: big-one\r\ncontent-length: {LIMIT + 1}\r\n\r\n".encode()
        )
        response = conn.read_response()
        assert_envelope(response, 413)
        assert response.json() == TOO_LARGE
        # The unread body must not be taken for the next request (RFC 9110 section 10.1.1):
        # either the server closes the connection and says so, or it reads the refused
        # body, drops it and serves the next request.
        if response.header("connection") == "close":
            assert conn.closed_by_server()
        else:
            conn.send(b"x" * (LIMIT + 1) + request(chat("after the refused body")))
            assert answer(conn.read_response()) == "after the refused body"
    assert response.header("x-request-id") == "big-one"


def test_chunked_body_over_limit(server):
    with Conn(server) as conn:
        conn.send(
            f"POST {CHAT} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            "transfer-encoding: chunked\r\n\r\n".encode()
        )
        # 1001 bytes in two chunks, and no last chunk: the limit is checked as data comes
        conn.send(b"258\r\n" + b"x" * 600 + b"\r\n191\r\n" + b"y" * 401 + b"\r\n")
        response = conn.read_response()
    assert_envelope(response, 413)
    assert response.json() == TOO_LARGE


def test_body_at_limit_is_accepted(server):
    with Conn(server) as conn:
        conn.send(request(padded(chat("exactly at the limit"), LIMIT)))
        assert answer(conn.read_response()) == "exactly at the limit"
        chunked = padded(chat("chunked at the limit"), LIMIT)
        conn.send(
            request(
                b"%x\r\n%b\r\n%x\r\n%b\r\n0\r\n\r\n" % (500, chunked[:500], 500, chunked[500:]),
                headers=(("transfer-encoding", "chunked"),),
            )
        )
        assert answer(conn.read_response()) == "chunked at the limit"
        conn.send(request(padded(chat("one byte over"), LIMIT + 1)))
        assert conn.read_response().json() == TOO_LARGE


def test_body_not_json_is_refused_before_it_is_read(server):
    with Conn(server) as conn:
        conn.send(
            f"POST {CHAT} HTTP/1.1\r\nhost: x\r\ncontent-type: text/plain\r\n"
            "content-length: 5\r\n\r\nhello".encode()
        )
        response = conn.read_response()
        error = assert_envelope(response, 415)
        assert error["code"] == "unsupported_media_type" and error["param"] == "Content-Type"
        # the body was refused unread: the connection closes rather than read it on
        assert response.header("connection") == "close"
        assert conn.closed_by_server()
    with Conn(server) as conn:
        conn.send(request(chat("json now")))
        assert answer(conn.read_response()) == "json now"


@pytest.fixture
def slow_body_server() -> Iterator[InferbridgeServer]:
    """A server that waits 0.3 s at most for a request body."""
    server = InferbridgeServer({**CONFIG, "server": {**CONFIG["server"], "body_timeout": 0.3}})
    server.start()
    yield server
    close_connections_and_stop(server)


def test_body_too_slow(slow_body_server):
    body = orjson.dumps(chat("slow body"))
    with Conn(slow_body_server) as conn:
        conn.send(request(body)[: -len(body) // 2])  # half the body, then nothing
        started = time.monotonic()
        response = conn.read_response()
        waited = time.monotonic() - started
        error = assert_envelope(response, 408)
        assert error["code"] == "request_timeout"
        assert 0.25 < waited < 2, waited
        # The body will not be read any further: the connection is closed (RFC 9110
        # section 15.5.9), so the rest cannot be taken for the next request.
        assert response.header("connection") == "close"
        assert conn.closed_by_server()


# -- 6. pipelining --------------------------------------------------------------------------


def test_pipelined_requests_answered_in_order(server):
    with Conn(server) as conn:
        # The first is the slowest: a response written as soon as it is ready would come
        # out of order.
        conn.send(
            request(chat("first of three", model="slow"))
            + b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"
            + request(chat("third one", stream=True))
            + request({"model": "echo", "prompt": "fourth"}, "/v1/completions")
        )
        first = conn.read_response()
        health = conn.read_response()
        third = conn.read_response()
        fourth = conn.read_response()
    assert answer(first) == "first of three"
    assert health.status == 200 and health.json() == {"status": "ok"}
    assert streamed_text(third) == "third one"
    assert fourth.json()["choices"][0]["text"] == "fourth"


def test_pipelined_request_whose_body_arrives_after_previous_response(own_server):
    second = request(chat("late body"))
    head, _, body = second.partition(b"\r\n\r\n")
    with Conn(own_server, timeout=1.0) as conn:
        conn.send(request(chat("a b c", model="slow")) + head + b"\r\n\r\n")
        assert answer(conn.read_response()) == "a b c"
        conn.send(body)
        assert answer(conn.read_response()) == "late body"


def test_pipelined_too_large_waits_for_previous_response(server):
    with Conn(server) as conn:
        conn.send(request(chat("a b c d e", model="slow", stream=True)))
        first = conn.read_head()
        assert first.status == 200
        # the next request, sent while the first response is being streamed
        conn.send(
            f"POST {CHAT} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {LIMIT + 1}\r\n\r\n".encode()
        )
        assert streamed_text(conn.read_body(first)) == "a b c d e"
        assert conn.read_response().json() == TOO_LARGE


def test_pipelined_expect_100_waits_for_previous_response(server):
    body = orjson.dumps(chat("second"))
    head = request(body, headers=(("expect", "100-continue"),)).partition(b"\r\n\r\n")[0]
    with Conn(server) as conn:
        conn.send(request(chat("a b c d e", model="slow", stream=True)))
        first = conn.read_head()
        assert first.status == 200
        conn.send(head + b"\r\n\r\n")
        assert streamed_text(conn.read_body(first)) == "a b c d e"
        assert conn.read_response().status == 100
        conn.send(body)
        assert answer(conn.read_response()) == "second"


# -- 7. x-request-id ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given",
    [b"abc\tdef", "caf\u00e9".encode(), b"a" * 201],
    ids=["tab", "non-ascii", "too-long"],
)
def test_unsafe_request_id_replaced(server, given):
    with Conn(server) as conn:
        conn.send(
            request(chat("id check")).replace(
                b"\r\n\r\n", b"\r\nx-request-id: " + given + b"\r\n\r\n", 1
            )
        )
        response = conn.read_response()
    assert answer(response) == "id check"
    sent = response.header("x-request-id")
    assert sent and sent.encode("latin-1") != given
    assert re.fullmatch(r"[0-9a-f]{16,}", sent), sent


def test_request_id_with_control_character(server):
    """\\x01 in a header value is refused by the HTTP parser itself (400, before any
    handler): it must not come back in a response header either."""
    with Conn(server) as conn:
        conn.send(request(chat("x")).replace(b"\r\n\r\n", b"\r\nx-request-id: abc\x01\r\n\r\n", 1))
        response = conn.read_response()
        assert response.status == 400
        assert b"abc\x01" not in response.head and b"abc\x01" not in response.body
        assert response.header("connection") == "close"
        assert conn.closed_by_server()


# -- 8. client disconnect -------------------------------------------------------------------


def test_disconnect_mid_stream_cancels_upstream(server):
    wait_until(lambda: metric(server, "inferbridge_requests_in_flight", "slow") == 0.0)
    before = metric(server, "inferbridge_client_disconnects_total", "slow")
    words = " ".join(f"w{i}" for i in range(100))  # 100 tokens, 5 s at 0.05 s each
    with Conn(server) as conn:
        conn.send(request(chat(words, model="slow", stream=True)))
        head = conn.read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and b"transfer-encoding: chunked" in head
        while conn.buf.count(b"data: ") < 3:  # a few tokens arrived: the stream is live
            conn._fill()
        assert metric(server, "inferbridge_requests_in_flight", "slow") == 1.0
    # The client is gone: the request is cancelled well before its 5 s of tokens.
    assert wait_until(lambda: metric(server, "inferbridge_requests_in_flight", "slow") == 0.0)
    assert metric(server, "inferbridge_client_disconnects_total", "slow") == before + 1
    # and the server carries on
    with Conn(server) as conn:
        conn.send(request(chat("still here", model="slow", stream=True)))
        assert streamed_text(conn.read_response()) == "still here"
        conn.send(request(chat("and here")))
        assert answer(conn.read_response()) == "and here"


@pytest.mark.xfail(
    strict=True,
    reason="uvicorn marks only the last request read on a connection as disconnected: a stream "
    "with a pipelined request behind it runs on until a write to the closed socket fails",
)
def test_disconnect_with_a_pipelined_request_behind_the_stream(server):
    """The stream being answered is cancelled even though the request the connection read
    last is the pipelined one behind it, and that one never reaches a backend."""
    wait_until(lambda: metric(server, "inferbridge_requests_in_flight", "slow") == 0.0)
    before = metric(server, "inferbridge_client_disconnects_total", "slow")
    served = requests_total(server, "slow")
    words = " ".join(f"w{i}" for i in range(100))  # 5 s of tokens
    with Conn(server) as conn:
        conn.send(request(chat(words, model="slow", stream=True)) + request(chat("late", "slow")))
        while conn.buf.count(b"data: ") < 2:
            conn._fill()
    assert wait_until(lambda: metric(server, "inferbridge_requests_in_flight", "slow") == 0.0)
    assert metric(server, "inferbridge_client_disconnects_total", "slow") == before + 1
    time.sleep(0.1)
    assert requests_total(server, "slow") == served + 1


def requests_total(server: InferbridgeServer, model: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    found = re.findall(
        rf'^inferbridge_requests_total{{[^}}]*model="{model}"[^}}]*}} (\S+)$', text, re.M
    )
    return sum(float(n) for n in found)


# -- 9. keep-alive and servers side by side -------------------------------------------------


def test_servers_in_one_process_each_serve_their_own_app():
    """Each connection is served by its own server's app, with two servers of different
    models running at once in one process."""
    with (
        InferbridgeServer({"models": [{"name": "first", "backend": "echo"}]}) as first,
        InferbridgeServer({"models": [{"name": "second", "backend": "echo"}]}) as second,
    ):
        for _ in range(2):
            for server, own, other in ((first, "first", "second"), (second, "second", "first")):
                with Conn(server) as conn:
                    conn.send(request(chat("mine", model=own)))
                    assert answer(conn.read_response()) == "mine"
                    conn.send(request(chat("theirs", model=other)))
                    assert_envelope(conn.read_response(), 404)


@pytest.fixture
def keep_alive_server() -> Iterator[InferbridgeServer]:
    """A server whose idle connections are closed after 0.5 s."""
    with InferbridgeServer(CONFIG, timeout_keep_alive=0.5) as server:
        yield server


def test_idle_connection_closed_after_keep_alive_timeout(keep_alive_server):
    server = keep_alive_server
    with Conn(server) as conn:
        conn.send(request(chat("one")))
        assert answer(conn.read_response()) == "one"
        time.sleep(0.3)  # busy again before the timeout: the clock starts over
        conn.send(request(chat("two")))
        assert answer(conn.read_response()) == "two"
        answered = time.monotonic()
        assert conn.closed_by_server(timeout=3)
        idle = time.monotonic() - answered
        assert 0.45 < idle < 0.9, idle


# -- 10. other routes -----------------------------------------------------------------------


def test_other_routes(server):
    with httpx.Client(base_url=server.url) as client:
        missing = client.post("/v1/nope", json=chat("x"))
        assert missing.status_code == 404
        assert missing.json() == {
            "error": {
                "message": "Not Found: POST /v1/nope",
                "type": "invalid_request_error",
                "param": None,
                "code": "not_found",
            }
        }
        health = client.get("/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        not_post = client.get(CHAT)  # a completion path, but not its method
        assert not_post.status_code == 405
        assert not_post.json()["error"]["message"].endswith(f"GET {CHAT}")
        # a completion on the same (kept-alive) connection after the other routes
        assert (
            client.post(CHAT, json=chat("again")).json()["choices"][0]["message"]["content"]
            == "again"
        )


def test_completions_and_other_routes_on_one_connection(server):
    with Conn(server) as conn:
        conn.send(request(chat("x"), "/v1/nope"))
        assert_envelope(conn.read_response(), 404)
        conn.send(request(chat("completion")))
        assert answer(conn.read_response()) == "completion"
        conn.send(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        assert conn.read_response().json() == {"status": "ok"}


# -- 11. malformed bodies -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"model": "echo", "messages": [', "The request body is not valid JSON"),
        (b"", "The request body is empty"),
        (b"[1, 2]", "The request body must be a JSON object"),
    ],
    ids=["truncated", "empty", "array"],
)
def test_malformed_body(server, body, message):
    with httpx.Client(base_url=server.url) as client:
        response = client.post(
            CHAT, content=body, headers={"content-type": "application/json", "x-request-id": "m1"}
        )
        assert response.status_code == 400
        assert response.headers["content-type"] == "application/json"
        assert response.headers["x-request-id"] == "m1"
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] is None
        assert error["message"].startswith(message), error
        # the connection is still good
        ok = client.post(CHAT, json=chat("fine now"))
        assert ok.json()["choices"][0]["message"]["content"] == "fine now"
