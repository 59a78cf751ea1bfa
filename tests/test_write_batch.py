"""Writes batched to the end of the loop turn (`inferbridge.write_batch`): when they wait,
that they keep their order, that a close waits behind what is pending; and, on real sockets,
that concurrent requests through `inferbridge serve`'s protocol are batched and intact."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import pytest

from inferbridge.cli import HTTP_PROTOCOL
from inferbridge.write_batch import BatchedTransport, WriteBatch, batch_for
from tests.server import InferbridgeServer


class Wire:
    """What every fake transport wrote or did, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []


class FakeTransport:
    def __init__(self, name: str, wire: Wire) -> None:
        self.name = name
        self.wire = wire
        self.closing = False
        self.fail = False

    def write(self, data: bytes) -> None:
        if self.fail:
            raise RuntimeError("transport broke")
        self.wire.log.append((self.name, data))

    def close(self) -> None:
        self.closing = True
        self.wire.log.append((self.name, "close"))

    def abort(self) -> None:
        self.closing = True
        self.wire.log.append((self.name, "abort"))

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


async def test_one_request_in_flight_writes_at_once() -> None:
    batch = WriteBatch(asyncio.get_running_loop())
    wire = Wire()
    a = FakeTransport("a", wire)
    batch.busy = 1
    batch.write(a, b"1")  # type: ignore[arg-type]
    assert wire.log == [("a", b"1")]
    assert not batch.pending


async def test_writes_wait_for_the_end_of_the_turn_in_order() -> None:
    batch = WriteBatch(asyncio.get_running_loop())
    wire = Wire()
    a, b = FakeTransport("a", wire), FakeTransport("b", wire)
    batch.busy = 3
    for transport, data in ((a, b"1"), (b, b"x"), (a, b"2"), (b, b"y")):
        batch.write(transport, data)  # type: ignore[arg-type]
    assert wire.log == []  # nothing left yet
    batch.busy = 1  # a write with something pending still queues behind it
    batch.write(a, b"3")  # type: ignore[arg-type]
    assert wire.log == []
    await asyncio.sleep(0)
    assert wire.log == [("a", b"1"), ("b", b"x"), ("a", b"2"), ("b", b"y"), ("a", b"3")]
    assert not batch.pending


def batched(*names: str) -> tuple[Wire, list[BatchedTransport]]:
    """Batched transports on one fresh batch with several requests in flight (so writes
    wait for the end of the turn), and the wire they all write to."""
    batch = WriteBatch(asyncio.get_running_loop())
    batch.busy = 2
    wire = Wire()
    transports = [BatchedTransport(FakeTransport(n, wire), batch) for n in names]  # type: ignore[arg-type]
    return wire, transports


async def test_a_close_waits_behind_what_is_pending() -> None:
    wire, (a, b) = batched("a", "b")
    a.write(b"response")
    b.write(b"other")
    a.close()
    assert wire.log == []  # the batch is not split by the close
    assert a.is_closing() and not b.is_closing()
    a.write(b"late")  # after its close: dropped
    a.close()  # once is enough
    b.write(b"more")
    await asyncio.sleep(0)
    assert wire.log == [("a", b"response"), ("b", b"other"), ("a", "close"), ("b", b"more")]


async def test_a_close_with_nothing_pending_is_at_once() -> None:
    wire, (a,) = batched("a")
    a.close()
    assert wire.log == [("a", "close")]


async def test_abort_sends_what_is_pending_first() -> None:
    wire, (a, b) = batched("a", "b")
    a.write(b"response")
    b.write(b"more")
    b.abort()
    assert wire.log == [("a", b"response"), ("b", b"more"), ("b", "abort")]
    await asyncio.sleep(0)  # the flush already scheduled finds nothing left
    assert len(wire.log) == 3


async def test_closed_or_broken_transports_are_skipped() -> None:
    batch = WriteBatch(asyncio.get_running_loop())
    wire = Wire()
    gone, broken, fine = (FakeTransport(n, wire) for n in ("gone", "broken", "fine"))
    batch.busy = 2
    for transport in (gone, broken, fine):
        batch.write(transport, b"data")  # type: ignore[arg-type]
    gone.closing = True
    broken.fail = True
    await asyncio.sleep(0)
    assert wire.log == [("fine", b"data")]


async def test_batched_transport_passes_the_rest_through() -> None:
    wire = Wire()
    inner = FakeTransport("a", wire)
    wrapped = BatchedTransport(inner, batch_for(asyncio.get_running_loop()))  # type: ignore[arg-type]
    assert wrapped.get_extra_info("peername") == ("127.0.0.1", 1)
    assert wrapped.is_closing() is False
    assert wrapped.name == "a"  # anything else, from the transport
    wrapped.writelines([b"a", b"b"])
    assert wire.log == [("a", b"ab")]


async def test_one_batch_per_loop() -> None:
    loop = asyncio.get_running_loop()
    assert batch_for(loop) is batch_for(loop)
    other = asyncio.new_event_loop()
    try:
        assert batch_for(other) is not batch_for(loop)
    finally:
        other.close()


# -- on the wire ------------------------------------------------------------------------------

CONFIG: dict[str, Any] = {
    "models": [
        {"name": "slow", "backend": "echo", "delay": 0.02},
        {"name": "echo", "backend": "echo"},
    ]
}


@pytest.fixture
def flushes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of writes each flush sent (the server's loop runs in another thread)."""
    flushed: list[int] = []
    original = WriteBatch.flush

    def counting_flush(self: WriteBatch) -> None:
        flushed.append(len(self.pending))
        original(self)

    monkeypatch.setattr(WriteBatch, "flush", counting_flush)
    return flushed


@pytest.fixture(scope="module")
def server():
    with InferbridgeServer(CONFIG, http=HTTP_PROTOCOL) as running:
        yield running


async def test_concurrent_requests_are_batched_and_intact(server, flushes) -> None:
    async def one(client: httpx.AsyncClient, i: int, stream: bool) -> str:
        body = {
            "model": "slow",
            "messages": [{"role": "user", "content": f"request {i} says hello"}],
            "stream": stream,
        }
        if not stream:
            r = await client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            return str(r.json()["choices"][0]["message"]["content"])
        text = []
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    delta = httpx.Response(200, content=line[6:]).json()["choices"][0]["delta"]
                    text.append(delta.get("content") or "")
        return "".join(text)

    limits = httpx.Limits(max_connections=40)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=10) as client:
        answers = await asyncio.gather(*(one(client, i, i % 2 == 0) for i in range(40)))
    for i, answer in enumerate(answers):
        assert f"request {i} says hello" in answer
    assert any(n > 1 for n in flushes), flushes  # several writes did leave together


def test_pipelined_and_closing_answers_keep_their_order_while_batched(server, flushes) -> None:
    """With slow streams in flight on other connections (so writes are batched), pipelined
    answers still come in order, and an HTTP/1.0 or `Connection: close` answer (whole or
    streamed) arrives whole before the close."""
    from tests.test_transports import Conn, answer, chat, request, streamed_text

    stop = threading.Event()

    def keep_busy() -> None:
        body = chat("a slow stream " * 3, model="slow", stream=True)
        while not stop.is_set():
            httpx.post(server.url + "/v1/chat/completions", json=body, timeout=10)

    busy = [threading.Thread(target=keep_busy) for _ in range(6)]
    for thread in busy:
        thread.start()
    try:
        time.sleep(0.2)
        for round_ in range(5):
            with Conn(server) as conn:
                conn.send(
                    request(chat(f"first {round_}", model="slow"))
                    + request(chat(f"second {round_}", stream=True))
                    + request({"model": "echo", "prompt": f"third {round_}"}, "/v1/completions")
                )
                first, second, third = (conn.read_response() for _ in range(3))
            assert answer(first) == f"first {round_}"
            assert streamed_text(second) == f"second {round_}"
            assert third.json()["choices"][0]["text"] == f"third {round_}"
            with Conn(server) as conn:
                conn.send(request(chat(f"closing {round_}"), version="1.0"))
                closing = conn.read_response()
                assert conn.closed_by_server()
            assert answer(closing) == f"closing {round_}"
            close = (("connection", "close"),)
            with Conn(server) as conn:  # its close waits in the batch behind the answer
                conn.send(request(chat(f"close {round_}"), headers=close))
                whole = conn.read_response()
                assert conn.closed_by_server()
            assert answer(whole) == f"close {round_}"
            assert whole.header("connection") == "close"
            with Conn(server) as conn:
                conn.send(request(chat(f"close {round_}", stream=True), headers=close))
                streamed = conn.read_response()
                assert conn.closed_by_server()
            assert streamed_text(streamed) == f"close {round_}"
    finally:
        stop.set()
        for thread in busy:
            thread.join(15)
    assert any(n > 1 for n in flushes), flushes


def test_a_batch_does_not_keep_its_loop_alive() -> None:
    import gc
    import weakref

    loop = asyncio.new_event_loop()
    batch_for(loop)
    ref = weakref.ref(loop)
    loop.close()
    del loop
    gc.collect()
    assert ref() is None


def test_a_closed_loop_writes_at_once() -> None:
    loop = asyncio.new_event_loop()
    batch = WriteBatch(loop)
    loop.close()
    wire = Wire()
    batch.busy = 5
    batch.write(FakeTransport("a", wire), b"late")  # type: ignore[arg-type]
    assert wire.log == [("a", b"late")]
