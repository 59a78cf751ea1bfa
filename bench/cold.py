"""What the pieces of a streamed request's path cost cold: after the core idled, as at
concurrency 1.

At concurrency 1 the proxy's core idles twice per request: while the client turns around
and while the upstream works. On this VM, code that runs right after such a wait is 2-4x
slower than the same code in a tight loop (its caches were lost meanwhile), so what a
piece costs on the way to the first token is not what a hot microbenchmark says. This
tool times each piece both ways, in one process: `hot` back to back, `cold` after a
`--gap` of sleep before each call (default 200 µs, about the fake upstream's answer time
in (c)). Medians of `--n` calls each.

    .venv/bin/python bench/cold.py
    taskset -c 0 .venv/bin/python bench/cold.py --gap 0.00005 --n 3000

The pieces, in request order: the body parsed and validated into a request; the model
resolved and the routed stream opened; a deployment picked (usable, slot taken and given
back); the request translated for the upstream (copy, the entry's policy, the upstream
body encoded); the stream's encoder and opening chunk; and the upstream's first read
(three chunks, as the fake upstream's first read holds at concurrency 1) parsed into
events. Compare two versions by running it in each tree (it imports its own `src/`): the
machine's speed moves both columns alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import orjson  # noqa: E402
from fake_upstream import stream_events  # noqa: E402
from run import CHAT_BODY  # noqa: E402

from inferbridge.api.protocol import build_request, parse_body  # noqa: E402
from inferbridge.api.responses import StreamEncoder  # noqa: E402
from inferbridge.backends.openai_compat import ChunkParser  # noqa: E402
from inferbridge.config import load_config  # noqa: E402
from inferbridge.gateway import Gateway  # noqa: E402
from inferbridge.request import RouteInfo  # noqa: E402

BODY = orjson.dumps({**orjson.loads(CHAT_BODY), "stream": True})


def pieces() -> dict[str, Callable[[], object]]:
    config = load_config(
        data={
            "models": [
                {"name": "bench", "backend": "openai-compatible", "url": "http://127.0.0.1:9/v1"}
            ]
        },
        environ={},
    )
    gateway = Gateway(config)
    router = gateway.router
    group = router.resolve("bench")
    backend = group.deployments[0].backend
    request = build_request("chat", parse_body(BODY))
    first_read = b"".join(stream_events(64)[:3])

    def pick() -> None:
        dep = router.usable(group, router.clock())[0]
        dep.limit.take()
        router.release(dep)

    def translate() -> bytes:  # what an attempt does before the upstream write
        copy = request.copy()
        backend.prepare(copy)
        return orjson.dumps(backend.upstream_body(copy))  # type: ignore[attr-defined]

    def encoder() -> bytes:
        return StreamEncoder(request, 1).opening()

    return {
        "body parsed and validated": lambda: build_request("chat", parse_body(BODY)),
        "model resolved, stream opened": lambda: gateway.open_stream(request, RouteInfo()),
        "deployment picked": pick,
        "request translated": translate,
        "encoder and opening chunk": encoder,
        "first read (3 chunks) parsed": lambda: parser(backend).feed(first_read),
    }


def parser(backend: object) -> ChunkParser:
    return ChunkParser(backend, True)  # type: ignore[arg-type]


def median_us(fn: Callable[[], object], n: int, gap: float) -> float:
    times = []
    sleep, now = time.sleep, time.perf_counter_ns
    for _ in range(n):
        if gap:
            sleep(gap)
        start = now()
        fn()
        times.append(now() - start)
    return statistics.median(times) / 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="calls per piece and way")
    parser.add_argument("--gap", type=float, default=0.0002, help="idle seconds before a cold call")
    args = parser.parse_args()
    rows = []
    for name, fn in pieces().items():
        hot = median_us(fn, args.n, 0.0)
        cold = median_us(fn, args.n, args.gap)
        rows.append((name, hot, cold))
    print(f"{'piece':<32} {'hot µs':>8} {'cold µs':>8} {'cold/hot':>8}")
    for name, hot, cold in rows:
        print(f"{name:<32} {hot:8.1f} {cold:8.1f} {cold / hot:8.1f}")
    hot_sum, cold_sum = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"{'sum':<32} {hot_sum:8.1f} {cold_sum:8.1f} {cold_sum / hot_sum:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
