"""Harness for fake upstream servers: an aiohttp app on a real 127.0.0.1 socket, in a thread.

Every fake backend in this folder is a subclass of `FakeServer`. It runs its own event loop
in a background thread so that it can be driven from synchronous tests (the official SDKs)
and from async tests alike, records every request it receives, and exposes helpers to write
bytes at awkward boundaries or to drop the connection mid-stream.

    with FakeOpenAI() as fake:
        fake.url            # "http://127.0.0.1:PORT"
        fake.requests       # [RecordedRequest(method, path, headers, body, json)]
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class Behaviour:
    """What the next requests should see; tests mutate it between calls."""

    status: int = 200
    error_body: Any = None
    delay_first_byte: float = 0.0
    delay_between_chunks: float = 0.0
    drop_after_chunks: int | None = None
    split_every: int | None = None  # write the stream in pieces of this many bytes
    extra: dict[str, Any] = field(default_factory=dict)


class FakeServer:
    """Base class: subclasses implement `routes()` returning aiohttp route definitions."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.behaviour = Behaviour()
        self.open_streams = 0  # streams currently being written (for disconnect tests)
        self.closed_streams = 0  # streams whose client went away before the end
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self.port = 0

    # -- subclass API ---------------------------------------------------------------
    def routes(self) -> list[web.RouteDef]:  # pragma: no cover - abstract
        raise NotImplementedError

    async def record(self, request: web.Request) -> RecordedRequest:
        body = await request.read()
        rec = RecordedRequest(
            request.method, request.path, dict(request.query), dict(request.headers), body
        )
        self.requests.append(rec)
        return rec

    async def write_stream(
        self,
        request: web.Request,
        pieces: list[bytes],
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> web.StreamResponse:
        """Write `pieces` as a streamed body, honouring the split/delay/drop behaviour."""
        b = self.behaviour
        resp = web.StreamResponse(
            status=200, headers={"Content-Type": content_type, **(headers or {})}
        )
        if b.delay_first_byte:
            await asyncio.sleep(b.delay_first_byte)
        await resp.prepare(request)
        self.open_streams += 1
        written = False
        try:
            data_pieces = pieces
            if b.split_every:
                blob = b"".join(pieces)
                data_pieces = [
                    blob[i : i + b.split_every] for i in range(0, len(blob), b.split_every)
                ]
            for i, piece in enumerate(data_pieces):
                if b.drop_after_chunks is not None and i >= b.drop_after_chunks:
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                await resp.write(piece)
                if b.delay_between_chunks:
                    await asyncio.sleep(b.delay_between_chunks)
                elif b.split_every:
                    await asyncio.sleep(0.001)  # let each piece leave as its own segment
            written = True
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            if written:  # the client hung up after the last byte: a normal end
                return resp
            self.closed_streams += 1
            raise
        finally:
            self.open_streams -= 1
        return resp

    def error_response(self) -> web.Response:
        b = self.behaviour
        body = b.error_body if b.error_body is not None else {"error": "fake failure"}
        if isinstance(body, bytes | str):
            return web.Response(status=b.status, body=body)
        return web.json_response(body, status=b.status)

    # -- lifecycle ------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeServer:
        self._thread = threading.Thread(target=self._run, daemon=True, name=type(self).__name__)
        self._thread.start()
        _running.add(self)
        if not self._started.wait(10):
            raise RuntimeError(f"{type(self).__name__} did not start")
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.run_forever()
        pending = asyncio.all_tasks(self._loop)
        for task in pending:  # requests still being served when the test ended
            task.cancel()
        if pending:
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.run_until_complete(self._runner.cleanup() if self._runner else asyncio.sleep(0))
        self._loop.close()

    async def _serve(self) -> None:
        app = web.Application()
        # A subclass may redefine a route of its parent's: the last definition wins.
        routes = {(r.method, r.path): r for r in self.routes()}
        app.add_routes(list(routes.values()))
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()

    def stop(self) -> None:
        _running.discard(self)
        if self._loop and self._thread and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def call(self, coro: Any) -> Any:
        """Run a coroutine on the fake's loop from another thread."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def reset(self) -> None:
        self.requests.clear()
        self.behaviour = Behaviour()
        self.open_streams = 0
        self.closed_streams = 0

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.stop()


_running: set[FakeServer] = set()


@atexit.register
def _stop_forgotten_fakes() -> None:
    """Fakes a test never stopped: end their loops cleanly instead of at interpreter exit."""
    for fake in list(_running):
        with contextlib.suppress(Exception):
            fake.stop()


def sse(payload: Any) -> bytes:
    """One SSE `data:` event with a JSON (or literal string) payload."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def ndjson(payload: Any) -> bytes:
    return (json.dumps(payload, separators=(",", ":")) + "\n").encode()
