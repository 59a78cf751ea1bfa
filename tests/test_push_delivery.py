"""Push delivery (`events.Delivery`): batches handed to a sink from the socket's callback.

`HttpUpstream.events` pulls the first batch like any stream; once the consumer sets
`delivery.sink`, every later socket read is parsed and pushed from the upstream
connection's `data_received`. These tests drive it against scripted servers on real
sockets (the helpers of test_http_client.py), on both event loops, with a line parser.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable, Sequence

import orjson
import pytest

from inferbridge.api.handlers import CompletionsEndpoint, Reply
from inferbridge.backends.http import HttpUpstream
from inferbridge.config import load_config
from inferbridge.errors import UpstreamError
from inferbridge.events import Delivery, Event, TextDelta
from inferbridge.gateway import Gateway
from tests.test_http_client import Conn, Server, both_loops, upstream

HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class LineParser:
    """One TextDelta per line; "END" is the protocol's end, "BAD" a protocol error."""

    def __init__(self) -> None:
        self.buf = b""
        self.done = False
        self.error: UpstreamError | None = None

    def feed(self, data: bytes) -> list[Event]:
        lines = (self.buf + data).split(b"\n")
        self.buf = lines.pop()
        out: list[Event] = []
        for line in lines:
            if self.done or self.error is not None:
                break
            if line == b"END":
                self.done = True
            elif line == b"BAD":
                self.error = UpstreamError("backend 'x' sent BAD", backend="x")
            else:
                out.append(TextDelta(line.decode()))
        return out

    def finish(self) -> list[Event]:
        if not self.done and self.error is None:
            self.error = UpstreamError.truncated("backend 'x'")
        return []


class Sink:
    """Records pushed batches; `writable` decides what `push` answers."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.pushed = asyncio.Event()
        self.writable = True
        self.resume: Callable[[], None] | None = None
        self.fail: Exception | None = None

    def push(self, batch: Sequence[Event]) -> bool:
        if self.fail is not None:
            raise self.fail
        self.batches.append([e.text for e in batch])  # type: ignore[union-attr]
        self.pushed.set()
        return self.writable

    def when_writable(self, resume: Callable[[], None]) -> None:
        self.resume = resume


async def pull_then_push(
    http: HttpUpstream, sink: Sink, pause: float = 0.0
) -> tuple[list[str], list[str]]:
    """Pull the first batch, (after `pause`) set the sink, then drive the rest: (first
    batch, what the generator still yielded at the end)."""
    delivery = Delivery()
    async with http.post("/s", {}) as resp:
        stream = http.events(resp, LineParser(), delivery)
        first = await stream.__anext__()
        await asyncio.sleep(pause)
        delivery.sink = sink
        rest = [e.text for batch in [b async for b in stream] for e in batch]  # type: ignore[union-attr]
    return [e.text for e in first], rest  # type: ignore[union-attr]


@both_loops
async def test_later_batches_are_pushed_one_per_socket_read_before_the_end() -> None:
    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.send(HEAD + chunk(b"a\n"))
        await asyncio.sleep(0.05)  # the first batch is pulled, the sink set
        await conn.send(chunk(b"b\n") + chunk(b"c\n"))  # two HTTP chunks in one write
        await asyncio.wait_for(sink.pushed.wait(), 3)  # pushed while the body is open
        await conn.send(chunk(b"d\nEND\n") + b"0\r\n\r\n")

    sink = Sink()
    async with Server(handle) as srv, upstream(srv.url) as http:
        first, rest = await pull_then_push(http, sink)
    assert first == ["a"]
    assert sink.batches == [["b", "c"], ["d"]]
    assert rest == []


@both_loops
async def test_a_full_sink_holds_the_socket_until_it_is_writable_again() -> None:
    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.send(HEAD + chunk(b"a\n"))
        await asyncio.sleep(0.05)
        await conn.send(chunk(b"b\n"))
        await asyncio.wait_for(sink.pushed.wait(), 3)
        await conn.send(chunk(b"c\n") + chunk(b"END\n") + b"0\r\n\r\n")

    sink = Sink()
    sink.writable = False  # the first push fills the client's buffer
    async with Server(handle) as srv, upstream(srv.url) as http:
        task = asyncio.create_task(pull_then_push(http, sink))
        await asyncio.wait_for(sink.pushed.wait(), 3)
        await asyncio.sleep(0.2)  # everything else has been sent by now
        assert sink.batches == [["b"]]  # ...and not read while held
        assert sink.resume is not None
        sink.writable = True
        sink.resume()
        await asyncio.wait_for(task, 3)
    assert sink.batches == [["b"], ["c"]]


@both_loops
async def test_what_arrived_before_pushing_began_is_pushed_first() -> None:
    """The end marker and then a dropped connection, both before the sink is set: the
    buffered events are pushed, and the answer is whole (its end marker came)."""

    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.send(HEAD + chunk(b"a\n"))
        await asyncio.sleep(0.05)
        await conn.send(chunk(b"b\nEND\n"))  # then closed without the last chunk

    sink = Sink()
    async with Server(handle) as srv, upstream(srv.url) as http:
        first, rest = await pull_then_push(http, sink, pause=0.3)
    assert (first, sink.batches, rest) == (["a"], [["b"]], [])


@both_loops
async def test_a_parse_error_is_raised_after_the_events_before_it_were_pushed() -> None:
    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.send(HEAD + chunk(b"a\n"))
        await asyncio.sleep(0.05)
        await conn.send(chunk(b"b\nBAD\nc\n"))
        await asyncio.sleep(1)

    sink = Sink()
    async with Server(handle) as srv, upstream(srv.url) as http:
        with pytest.raises(UpstreamError, match="sent BAD"):
            await pull_then_push(http, sink)
    assert sink.batches == [["b"]]


def open_stream_noting_the_close(closed: asyncio.Event) -> Callable[[Conn], Awaitable[None]]:
    """A handler that sends "a", then "b" once the sink is set, then keeps the body open
    and sets `closed` when the client closes the connection."""

    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.send(HEAD + chunk(b"a\n"))
        await asyncio.sleep(0.05)
        await conn.send(chunk(b"b\n"))
        if await conn.client_closed():
            closed.set()

    return handle


@both_loops
async def test_a_sink_failure_ends_the_stream_and_closes_the_connection() -> None:
    closed = asyncio.Event()
    handle = open_stream_noting_the_close(closed)
    sink = Sink()
    sink.fail = RuntimeError("the client's side broke")
    async with Server(handle) as srv, upstream(srv.url) as http:
        with pytest.raises(RuntimeError, match="client's side broke"):
            await pull_then_push(http, sink)
        await asyncio.wait_for(closed.wait(), 3)


@both_loops
async def test_cancelling_a_pushed_stream_closes_the_connection() -> None:
    closed = asyncio.Event()
    handle = open_stream_noting_the_close(closed)
    sink = Sink()
    async with Server(handle) as srv, upstream(srv.url) as http:
        task = asyncio.create_task(pull_then_push(http, sink))
        await asyncio.wait_for(sink.pushed.wait(), 3)
        task.cancel()  # the proxy's client went away
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(closed.wait(), 3)
    assert sink.batches == [["b"]]


@both_loops
async def test_a_body_cut_short_while_pushing_is_an_error() -> None:
    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.send(HEAD + chunk(b"a\n"))
        await asyncio.sleep(0.05)
        await conn.send(chunk(b"b\n") + b"0\r\n\r\n")  # no END: the answer was truncated

    sink = Sink()
    async with Server(handle) as srv, upstream(srv.url) as http:
        with pytest.raises(UpstreamError, match="ended"):
            await pull_then_push(http, sink)
    assert sink.batches == [["b"]]


class PushingReply(Reply):
    """A Reply that takes pushed chunks, like inferbridge's own HTTP transport."""

    can_push = True

    def __init__(self) -> None:
        super().__init__()
        self.body = b""

    async def whole(self, status: int, headers: list, body: bytes) -> None:
        self.body += body

    async def start(self, headers: list, body: bytes) -> None:
        self.body += body

    async def chunk(self, body: bytes) -> None:
        self.body += body

    async def end(self, body: bytes) -> None:
        self.body += body

    def write_now(self, body: bytes) -> bool:
        self.body += body
        return True

    def when_writable(self, resume: Callable[[], None]) -> None:
        resume()


def openai_chunk(text: str, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
    return b"data: " + orjson.dumps({"choices": [choice]}) + b"\n\n"


@both_loops
async def test_served_streams_leave_no_reference_cycles() -> None:
    """Everything a streamed request builds is freed by reference counting; cycles would
    wait for the garbage collector, which runs rarely here (`settle_heap`)."""

    async def handle(conn: Conn) -> None:
        while await conn.request() is not None:
            await conn.send(HEAD + chunk(openai_chunk("a")))
            await asyncio.sleep(0.01)  # the rest is pushed
            rest = openai_chunk("b") + openai_chunk("", "stop") + b"data: [DONE]\n\n"
            await conn.send(chunk(rest) + b"0\r\n\r\n")

    async with Server(handle) as srv:
        model = {"name": "m", "backend": "vllm", "url": srv.url + "/v1"}
        gateway = Gateway(load_config(data={"models": [model]}, environ={}))
        gateway.observability.access_enabled = False
        await gateway.start()
        endpoint = CompletionsEndpoint(gateway, "chat")
        body = orjson.dumps(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        )
        gc.collect()
        gc.disable()
        try:
            gc.set_debug(gc.DEBUG_SAVEALL)
            for _ in range(3):
                reply = PushingReply()
                await endpoint.serve({}, body, reply)
                assert reply.body.count(b'"content":"b"') == 1, reply.body
            gc.collect()
            left = {type(o).__name__ for o in gc.garbage}
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
            await gateway.close()
    ours = {"InferenceRequest", "Delivery", "PushedChunks", "StreamEncoder", "PushingReply"}
    assert not left & ours, left & ours
