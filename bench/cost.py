"""Deterministic cost of one proxied request: the proxy's Python, in process, no load tool.

The wall-clock benchmark (`run.py`) is the truth about latency and throughput, but on a
noisy machine its rounds vary by 20-30%, too much to judge a change worth 5%. This tool
runs the fast fake upstream (`fake_upstream.py`) and inferbridge's gateway in one uvloop
loop and sends requests one at a time straight into the completions handler, through a
`Reply` that only counts bytes (no client socket). The upstream hop is a real loopback
socket through inferbridge's HTTP client.

    .venv/bin/python bench/cost.py                      # µs per request, both modes
    .venv/bin/python bench/cost.py --callgrind          # instructions per request

`--callgrind` runs the measurement twice under `valgrind --tool=callgrind` (N and 5N
requests) and prints the difference per request: start-up and warm-up cancel out, the
count repeats to within ~0.1% from run to run, and it includes the fake upstream's own
small, fixed share. Compare two versions of `src/` with it; do not read it as a latency.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import orjson  # noqa: E402
import uvloop  # noqa: E402
from fake_upstream import Prebuilt, Profile, UpstreamProtocol  # noqa: E402
from run import CHAT_BODY  # noqa: E402

from inferbridge.api.handlers import CompletionsEndpoint, Reply  # noqa: E402
from inferbridge.config import load_config  # noqa: E402
from inferbridge.gateway import Gateway  # noqa: E402
from inferbridge.observability import AccessLogWriter  # noqa: E402

CHUNKS = 64
BODY = orjson.loads(CHAT_BODY)  # what run.py's clients send


class Discard:
    """A binary stream that drops what is written (the access log's destination here)."""

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass


class CountingReply(Reply):
    """Takes the response and keeps only its size and status (pushed chunks too, like
    inferbridge's own HTTP transport)."""

    __slots__ = ("size", "status")
    can_push = True

    def __init__(self) -> None:
        super().__init__()
        self.size = 0
        self.status = 0

    async def whole(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.size += len(body)

    async def start(self, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = 200
        self.size += len(body)

    async def chunk(self, body: bytes) -> None:
        self.size += len(body)

    async def end(self, body: bytes) -> None:
        self.size += len(body)

    def write_now(self, body: bytes) -> bool:
        self.size += len(body)
        return True

    def when_writable(self, resume: Callable[[], None]) -> None:
        resume()


async def run(mode: str, requests: int, warmup: int) -> float:
    """Seconds per request of `mode` ("nonstream" or "stream"), after `warmup` requests."""
    loop = asyncio.get_running_loop()
    pre = Prebuilt(Profile(port=0, chunks=CHUNKS))
    server = await loop.create_server(lambda: UpstreamProtocol(pre, loop), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = load_config(
        data={
            "server": {"access_log": True},
            "models": [
                {
                    "name": "bench",
                    "backend": "openai-compatible",
                    "url": f"http://127.0.0.1:{port}/v1",
                    "upstream_model": "bench",
                }
            ],
        },
        environ={},
    )
    gateway = Gateway(config)
    gateway.observability.access = AccessLogWriter(Discard())  # on, as in production
    gateway.observability.start()
    await gateway.start()
    endpoint = CompletionsEndpoint(gateway, "chat")
    body = orjson.dumps({**BODY, "stream": mode == "stream"})
    headers = {b"content-type": b"application/json", b"content-length": b"%d" % len(body)}

    async def one() -> None:
        reply = CountingReply()
        await endpoint.serve(headers, body, reply)
        if reply.status != 200:
            raise SystemExit(f"request failed with HTTP {reply.status}")

    for _ in range(warmup):
        await one()
    start = time.perf_counter()
    for _ in range(requests):
        await one()
    elapsed = time.perf_counter() - start
    await gateway.close()
    gateway.observability.stop()
    server.close()
    return elapsed / requests


def measure(mode: str, requests: int, warmup: int) -> float:
    return uvloop.run(run(mode, requests, warmup))


def callgrind(mode: str, requests: int) -> float:
    """Instructions per request: the difference between runs of N and 5N requests."""
    counts = []
    for n in (requests, 5 * requests):
        proc = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--callgrind-out-file=/dev/null",
                sys.executable,
                __file__,
                "--mode",
                mode,
                "--requests",
                str(n),
                "--quiet",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        found = re.search(r"Collected : (\d+)", proc.stderr)
        if found is None:
            raise SystemExit(f"no instruction count in valgrind's output:\n{proc.stderr}")
        counts.append(int(found.group(1)))
    return (counts[1] - counts[0]) / (4 * requests)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["nonstream", "stream", "both"], default="both")
    parser.add_argument("--requests", type=int, default=0, help="default: 2000, 200 callgrind")
    parser.add_argument("--callgrind", action="store_true", help="count instructions instead")
    parser.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    modes = ["nonstream", "stream"] if args.mode == "both" else [args.mode]
    for mode in modes:
        per = f"per request ({CHUNKS} chunks)" if mode == "stream" else "per request"
        if args.callgrind:
            n = args.requests or 200
            print(f"{mode:9}  {callgrind(mode, n) / 1000:8.1f} k instructions {per}")
        else:
            n = args.requests or 2000
            seconds = measure(mode, n, warmup=0 if args.quiet else min(n, 200))
            if not args.quiet:
                print(f"{mode:9}  {seconds * 1e6:8.1f} µs {per}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
