"""What crossing cores costs on this machine: a loopback TCP round trip, same core vs not.

    python bench/crosscore.py            # ~10 seconds

A one-byte echo server is pinned to core 0 or core 1 and a client on core 1 sends 20,000
one-byte round trips to it, one at a time. Three cases:
- both on core 1 (what the benchmark's "direct" column does: wrk and the fake upstream
  share core 1);
- server on core 0 (what a proxy on core 0 does, four times per proxied request);
- server on core 0 while a lowest-priority busy loop keeps core 0 from going idle.

On this VM the cross-core round trip costs ~130 µs p50 against ~25 µs on one core, and
~65 µs with core 0 kept busy: waking an idle virtual CPU is what costs. That is the floor
under what any proxy adds at concurrency 1 here (see README.md, "The reference columns").
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

HOST = "127.0.0.1"
ROUNDS = 20_000


def serve(port: int) -> None:
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, port))
        listener.listen()
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := conn.recv(64):
            conn.sendall(data)


def round_trips(port: int) -> tuple[float, float]:
    """p50 and p99 of ROUNDS one-byte round trips, in µs."""
    deadline = time.monotonic() + 10
    while True:
        try:
            conn = socket.create_connection((HOST, port))
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(ROUNDS):
            t = time.perf_counter()
            conn.sendall(b"x")
            conn.recv(64)
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def case(label: str, server_core: int, keep_busy: bool) -> None:
    port = free_port()
    children = []
    if keep_busy:
        children.append(
            subprocess.Popen(
                [
                    "taskset",
                    "-c",
                    str(server_core),
                    "nice",
                    "-n",
                    "19",
                    sys.executable,
                    "-c",
                    "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass",
                ]
            )
        )
    children.append(
        subprocess.Popen(
            ["taskset", "-c", str(server_core), sys.executable, __file__, "--serve", str(port)]
        )
    )
    try:
        p50, p99 = round_trips(port)
        print(f"{label:<46} p50 {p50:7.1f} µs   p99 {p99:7.1f} µs", flush=True)
    finally:
        for child in children:
            child.kill()
            child.wait()


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]))
        return 0
    if (os.cpu_count() or 0) < 2:
        print("needs 2 cores")
        return 2
    os.sched_setaffinity(0, {1})
    case("client core 1, server core 1", 1, False)
    case("client core 1, server core 0", 0, False)
    case("client core 1, server core 0, core 0 kept busy", 0, True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
