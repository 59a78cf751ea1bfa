"""A fast fake OpenAI-compatible upstream for the benchmark (never the bottleneck).

A raw `asyncio.Protocol` HTTP/1.1 server on uvloop that answers
`POST /v1/chat/completions` (any path ending in `/chat/completions`) from bytes built once at
start-up:

- non-streaming: one `chat.completion` object with `Content-Length`;
- streaming (`"stream": true` in the body): `Transfer-Encoding: chunked`, N
  `chat.completion.chunk` events (the first also carries the assistant role, the last the
  finish reason "stop"), then `data: [DONE]`. Every chunk is written with its own socket
  write: on the next event-loop turn (so concurrent streams interleave, as they do behind a
  real inference server), or `delay_ms` later when a delay is set.

The request is parsed just enough: the header block, `Content-Length`, `Connection: close`
and a substring test for `"stream":true`. Keep-alive is supported; requests pipelined
behind a running stream wait for it. `GET /health` answers `{"status":"ok"}`.

One process can serve several profiles, one per port:

    python bench/fake_upstream.py --listen 8101:64:0 --listen 8102:20:50

serves 64-chunk streams without delay on 8101 and 20-chunk streams 50 ms apart on 8102.
The server stops by itself after `--max-seconds`, or when its parent process goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from typing import cast

import orjson

MODEL = "bench"
CREATED = 1_700_000_000
ANSWER = (
    "Hello! This is a fixed answer from the inferbridge benchmark's fake upstream, "
    "long enough to look like a short real reply."
)


def token(i: int) -> str:
    """The text of content chunk `i` of a stream (what clients verify)."""
    return f"t{i} "


def expected_text(chunks: int) -> str:
    """The full streamed answer of a `chunks`-chunk stream."""
    return "".join(token(i) for i in range(chunks))


def completion_body() -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": CREATED,
            "model": MODEL,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": ANSWER, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 28, "total_tokens": 40},
        }
    )


def stream_events(chunks: int) -> list[bytes]:
    """The SSE events of one stream: `chunks` content chunks, then `[DONE]`."""
    events = []
    for i in range(chunks):
        delta: dict[str, str] = {"content": token(i)}
        if i == 0:
            delta = {"role": "assistant", **delta}
        chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": MODEL,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": "stop" if i == chunks - 1 else None,
                }
            ],
        }
        events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def http_chunk(data: bytes) -> bytes:
    """One piece of a `Transfer-Encoding: chunked` body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


@dataclass(frozen=True)
class Profile:
    """What one listening port serves."""

    port: int
    chunks: int = 64
    delay_ms: float = 0.0


class Prebuilt:
    """Every byte a profile ever sends, built once."""

    def __init__(self, profile: Profile) -> None:
        body = completion_body()
        self.delay = profile.delay_ms / 1000.0
        self.complete = (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        health = b'{"status":"ok"}'
        self.health = (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(health), health)
        )
        self.not_found = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
        head = (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        pieces = [http_chunk(e) for e in stream_events(profile.chunks)]
        pieces[-1] += b"0\r\n\r\n"  # [DONE] and the end of the chunked body together
        pieces[0] = head + pieces[0]
        self.stream_pieces = pieces


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: parse requests, answer from prebuilt bytes."""

    __slots__ = (
        "_buf",
        "_close_after",
        "_handle",
        "_piece",
        "_pre",
        "_streaming",
        "_transport",
        "loop",
    )

    def __init__(self, pre: Prebuilt, loop: asyncio.AbstractEventLoop) -> None:
        self._pre = pre
        self.loop = loop
        self._buf = b""
        self._transport: asyncio.Transport | None = None
        self._streaming = False
        self._piece = 0
        self._handle: asyncio.Handle | None = None
        self._close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buf = self._buf + data if self._buf else data
        if not self._streaming:
            self._process()

    def _process(self) -> None:
        """Answer every complete request in the buffer (stops at a started stream)."""
        transport = self._transport
        while transport is not None and not self._streaming:
            buf = self._buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = buf[:end]
            lower = head.lower()
            length = 0
            pos = lower.find(b"\r\ncontent-length:")
            if pos >= 0:
                stop = lower.find(b"\r\n", pos + 2)
                length = int(lower[pos + 17 : stop if stop >= 0 else len(lower)])
            total = end + 4 + length
            if len(buf) < total:
                return
            body = buf[end + 4 : total]
            self._buf = buf[total:]
            close = b"\r\nconnection: close" in lower
            line = head[: head.find(b"\r\n")] if b"\r\n" in head else head
            if line.startswith(b"POST ") and b"/chat/completions" in line:
                if b'"stream":true' in body or b'"stream": true' in body:
                    self._start_stream(close)
                    return
                transport.write(self._pre.complete)
            elif line.startswith(b"GET /health"):
                transport.write(self._pre.health)
            else:
                transport.write(self._pre.not_found)
            if close:
                transport.close()
                return

    def _start_stream(self, close: bool) -> None:
        self._streaming = True
        self._piece = 0
        self._close_after = close
        self._next_piece()

    def _next_piece(self) -> None:
        self._handle = None
        transport = self._transport
        if transport is None:
            return
        pieces = self._pre.stream_pieces
        transport.write(pieces[self._piece])
        self._piece += 1
        if self._piece < len(pieces):
            delay = self._pre.delay
            if delay > 0:
                self._handle = self.loop.call_later(delay, self._next_piece)
            else:
                self._handle = self.loop.call_soon(self._next_piece)
            return
        self._streaming = False
        if self._close_after:
            transport.close()
        elif self._buf:
            self._process()


def parse_listen(spec: str) -> Profile:
    """`PORT[:CHUNKS[:DELAY_MS]]`."""
    parts = spec.split(":")
    port = int(parts[0])
    chunks = int(parts[1]) if len(parts) > 1 and parts[1] else 64
    delay = float(parts[2]) if len(parts) > 2 and parts[2] else 0.0
    if chunks < 1:
        raise argparse.ArgumentTypeError("a stream needs at least one chunk")
    return Profile(port, chunks, delay)


async def serve(profiles: list[Profile], host: str, max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for profile in profiles:
        pre = Prebuilt(profile)
        server = await loop.create_server(
            lambda pre=pre: UpstreamProtocol(pre, loop),
            host,
            profile.port,
            backlog=4096,
            reuse_address=True,
        )
        servers.append(server)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()
    print(
        "fake upstream ready on "
        + ", ".join(
            f"{host}:{p.port} ({p.chunks} chunks, {p.delay_ms:g} ms apart)" for p in profiles
        ),
        flush=True,
    )
    deadline = loop.time() + max_seconds
    while not stop.is_set() and loop.time() < deadline and os.getppid() == parent:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--listen",
        action="append",
        type=parse_listen,
        metavar="PORT[:CHUNKS[:DELAY_MS]]",
        help="a port and what its streams look like (repeatable; default 8101:64:0)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=3600.0,
        help="stop by itself after this long (default 3600)",
    )
    args = parser.parse_args(argv)
    profiles = args.listen or [Profile(8101)]
    try:
        import uvloop
    except ImportError:  # still correct, only slower
        print("uvloop not installed: using the default asyncio loop", file=sys.stderr)
        asyncio.run(serve(profiles, args.host, args.max_seconds))
    else:
        uvloop.run(serve(profiles, args.host, args.max_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
