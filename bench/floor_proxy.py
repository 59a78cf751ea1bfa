"""The Python floor: the least a Python proxy built from inferbridge's parts does.

`run.py --reference floor` measures it in the proxy's seat, beside nginx and inferbridge.
It has what any Python proxy in front of these upstreams needs and nothing more: uvloop,
httptools for the client's requests, aiohttp's client to the upstream (one keep-alive
session per route, as inferbridge has one per deployment) and orjson. A non-streamed
request and its answer are each parsed and encoded once; a stream is relayed as the
upstream wrote it, each socket read written to the client at once as one HTTP chunk. No
validation, routing, retries, limits, metrics, logs, request ids, timeouts or pipelining.

So, on the same machine and in the same rounds: what inferbridge costs beyond the floor is
what its features cost, and what the floor costs beyond nginx is what Python costs.

    python bench/floor_proxy.py --route 8201=http://127.0.0.1:8101 --route 8202=...

Each `--route PORT=ORIGIN` listens on 127.0.0.1:PORT and forwards every request's path
unchanged to ORIGIN (as `proxy_pass` does in the nginx reference).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import aiohttp
import httptools
import orjson
import uvloop

HOST = "127.0.0.1"
HEALTH = b'{"status":"ok"}'
JSON_HEADERS = {"content-type": "application/json"}
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


def whole(status: int, body: bytes) -> bytes:
    return b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (
        status,
        len(body),
        body,
    )


class ClientConnection(asyncio.Protocol):
    """One client connection: one request at a time, relayed to the route's origin."""

    def __init__(self, upstream: aiohttp.ClientSession) -> None:
        self.upstream = upstream
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.url = b""
        self.body: list[bytes] = []
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.parser.get_method() == b"GET":
            found = self.url == b"/health"
            self.transport.write(whole(200, HEALTH) if found else whole(404, b"{}"))
            return
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.task = asyncio.get_running_loop().create_task(self.relay(self.url.decode(), body))

    def write_chunk(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    async def relay(self, path: str, body: bytes) -> None:
        request = orjson.loads(body)
        stream = request.get("stream") is True
        data = orjson.dumps(request)
        try:
            async with self.upstream.post(path, data=data, headers=JSON_HEADERS) as resp:
                if not stream or resp.status != 200:
                    answer = orjson.dumps(orjson.loads(await resp.read()))
                    self.transport.write(whole(resp.status, answer))
                    return
                self.transport.write(SSE_HEAD)
                async for data in resp.content.iter_any():
                    self.write_chunk(data)
                self.transport.write(b"0\r\n\r\n")
        finally:
            self.task = None


async def serve(routes: list[tuple[int, str]]) -> None:
    loop = asyncio.get_running_loop()
    for port, origin in routes:
        # no connection limit, as nginx has none: 1,000 slow streams need 1,000 connections
        client = aiohttp.ClientSession(origin, connector=aiohttp.TCPConnector(limit=0))
        await loop.create_server(lambda c=client: ClientConnection(c), HOST, port, backlog=2048)
    print(f"floor proxy ready: {routes}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def route(spec: str) -> tuple[int, str]:
    port, _, origin = spec.partition("=")
    if not port.isdigit() or not origin.startswith("http://"):
        raise argparse.ArgumentTypeError("expected PORT=http://HOST:PORT")
    return int(port), origin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--route", type=route, action="append", required=True)
    uvloop.run(serve(parser.parse_args().route))


if __name__ == "__main__":
    main()
