"""inferbridge's benchmark: one command, "direct" and "inferbridge" side by side.

    .venv/bin/python bench/run.py --quick          # ~2 minutes
    .venv/bin/python bench/run.py                  # full rounds (~7 minutes)
    .venv/bin/python bench/run.py --soak --soak-minutes 10
    .venv/bin/python bench/ab.py --base HEAD~3     # two versions side by side (ab.py)

Starts `bench/fake_upstream.py` and `python -m inferbridge serve` in front of it, pins the
proxy to core 0 and everything else (fake upstream, wrk, the streaming client, this script)
to core 1, then runs every phase in alternating rounds (direct, inferbridge, direct, ...)
and prints one Markdown table of medians. See bench/README.md for what each figure means.
Two references are measured in the proxy's seat in the same rounds (`--reference`): nginx,
when installed, as what any proxy pays on this machine, and the Python floor
(`floor_proxy.py`), the least a Python proxy built from inferbridge's parts does.

Load tools: `wrk` (Debian package) with a Lua script for the non-streaming phases, and an
aiohttp client here that verifies every streamed answer (every chunk valid OpenAI JSON,
the exact text, the finish reason, and `data: [DONE]` last) for the streaming phases.
Proxy CPU comes from its own counters (`/proc/<pid>/stat` utime+stime, summed over its
worker processes), read just before and just after each phase.

Everything listens on 127.0.0.1 only, every loop is bounded in time and count, and every
child process is stopped on exit, on Ctrl-C, on SIGTERM, and (via PR_SET_PDEATHSIG) if this
script is killed outright.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from fake_upstream import ANSWER, expected_text  # noqa: E402

PROXY_CORE = 0
LOAD_CORE = 1
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

FAST_CHUNKS = 64
SLOW_CHUNKS = 20
SLOW_DELAY_MS = 50
SLOW_STREAMS = 1000

CHAT_BODY = orjson.dumps(
    {
        "model": "bench",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello to the benchmark."},
        ],
        "max_tokens": 64,
        "temperature": 0.7,
    }
)


def stream_body(model: str) -> bytes:
    data = orjson.loads(CHAT_BODY)
    data["model"] = model
    data["stream"] = True
    return orjson.dumps(data)


# --------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the benchmark dies, however it dies."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def set_priority(pid: int, nice: int) -> None:
    """`nice` for the process and for its autogroup: with the kernel's autogroup scheduling,
    CPU is shared between sessions first, so a process's own nice value alone does not
    lift it above other sessions' work."""
    if not nice:
        return
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    with contextlib.suppress(OSError), open(f"/proc/{pid}/autogroup", "w") as f:
        f.write(str(nice))


class Children:
    """The long-lived processes this run started; each in its own process group."""

    def __init__(self, nice: int = 0) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.nice = nice

    def start(
        self, cmd: list[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                env=env,
                cwd=REPO,
            )
        self.procs.append(proc)
        set_priority(proc.pid, self.nice)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        """SIGTERM the child's process group, then SIGKILL it if it lingers."""
        if proc in self.procs:
            self.procs.remove(proc)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # workers of a multi-process server may outlive their parent for a moment
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc, timeout=5.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------
# /proc counters
# --------------------------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    """`pid` and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of these processes (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return ticks / CLK_TCK


def rss_mb(pids: Iterable[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * PAGE_KB
        except OSError:
            continue
    return total / 1024


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the highest RSS since start or since `reset_peak_rss`."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def reset_peak_rss(pid: int) -> None:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


class CpuMeter:
    """CPU seconds of a process tree, of this process and of reaped children (wrk)."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self._pids = pids

    def snapshot(self) -> tuple[float, float, float]:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (cpu_seconds(self._pids()), me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime)


# --------------------------------------------------------------------------------------
# Targets: one process tree under test, and what it is asked
# --------------------------------------------------------------------------------------
@dataclass
class Target:
    """`direct` (the fake upstream itself) or `inferbridge` (the proxy in front of it)."""

    name: str
    fast_url: str
    slow_url: str
    proc: subprocess.Popen[bytes]
    fast_model: str = "bench"
    slow_model: str = "bench-slow"

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)


# --------------------------------------------------------------------------------------
# wrk (non-streaming phases)
# --------------------------------------------------------------------------------------
REQUEST_HEADERS = {"Content-Type": "application/json"}
"""Headers of every request the benchmark sends (`--api-key` adds Authorization)."""

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  io.write(string.format(
    "BENCHJSON {\\"requests\\":%%d,\\"duration_us\\":%%d,\\"p50\\":%%d,\\"p99\\":%%d," ..
    "\\"mean\\":%%.1f,\\"status\\":%%d,\\"connect\\":%%d,\\"read\\":%%d,\\"write\\":%%d," ..
    "\\"timeout\\":%%d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, summary.errors.status, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout))
end
"""


async def run_wrk(script: Path, url: str, connections: int, seconds: float) -> dict[str, Any]:
    cmd = [
        "taskset",
        "-c",
        str(LOAD_CORE),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=seconds + 60)
    except (asyncio.CancelledError, TimeoutError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    for line in out.decode().splitlines():
        if line.startswith("BENCHJSON "):
            data: dict[str, Any] = json.loads(line[len("BENCHJSON ") :])
            data["errors"] = sum(data[k] for k in ("status", "connect", "read", "write", "timeout"))
            return data
    raise RuntimeError(f"wrk printed no result:\n{out.decode()}")


# --------------------------------------------------------------------------------------
# Streaming client with verification
# --------------------------------------------------------------------------------------
@dataclass
class StreamResult:
    ok: bool
    ttfc: float = 0.0
    total: float = 0.0
    chunks: int = 0
    problem: str = ""


def verify_stream(body: bytes, expected: str) -> tuple[int, str]:
    """(content chunks, problem or ""): every event valid OpenAI chunk JSON, the exact
    text, a "stop" finish reason, and `data: [DONE]` as the last event."""
    events = body.split(b"\n\n")
    if events[-1] != b"":
        return 0, "bytes after the last event"
    events.pop()
    if not events or events[-1] != b"data: [DONE]":
        return 0, "no data: [DONE] at the end"
    text: list[str] = []
    finish = None
    for ev in events[:-1]:
        if not ev.startswith(b"data: "):
            return 0, f"not a data event: {ev[:80]!r}"
        try:
            chunk = orjson.loads(ev[6:])
        except orjson.JSONDecodeError:
            return 0, f"invalid JSON: {ev[:80]!r}"
        if (
            chunk.get("object") != "chat.completion.chunk"
            or "id" not in chunk
            or "created" not in chunk
            or "model" not in chunk
            or not isinstance(chunk.get("choices"), list)
        ):
            return 0, f"not an OpenAI chat.completion.chunk: {ev[:120]!r}"
        for choice in chunk["choices"]:
            delta = choice["delta"]
            content = delta.get("content")
            if content:
                text.append(content)
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
    if "".join(text) != expected:
        return 0, "content differs from what the upstream sent"
    if finish != "stop":
        return 0, f"finish_reason {finish!r}, expected 'stop'"
    return len(text), ""


async def stream_once(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    expected: str,
    abort_after_first: bool = False,
) -> StreamResult:
    start = time.perf_counter()
    first = 0.0
    parts: list[bytes] = []
    try:
        async with session.post(url, data=body, headers=REQUEST_HEADERS) as resp:
            if resp.status != 200:
                return StreamResult(False, problem=f"HTTP {resp.status}")
            async for data in resp.content.iter_any():
                if not first:
                    first = time.perf_counter()
                    if abort_after_first:
                        return StreamResult(True, first - start, first - start)
                parts.append(data)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return StreamResult(False, problem=f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    chunks, problem = verify_stream(b"".join(parts), expected)
    return StreamResult(not problem, first - start, end - start, chunks, problem)


def client_session(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=False),
        timeout=aiohttp.ClientTimeout(total=120),
        auto_decompress=False,
    )


async def streams_for(
    url: str, body: bytes, expected: str, concurrency: int, seconds: float, max_streams: int
) -> tuple[list[StreamResult], float]:
    """Closed loop: `concurrency` clients, each starting its next stream when one ends."""
    results: list[StreamResult] = []
    async with client_session(concurrency) as session:
        # connections made before the clock starts
        await asyncio.gather(
            *(stream_once(session, url, body, expected) for _ in range(concurrency))
        )
        deadline = time.perf_counter() + seconds
        started = 0

        async def worker() -> None:
            nonlocal started
            while time.perf_counter() < deadline and started < max_streams:
                started += 1
                results.append(await stream_once(session, url, body, expected))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - t0


# --------------------------------------------------------------------------------------
# Phases: each returns a dict of figures; CPU measured around the load only
# --------------------------------------------------------------------------------------
@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    wrk_script: Path
    upstream: subprocess.Popen[bytes]
    src: Path
    source: str
    speed: float = 0.0
    loadavg: str = ""
    # results[phase][target] = list of per-round dicts
    results: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)

    def record(self, phase: str, target: str, figures: dict[str, Any]) -> None:
        self.results.setdefault(phase, {}).setdefault(target, []).append(figures)
        shown = ", ".join(f"{k}={_short(v)}" for k, v in figures.items() if not isinstance(v, list))
        print(f"  {phase:<3} {target:<14} {shown}", flush=True)

    def cpu_of(self, target: Target) -> CpuMeter:
        return CpuMeter(target.pids)

    async def measured(self, target: Target, load: Awaitable[Any]) -> tuple[Any, dict[str, float]]:
        """Run `load`; CPU seconds of the target tree, the upstream and the load side."""
        up_pids = process_tree(self.upstream.pid)
        meter = self.cpu_of(target)
        t0 = time.perf_counter()
        before = meter.snapshot()
        up0 = cpu_seconds(up_pids)
        result = await load
        after = meter.snapshot()
        up1 = cpu_seconds(up_pids)
        wall = time.perf_counter() - t0
        return result, {
            "wall": wall,
            "target_cpu": after[0] - before[0],
            "upstream_cpu": up1 - up0,
            "load_cpu": (after[1] - before[1]) + (after[2] - before[2]),
        }

    def cpu_figures(self, target: Target, cpu: dict[str, float], per: float) -> dict[str, Any]:
        """CPU per unit of `per` (µs) for the measured process (proxy, or the upstream
        when measuring direct), and how busy the proxy and the load core were."""
        own = cpu["target_cpu"] if target.name != "direct" else cpu["upstream_cpu"]
        load_core = cpu["load_cpu"] + cpu["upstream_cpu"]  # both pinned to the load core
        return {
            "cpu_us": own / per * 1e6 if per else 0.0,
            "proxy_busy": cpu["target_cpu"] / cpu["wall"] if target.name != "direct" else 0.0,
            "load_core_busy": load_core / cpu["wall"],
        }

    # (a) / (b) -----------------------------------------------------------------------
    async def nonstream(self, phase: str, target: Target, connections: int) -> None:
        seconds = self.args.seconds
        result, cpu = await self.measured(
            target, run_wrk(self.wrk_script, target.fast_url, connections, seconds)
        )
        reqs = result["requests"]
        figures = {
            "rps": reqs / (result["duration_us"] / 1e6),
            "p50_us": float(result["p50"]),
            "p99_us": float(result["p99"]),
            "requests": reqs,
            "errors": result["errors"],
            **self.cpu_figures(target, cpu, reqs),
        }
        self.record(phase, target.name, figures)

    # (c) / (d) -----------------------------------------------------------------------
    async def stream(self, phase: str, target: Target, concurrency: int) -> None:
        body = stream_body(target.fast_model)
        expected = expected_text(self.args.chunks)
        max_streams = 2000 if concurrency == 1 else 1_000_000
        (results, elapsed), cpu = await self.measured(
            target,
            streams_for(
                target.fast_url, body, expected, concurrency, self.args.seconds, max_streams
            ),
        )
        ok = [r for r in results if r.ok]
        chunks = sum(r.chunks for r in ok)
        figures: dict[str, Any] = {
            "streams": len(results),
            "intact": len(ok),
            "streams_s": len(ok) / elapsed,
            "chunks_s": chunks / elapsed,
            "ttfc_p50_us": _pct([r.ttfc for r in ok], 50) * 1e6,
            "total_p50_us": _pct([r.total for r in ok], 50) * 1e6,
            "total_p99_us": _pct([r.total for r in ok], 99) * 1e6,
            **self.cpu_figures(target, cpu, chunks),
        }
        bad = [r.problem for r in results if not r.ok]
        if bad:
            figures["problems"] = sorted(set(bad))[:3]
            print(f"    !! {len(bad)} broken streams: {figures['problems']}")
        self.record(phase, target.name, figures)

    # (e) -----------------------------------------------------------------------------
    async def slow_streams(self, target: Target) -> None:
        body = stream_body(target.slow_model)
        expected = expected_text(SLOW_CHUNKS)
        proxy_pid = target.proc.pid if target.name != "direct" else None
        peak = 0.0
        stop = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, rss_mb(target.pids()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.02)

        async def load() -> tuple[list[StreamResult], float]:
            async with client_session(0) as session:
                t0 = time.perf_counter()
                results = await asyncio.gather(
                    *(
                        stream_once(session, target.slow_url, body, expected)
                        for _ in range(SLOW_STREAMS)
                    )
                )
                return results, time.perf_counter() - t0

        if proxy_pid is not None:
            reset_peak_rss(proxy_pid)
        sampler = asyncio.create_task(sample())
        (results, wall), cpu = await self.measured(target, load())
        stop.set()
        await sampler
        if proxy_pid is not None:
            peak = max(peak, peak_rss_mb(proxy_pid))
        ok = [r for r in results if r.ok]
        chunks = sum(r.chunks for r in ok)
        figures: dict[str, Any] = {
            "intact": len(ok),
            "wall_s": wall,
            "peak_rss_mb": peak,
            "total_p50_us": _pct([r.total for r in ok], 50) * 1e6,
            **self.cpu_figures(target, cpu, chunks),
        }
        bad = [r.problem for r in results if not r.ok]
        if bad:
            figures["problems"] = sorted(set(bad))[:3]
            print(f"    !! {len(bad)} broken streams: {figures['problems']}")
        self.record("e", target.name, figures)


def _pct(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[k]


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


# --------------------------------------------------------------------------------------
# Starting the servers
# --------------------------------------------------------------------------------------
def write_config(tmp: Path, fast_port: int, slow_port: int, options: list[str]) -> Path:
    """The proxy's YAML: two models, `bench` (64-chunk streams) and `bench-slow`; `options`
    are extra `server:` settings given as KEY=VALUE."""
    cfg = tmp / "inferbridge-bench.yaml"
    extra = "".join(
        f"  {k.strip()}: {v.strip()}\n" for k, _, v in (o.partition("=") for o in options)
    )
    cfg.write_text(
        "# generated by bench/run.py\n"
        f"server:\n  host: 127.0.0.1\n  log_level: warning\n{extra}"
        "models:\n"
        f"  - name: bench\n    backend: openai-compatible\n"
        f"    url: http://{HOST}:{fast_port}/v1\n"
        f"  - name: bench-slow\n    backend: openai-compatible\n"
        f"    url: http://{HOST}:{slow_port}/v1\n",
        encoding="utf-8",
    )
    return cfg


def merge_config_extra(cfg: Path, extra: str | None) -> None:
    """`--config-extra FILE`: its sections merged into the generated config (a mapping
    section key by key, `models` appended, anything else replaced)."""
    if not extra:
        return
    import yaml

    data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    more = yaml.safe_load(Path(extra).read_text(encoding="utf-8")) or {}
    for section, value in more.items():
        if section == "models":
            data["models"] = [*data.get("models", []), *value]
        elif isinstance(value, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **value}
        else:
            data[section] = value
    cfg.write_text(
        "# generated by bench/run.py, with " + extra + "\n" + yaml.safe_dump(data),
        encoding="utf-8",
    )


NGINX_CONF = """# generated by bench/run.py: a plain reverse proxy in inferbridge's seat
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 16384;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  fastcgi_temp_path {tmp}/nginx-fastcgi;
  uwsgi_temp_path {tmp}/nginx-uwsgi;
  scgi_temp_path {tmp}/nginx-scgi;
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_buffering off;
  upstream fast {{ server {host}:{fast_up}; keepalive 256; }}
  upstream slow {{ server {host}:{slow_up}; keepalive 256; }}
  server {{ listen {host}:{fast}; location / {{ proxy_pass http://fast; }} }}
  server {{ listen {host}:{slow}; location / {{ proxy_pass http://slow; }} }}
}}
"""


def references_wanted(chosen: list[str] | None) -> list[str]:
    """The reference columns to measure (`--reference`, repeatable): by default nginx when
    it is installed, and the Python floor (`bench/floor_proxy.py`)."""
    found = bool(shutil.which("nginx") or Path("/usr/sbin/nginx").exists())
    if not chosen:
        return ["nginx", "floor"] if found else ["floor"]
    if "none" in chosen:
        return []
    if "nginx" in chosen and not found:
        raise SystemExit("--reference nginx: nginx is not installed (apt-get install -y nginx)")
    return list(dict.fromkeys(chosen))


def nginx_version() -> str:
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    out = subprocess.run([exe, "-v"], capture_output=True, text=True, check=False)
    return (out.stderr or out.stdout).strip().removeprefix("nginx version: ")


def start_nginx(
    children: Children, tmp: Path, fast_up: int, slow_up: int
) -> tuple[subprocess.Popen[bytes], int, int, Path]:
    """nginx as a plain reverse proxy on the proxy's core, one process, no buffering, no
    access log, keep-alive to the upstream: what "a proxy adds" costs on this machine."""
    fast, slow = free_port(), free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            tmp=tmp, host=HOST, fast_up=fast_up, slow_up=slow_up, fast=fast, slow=slow
        ),
        encoding="utf-8",
    )
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    log = tmp / "nginx.log"
    errors = tmp / "nginx-error.log"
    cmd = ["taskset", "-c", str(PROXY_CORE), exe, "-p", str(tmp), "-e", str(errors)]
    return children.start([*cmd, "-c", str(conf)], log), fast, slow, log


def start_floor(
    children: Children, tmp: Path, fast_up: int, slow_up: int, src: Path, python: str | None
) -> tuple[subprocess.Popen[bytes], int, int, Path]:
    """The Python floor (`floor_proxy.py`) on the proxy's core, under the proxy's interpreter
    and with its source tree's HTTP client."""
    fast, slow = free_port(), free_port()
    log = tmp / "floor.log"
    cmd = [
        "taskset",
        "-c",
        str(PROXY_CORE),
        os.path.abspath(python) if python else sys.executable,
        str(BENCH_DIR / "floor_proxy.py"),
        "--route",
        f"{fast}=http://{HOST}:{fast_up}",
        "--route",
        f"{slow}=http://{HOST}:{slow_up}",
    ]
    env = {**os.environ, "PYTHONPATH": str(src)}
    return children.start(cmd, log, env), fast, slow, log


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def _write_json(path: str, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")


def _py_spy(out: Path) -> str | None:
    """The py-spy executable (and `out` created), or None."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return None
    out.mkdir(parents=True, exist_ok=True)
    return spy


async def wait_ready(
    url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited ({proc.returncode}):\n{_tail(log)}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s:\n{_tail(log)}")


def source_tree(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    """The `src/` directory to run inferbridge from, and a label for it.

    By default the working tree's own `src/`; with `--commit REV`, that commit's `src/`
    exported to the temporary directory (a stable snapshot while others edit the tree).
    """
    if not args.commit:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "src"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        return REPO / "src", f"working tree at {rev or '?'}" + (" (modified)" if dirty else "")
    rev = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", args.commit],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    snap = tmp / "snapshot"
    snap.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "src"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(snap)], input=archive, check=True)
    return snap / "src", f"commit {rev}"


def start_proxy(
    children: Children,
    tmp: Path,
    config: Path,
    workers: int,
    src: Path,
    extra_env: list[str] | None = None,
    name: str = "inferbridge",
    python: str | None = None,
) -> tuple[subprocess.Popen[bytes], int, Path]:
    """Start the proxy from `src` under `python` (default: this interpreter), which must
    have inferbridge's dependencies installed."""
    port = free_port()
    cores = str(PROXY_CORE) if workers == 1 else f"{PROXY_CORE},{LOAD_CORE}"
    log = tmp / f"{name}-w{workers}.log"
    cmd = [
        "taskset",
        "-c",
        cores,
        os.path.abspath(python) if python else sys.executable,  # (not resolved: a venv's link)
        "-m",
        "inferbridge",
        "serve",
        "--config",
        str(config),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(src)}
    for item in extra_env or ():
        key, _, value = item.partition("=")
        env[key] = f"{value}{os.pathsep}{src}" if key == "PYTHONPATH" else value
    return children.start(cmd, log, env), port, log


async def check_answers(targets: list[Target]) -> None:
    """One non-streamed answer through each target must be the upstream's exact answer."""
    async with aiohttp.ClientSession() as session:
        for t in targets:
            async with session.post(t.fast_url, data=CHAT_BODY, headers=REQUEST_HEADERS) as r:
                data = orjson.loads(await r.read())
                content = data["choices"][0]["message"]["content"]
                if r.status != 200 or data["object"] != "chat.completion" or content != ANSWER:
                    raise RuntimeError(f"{t.name}: unexpected answer {data}")


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------
def med(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else float("nan")


def paired(
    direct: list[dict[str, Any]],
    proxy: list[dict[str, Any]],
    key: str,
    op: Callable[[float, float], float],
) -> float:
    """Median over rounds of op(proxy, direct) for the rounds run back to back."""
    values = [op(p[key], d[key]) for d, p in zip(direct, proxy, strict=False)]
    return statistics.median(values) if values else float("nan")


def _diff(p: float, d: float) -> float:
    return p - d


def _ratio(p: float, d: float) -> float:
    return p / d if d else float("nan")


@dataclass
class Row:
    figure: str
    direct: str
    proxy: str
    vs_direct: str
    target: str = ""
    verdict: str = ""
    ref: str = ""  # the reference's figure (nginx, or the Python floor)
    vs_ref: str = ""


def fmt(value: float, digits: int = 0) -> str:
    if value != value:  # NaN
        return "-"
    return f"{value:,.{digits}f}"


def verdict(ok: bool, detail: str) -> str:
    return ("met" if ok else "MISSED") + (f" ({detail})" if detail else "")


def build_table(
    results: dict[str, dict[str, list[dict[str, Any]]]],
    idle: dict[str, float],
    chunks: int = FAST_CHUNKS,
    ref: str = "",
) -> list[Row]:
    """The rows, with the `ref` reference's cells (empty when it was not measured)."""
    rows: list[Row] = []
    R = results

    def ref_of(phase: str) -> list[dict[str, Any]]:
        """The reference's rounds of `phase` (empty when it was not measured)."""
        return R.get(phase, {}).get(ref, [])

    def ref_fig(phase: str, key: str, digits: int = 0, scale: float = 1.0) -> str:
        n = ref_of(phase)
        return fmt(med(n, key) * scale, digits) if n else ""

    def ref_added(phase: str, key: str) -> tuple[str, str]:
        """(ref's figure with what it adds to direct, inferbridge's addition vs ref's)."""
        n = ref_of(phase)
        if not n:
            return "", ""
        d, p = R[phase]["direct"], R[phase]["inferbridge"]
        by_ref = paired(d, n, key, _diff)
        by_us = paired(d, p, key, _diff)
        return (
            f"{fmt(med(n, key))} (+{fmt(by_ref)})",
            f"{by_us - by_ref:+,.0f} µs ({_ratio(by_us, by_ref):.2f}x {ref}'s added)",
        )

    def ref_ratio(phase: str, key: str, digits: int = 0) -> tuple[str, str]:
        """(ref's figure, inferbridge's as a multiple of ref's)."""
        n = ref_of(phase)
        if not n:
            return "", ""
        return fmt(med(n, key), digits), f"{paired(n, R[phase]['inferbridge'], key, _ratio):.2f}x"

    if "a" in R:
        d, p = R["a"]["direct"], R["a"]["inferbridge"]
        added = paired(d, p, "p50_us", _diff)
        rows += [
            Row(
                "(a) non-stream c=1: p50 latency (µs)",
                fmt(med(d, "p50_us")),
                fmt(med(p, "p50_us")),
                f"+{fmt(added)} µs added",
                "added p50 <= 300 µs",
                verdict(added <= 300, f"{added - 300:+,.0f} µs vs target"),
                *ref_added("a", "p50_us"),
            ),
            Row(
                "(a) non-stream c=1: p99 latency (µs)",
                fmt(med(d, "p99_us")),
                fmt(med(p, "p99_us")),
                f"+{fmt(paired(d, p, 'p99_us', _diff))} µs",
                ref=ref_fig("a", "p99_us"),
            ),
            Row(
                "(a) CPU per request (µs; direct = upstream's)",
                fmt(med(d, "cpu_us"), 1),
                fmt(med(p, "cpu_us"), 1),
                "",
                *("", ""),
                *ref_ratio("a", "cpu_us", 1),
            ),
        ]
    if "b" in R:
        d, p = R["b"]["direct"], R["b"]["inferbridge"]
        rps = med(p, "rps")
        rows += [
            Row(
                "(b) non-stream c=64: requests/s",
                fmt(med(d, "rps")),
                fmt(rps),
                f"{paired(d, p, 'rps', _ratio):.2f}x",
                ">= 5,000 req/s",
                verdict(rps >= 5000, f"{rps / 5000 - 1:+.0%} vs target"),
                *ref_ratio("b", "rps"),
            ),
            Row(
                "(b) non-stream c=64: p50 / p99 latency (ms)",
                f"{fmt(med(d, 'p50_us') / 1000, 2)} / {fmt(med(d, 'p99_us') / 1000, 2)}",
                f"{fmt(med(p, 'p50_us') / 1000, 2)} / {fmt(med(p, 'p99_us') / 1000, 2)}",
                f"{paired(d, p, 'p50_us', _ratio):.2f}x p50",
                ref=f"{ref_fig('b', 'p50_us', 2, 1e-3)} / {ref_fig('b', 'p99_us', 2, 1e-3)}"
                if ref_of("b")
                else "",
            ),
            Row(
                "(b) CPU per request (µs; direct = upstream's)",
                fmt(med(d, "cpu_us"), 1),
                fmt(med(p, "cpu_us"), 1),
                f"proxy core {med(p, 'proxy_busy'):.0%} busy, "
                f"load core {med(p, 'load_core_busy'):.0%}",
                *("", ""),
                *ref_ratio("b", "cpu_us", 1),
            ),
            Row(
                "(b) capacity of one proxy core (1e6 / CPU per request, req/s)",
                fmt(1e6 / med(d, "cpu_us")),
                fmt(1e6 / med(p, "cpu_us")),
                "derived",
                ref=fmt(1e6 / med(ref_of("b"), "cpu_us")) if ref_of("b") else "",
            ),
            Row(
                "(b) errors (non-2xx, socket)",
                fmt(sum(r["errors"] for r in d)),
                fmt(sum(r["errors"] for r in p)),
                "",
                ref=fmt(sum(r["errors"] for r in ref_of("b"))) if ref_of("b") else "",
            ),
        ]
    if "c" in R:
        d, p = R["c"]["direct"], R["c"]["inferbridge"]
        added = paired(d, p, "total_p50_us", _diff)
        rows += [
            Row(
                f"(c) stream {chunks} chunks c=1: time to first chunk p50 (µs)",
                fmt(med(d, "ttfc_p50_us")),
                fmt(med(p, "ttfc_p50_us")),
                f"+{fmt(paired(d, p, 'ttfc_p50_us', _diff))} µs",
                *("", ""),
                *ref_added("c", "ttfc_p50_us"),
            ),
            Row(
                f"(c) stream {chunks} chunks c=1: total p50 (µs)",
                fmt(med(d, "total_p50_us")),
                fmt(med(p, "total_p50_us")),
                f"+{fmt(added)} µs added",
                "added total p50 <= 400 µs",
                verdict(added <= 400, f"{added - 400:+,.0f} µs vs target"),
                *ref_added("c", "total_p50_us"),
            ),
            Row(
                "(c) CPU per chunk (µs; direct = upstream's)",
                fmt(med(d, "cpu_us"), 2),
                fmt(med(p, "cpu_us"), 2),
                "",
                *("", ""),
                *ref_ratio("c", "cpu_us", 2),
            ),
        ]
    if "d" in R:
        d, p = R["d"]["direct"], R["d"]["inferbridge"]
        cpu = med(p, "cpu_us")
        intact_p = sum(r["intact"] for r in p)
        total_p = sum(r["streams"] for r in p)
        intact_n = sum(r["intact"] for r in ref_of("d"))
        total_n = sum(r["streams"] for r in ref_of("d"))
        rows += [
            Row(
                "(d) stream c=64: streams/s",
                fmt(med(d, "streams_s")),
                fmt(med(p, "streams_s")),
                f"{paired(d, p, 'streams_s', _ratio):.2f}x",
                ref=ref_fig("d", "streams_s"),
            ),
            Row(
                "(d) stream c=64: chunks/s",
                fmt(med(d, "chunks_s")),
                fmt(med(p, "chunks_s")),
                f"{paired(d, p, 'chunks_s', _ratio):.2f}x",
                ref=ref_fig("d", "chunks_s"),
            ),
            Row(
                "(d) CPU per streamed chunk (µs; direct = upstream's)",
                fmt(med(d, "cpu_us"), 2),
                fmt(cpu, 2),
                f"proxy core {med(p, 'proxy_busy'):.0%} busy, "
                f"load core {med(p, 'load_core_busy'):.0%}",
                "<= 10 µs/chunk, valid chunks",
                verdict(
                    cpu <= 10 and intact_p == total_p,
                    f"{cpu / 10:.1f}x the target" if cpu > 10 else "",
                ),
                *ref_ratio("d", "cpu_us", 2),
            ),
            Row(
                "(d) streams intact (all rounds)",
                f"{sum(r['intact'] for r in d):,}/{sum(r['streams'] for r in d):,}",
                f"{intact_p:,}/{total_p:,}",
                "",
                ref=f"{intact_n:,}/{total_n:,}" if ref_of("d") else "",
            ),
        ]
    if "e" in R:
        d, p = R["e"]["direct"], R["e"]["inferbridge"]
        ratio = paired(d, p, "wall_s", _ratio)
        peak = max(r["peak_rss_mb"] for r in p)
        intact = min(r["intact"] for r in p)
        rows += [
            Row(
                "(e) 1,000 slow streams: intact (worst round)",
                f"{min(r['intact'] for r in d):,}/1,000",
                f"{intact:,}/1,000",
                "",
                "1,000/1,000",
                verdict(intact == SLOW_STREAMS, ""),
                ref=f"{min(r['intact'] for r in ref_of('e')):,}/1,000" if ref_of("e") else "",
            ),
            Row(
                "(e) 1,000 slow streams: wall time (s)",
                fmt(med(d, "wall_s"), 3),
                fmt(med(p, "wall_s"), 3),
                f"{ratio:.3f}x",
                "<= 1.0x direct",
                verdict(ratio <= 1.0, f"{ratio - 1:+.1%}" if ratio > 1.0 else ""),
                f"{ref_fig('e', 'wall_s', 3)} "
                f"({paired(d, ref_of('e'), 'wall_s', _ratio):.3f}x direct)"
                if ref_of("e")
                else "",
            ),
            Row(
                "(e) proxy peak RSS (MB, worst round)",
                "",
                fmt(peak, 1),
                "",
                "<= 100 MB",
                verdict(peak <= 100, f"{peak - 100:+.0f} MB vs target"),
                fmt(max(r["peak_rss_mb"] for r in ref_of("e")), 1) if ref_of("e") else "",
            ),
            Row(
                "(e) CPU per chunk, 50 ms apart, incl. 1,000 connects (µs)",
                fmt(med(d, "cpu_us"), 2),
                fmt(med(p, "cpu_us"), 2),
                "",
                *("", ""),
                *ref_ratio("e", "cpu_us", 2),
            ),
        ]
    if idle:
        rss = idle["rss_mb"]
        rows.append(
            Row(
                "(f) idle RSS after start (MB)",
                fmt(idle.get("upstream_mb", 0), 1),
                fmt(rss, 1),
                "",
                "<= 60 MB",
                verdict(rss <= 60, f"{rss - 60:+.1f} MB vs target"),
                fmt(idle[f"{ref}_mb"], 1) if f"{ref}_mb" in idle else "",
            )
        )
    if "b2" in R and "b" in R:
        d, p = R["b2"]["direct"], R["b2"]["inferbridge"]
        w1 = med(R["b"]["inferbridge"], "rps")
        w2 = med(p, "rps")
        scale = w2 / w1 if w1 else float("nan")
        per_core_1 = w1 / max(med(R["b"]["inferbridge"], "proxy_busy"), 1e-9)
        per_core_2 = w2 / max(med(p, "proxy_busy"), 1e-9)
        efficiency = per_core_2 / per_core_1
        rows += [
            Row(
                "(g) --workers 2, non-stream c=64: requests/s",
                fmt(med(d, "rps")),
                fmt(w2),
                f"{scale:.2f}x one worker",
                ">= 1.7x one worker",
                verdict(scale >= 1.7, f"{scale - 1.7:+.2f}x vs target"),
            ),
            Row(
                "(g) --workers 2: proxy cores busy / req/s per busy core",
                "",
                f"{med(p, 'proxy_busy'):.2f} / {fmt(per_core_2)}",
                f"one worker: {med(R['b']['inferbridge'], 'proxy_busy'):.2f} / {fmt(per_core_1)}",
            ),
            Row(
                "(g) --workers 2: per-core efficiency vs one worker (derived)",
                "",
                f"{efficiency:.0%}",
                f"2 free cores would give ~{2 * efficiency:.2f}x",
            ),
            Row(
                "(g) --workers 2: CPU per request (µs)",
                "",
                fmt(med(p, "cpu_us"), 1),
                f"one worker: {fmt(med(R['b']['inferbridge'], 'cpu_us'), 1)}",
            ),
        ]
    if "d2" in R and "d" in R:
        d, p = R["d2"]["direct"], R["d2"]["inferbridge"]
        w1 = med(R["d"]["inferbridge"], "chunks_s")
        w2 = med(p, "chunks_s")
        rows += [
            Row(
                "(g) --workers 2, stream c=64: chunks/s",
                fmt(med(d, "chunks_s")),
                fmt(w2),
                f"{w2 / w1:.2f}x one worker" if w1 else "",
            ),
            Row(
                "(g) --workers 2: CPU per chunk (µs)",
                "",
                fmt(med(p, "cpu_us"), 2),
                f"one worker: {fmt(med(R['d']['inferbridge'], 'cpu_us'), 2)}",
            ),
        ]
    return rows


REFERENCE_LABELS = {"nginx": "nginx", "floor": "Python floor"}


def render(rows: list[Row], refs: dict[str, list[Row]]) -> str:
    """The Markdown table: `rows`, then two columns for each reference in `refs` (its rows
    from `build_table(..., ref=name)`) that the run measured."""
    shown = {n: r for n, r in refs.items() if any(x.ref or x.vs_ref for x in r)}
    head = ["figure", "direct", "inferbridge", "vs direct", "target", "verdict"]
    for name in shown:
        label = REFERENCE_LABELS.get(name, name)
        head += [f"{label} (same seat)", f"inferbridge vs {label}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        cells = [r.figure, r.direct, r.proxy, r.vs_direct, r.target, r.verdict]
        for ref_rows in shown.values():
            cells += [ref_rows[i].ref, ref_rows[i].vs_ref]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_json(rows: list[Row], refs: dict[str, list[Row]]) -> list[dict[str, str]]:
    """The table's rows as dicts: the reference cells under `<name>` and `vs_<name>`."""
    out = []
    for i, r in enumerate(rows):
        row = {k: v for k, v in asdict(r).items() if k not in ("ref", "vs_ref")}
        for name, ref_rows in refs.items():
            row[name], row[f"vs_{name}"] = ref_rows[i].ref, ref_rows[i].vs_ref
        out.append(row)
    return out


# --------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------
async def alternate(
    rounds: int,
    steps: list[tuple[str, Callable[[Target], Awaitable[None]]]],
    targets: list[Target],
) -> None:
    """Each round runs each phase on every target back to back (direct first)."""
    for i in range(rounds):
        print(f"round {i + 1}/{rounds}", flush=True)
        for _, step in steps:
            for target in targets:
                await step(target)


async def warm_up(bench: Bench, targets: list[Target]) -> None:
    for t in targets:
        await run_wrk(bench.wrk_script, t.fast_url, 64, 1)
        await streams_for(
            t.fast_url, stream_body(t.fast_model), expected_text(bench.args.chunks), 16, 0.5, 500
        )


async def start_upstream(
    children: Children, tmp: Path, chunks: int, max_seconds: float
) -> tuple[subprocess.Popen[bytes], int, int]:
    """The fake upstream on the load core, ready: its process, fast port and slow port."""
    fast_port, slow_port = free_port(), free_port()
    up_log = tmp / "upstream.log"
    upstream = children.start(
        [
            "taskset",
            "-c",
            str(LOAD_CORE),
            sys.executable,
            str(BENCH_DIR / "fake_upstream.py"),
            "--listen",
            f"{fast_port}:{chunks}:0",
            "--listen",
            f"{slow_port}:{SLOW_CHUNKS}:{SLOW_DELAY_MS}",
            "--max-seconds",
            str(max_seconds),
        ],
        up_log,
    )
    await wait_ready(f"http://{HOST}:{fast_port}/health", upstream, up_log)
    return upstream, fast_port, slow_port


async def benchmark(args: argparse.Namespace, children: Children, tmp: Path) -> int:
    upstream, fast_port, slow_port = await start_upstream(
        children, tmp, args.chunks, args.max_seconds
    )
    config = write_config(tmp, fast_port, slow_port, args.server_option or [])
    merge_config_extra(config, args.config_extra)
    script = tmp / "chat.lua"
    lua = WRK_SCRIPT % CHAT_BODY.decode()
    if args.api_key:
        REQUEST_HEADERS["Authorization"] = f"Bearer {args.api_key}"
        lua = f'wrk.headers["Authorization"] = "Bearer {args.api_key}"\n' + lua
    script.write_text(lua, encoding="utf-8")
    src, source = source_tree(args, tmp)
    print(f"inferbridge from {source} ({src})", flush=True)
    bench = Bench(args, tmp, script, upstream, src, source, speed_check(), loadavg())
    direct = Target(
        "direct",
        f"http://{HOST}:{fast_port}/v1/chat/completions",
        f"http://{HOST}:{slow_port}/v1/chat/completions",
        upstream,
    )

    if args.soak:
        return await soak(bench, children, tmp, config, direct)

    proxy_proc, port, log = start_proxy(
        children, tmp, config, 1, bench.src, bench.args.proxy_env, python=bench.args.python
    )
    await wait_ready(f"http://{HOST}:{port}/health", proxy_proc, log)
    proxy = Target(
        "inferbridge",
        f"http://{HOST}:{port}/v1/chat/completions",
        f"http://{HOST}:{port}/v1/chat/completions",
        proxy_proc,
    )
    await asyncio.sleep(1.0)
    idle = {"rss_mb": rss_mb([proxy_proc.pid]), "upstream_mb": rss_mb([upstream.pid])}
    print(
        f"(f) idle RSS: inferbridge {idle['rss_mb']:.1f} MB "
        f"(fake upstream {idle['upstream_mb']:.1f} MB)",
        flush=True,
    )
    targets = [direct, proxy]
    references = references_wanted(args.reference)
    for name in references:
        if name == "nginx":
            ref, ref_fast, ref_slow, ref_log = start_nginx(children, tmp, fast_port, slow_port)
            what = nginx_version()
        else:
            ref, ref_fast, ref_slow, ref_log = start_floor(
                children, tmp, fast_port, slow_port, bench.src, args.python
            )
            what = "the Python floor (bench/floor_proxy.py)"
        await wait_ready(f"http://{HOST}:{ref_fast}/health", ref, ref_log)
        idle[f"{name}_mb"] = rss_mb([ref.pid])
        targets.insert(
            -1,
            Target(
                name,
                f"http://{HOST}:{ref_fast}/v1/chat/completions",
                f"http://{HOST}:{ref_slow}/v1/chat/completions",
                ref,
            ),
        )
        print(f"reference: {what} in the proxy's seat", flush=True)
    await check_answers(targets)
    await warm_up(bench, targets)

    steps: list[tuple[str, Callable[[Target], Awaitable[None]]]] = [
        ("a", lambda t: bench.nonstream("a", t, 1)),
        ("b", lambda t: bench.nonstream("b", t, 64)),
        ("c", lambda t: bench.stream("c", t, 1)),
        ("d", lambda t: bench.stream("d", t, 64)),
        ("e", bench.slow_streams),
    ]
    only = set(args.only) if args.only else None
    steps = [s for s in steps if only is None or s[0] in only]
    await alternate(args.rounds, steps, targets)
    for t in targets[1:-1]:
        children.stop(t.proc)

    if args.profile:
        await profile(bench, proxy, Path(args.profile))
    children.stop(proxy_proc)

    if not args.skip_workers and (only is None or "g" in only):
        print("(g) restarting inferbridge with --workers 2", flush=True)
        proxy2, port2, log2 = start_proxy(
            children, tmp, config, 2, bench.src, bench.args.proxy_env, python=bench.args.python
        )
        await wait_ready(f"http://{HOST}:{port2}/health", proxy2, log2)
        await asyncio.sleep(1.0)
        p2 = Target(
            "inferbridge",
            f"http://{HOST}:{port2}/v1/chat/completions",
            f"http://{HOST}:{port2}/v1/chat/completions",
            proxy2,
        )
        await warm_up(bench, [p2])
        await alternate(
            args.rounds,
            [
                ("b2", lambda t: bench.nonstream("b2", t, 64)),
                ("d2", lambda t: bench.stream("d2", t, 64)),
            ],
            [direct, p2],
        )
        children.stop(proxy2)

    refs = {name: build_table(bench.results, idle, args.chunks, name) for name in references}
    rows = build_table(bench.results, idle, args.chunks, "")
    table = render(rows, refs)
    speed = (bench.speed, speed_check())
    load = (bench.loadavg, loadavg())
    print()
    print(
        f"inferbridge benchmark, {datetime.date.today()}, {bench.source}, "
        f"proxy under {proxy_python(args)}, {machine()}, "
        f"{args.rounds} rounds x {args.seconds:g} s, medians"
    )
    print(
        f"core {PROXY_CORE} speed check (ns per loop, lower is faster): "
        f"{speed[0]:.0f} before, {speed[1]:.0f} after; load average {load[0]} before, "
        f"{load[1]} after"
    )
    print(table)
    if args.json:
        _write_json(
            args.json,
            {
                "date": str(datetime.date.today()),
                "machine": machine(),
                "source": bench.source,
                "proxy_python": proxy_python(args),
                "args": vars(args),
                "speed_check_ns": speed,
                "loadavg": load,
                "idle": idle,
                "results": bench.results,
                "table": table_json(rows, refs),
            },
        )
        print(f"raw results: {args.json}")
    return 0


async def profile(bench: Bench, proxy: Target, out: Path) -> None:
    """py-spy (on the load core) on the proxy under (b) and (d) load: collapsed stacks
    (`.txt`, for bench/hotspots.py) and a flame graph (`.svg`) for each."""
    spy = _py_spy(out)
    if spy is None:
        print("py-spy not found: pip install py-spy (skipping --profile)")
        return
    seconds = max(4, round(bench.args.seconds * 2))
    for name, load in (
        ("nonstream", lambda: run_wrk(bench.wrk_script, proxy.fast_url, 64, seconds + 2)),
        (
            "stream",
            lambda: streams_for(
                proxy.fast_url,
                stream_body(proxy.fast_model),
                expected_text(bench.args.chunks),
                64,
                seconds + 2,
                10**6,
            ),
        ),
    ):
        for fmt_name, suffix in (("raw", "txt"), ("flamegraph", "svg")):
            target = out / f"{name}.{suffix}"
            cmd = [
                "taskset",
                "-c",
                str(LOAD_CORE),
                spy,
                "record",
                "--pid",
                str(proxy.proc.pid),
                "--duration",
                str(seconds),
                "--rate",
                "250",
                "--format",
                fmt_name,
                "-o",
                str(target),
            ]
            spy_proc = await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
            )
            try:
                await load()
                await asyncio.wait_for(spy_proc.wait(), timeout=seconds + 30)
            except (asyncio.CancelledError, TimeoutError):
                with contextlib.suppress(ProcessLookupError):
                    spy_proc.kill()
                raise
            print(f"profile: {target}", flush=True)


# --------------------------------------------------------------------------------------
# Soak: flat memory under mixed load
# --------------------------------------------------------------------------------------
async def soak(bench: Bench, children: Children, tmp: Path, config: Path, direct: Target) -> int:
    minutes = bench.args.soak_minutes
    seconds = minutes * 60
    base_at = 60.0 if seconds >= 120 else seconds / 2
    proxy_proc, port, log = start_proxy(
        children, tmp, config, 1, bench.src, bench.args.proxy_env, python=bench.args.python
    )
    await wait_ready(f"http://{HOST}:{port}/health", proxy_proc, log)
    url = f"http://{HOST}:{port}/v1/chat/completions"
    print(
        f"soak: {minutes:g} min of mixed load (wrk c=8 non-streamed; 8 streaming clients "
        f"with 1 in 10 streams cut after the first chunk; 1 in 50 requests a 404; "
        f"16 slow streams); baseline RSS at {base_at:.0f} s",
        flush=True,
    )
    start = time.perf_counter()
    deadline = start + seconds
    samples: list[tuple[float, float]] = []
    counts = {"streams": 0, "intact": 0, "aborted": 0, "not_found": 0, "broken": 0}
    body = stream_body("bench")
    slow_body = stream_body("bench-slow")
    missing = orjson.dumps(
        {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}
    )
    fast_expected = expected_text(bench.args.chunks)
    slow_expected = expected_text(SLOW_CHUNKS)

    async def streamer(session: aiohttp.ClientSession, slow: bool) -> None:
        i = 0
        while time.perf_counter() < deadline:
            i += 1
            if not slow and i % 50 == 0:
                async with session.post(url, data=missing, headers=REQUEST_HEADERS) as r:
                    await r.read()
                    counts["not_found"] += r.status == 404
                continue
            abort = not slow and i % 10 == 0
            r = await stream_once(
                session,
                url,
                slow_body if slow else body,
                slow_expected if slow else fast_expected,
                abort,
            )
            counts["streams"] += 1
            counts["aborted"] += abort
            counts["intact"] += r.ok and not abort
            counts["broken"] += not r.ok

    async def sampler() -> None:
        while time.perf_counter() < deadline:
            samples.append((time.perf_counter() - start, rss_mb([proxy_proc.pid])))
            await asyncio.sleep(min(5.0, max(0.0, deadline - time.perf_counter())))

    async with client_session(0) as session:
        wrk = asyncio.create_task(run_wrk(bench.wrk_script, url, 8, seconds))
        await asyncio.gather(
            sampler(),
            *(streamer(session, False) for _ in range(8)),
            *(streamer(session, True) for _ in range(16)),
        )
        result = await wrk
    await asyncio.sleep(1.0)
    samples.append((time.perf_counter() - start, rss_mb([proxy_proc.pid])))
    base = min(samples, key=lambda s: abs(s[0] - base_at))
    end = samples[-1]
    growth = end[1] / base[1] - 1
    print()
    print(f"soak {datetime.date.today()}, {bench.source}, {machine()}, {minutes:g} min")
    print(f"non-streamed requests (wrk): {result['requests']:,}, errors {result['errors']}")
    print(
        f"streams: {counts['streams']:,} ({counts['intact']:,} intact, "
        f"{counts['aborted']:,} cut by the client, {counts['broken']} broken); "
        f"404s: {counts['not_found']:,}"
    )
    print(
        "RSS timeline (s, MB): "
        + ", ".join(f"{t:.0f}:{m:.1f}" for t, m in samples[:: max(1, len(samples) // 12)])
    )
    ok = abs(growth) <= 0.10
    print(
        f"| flat memory | RSS at {base[0]:.0f} s: {base[1]:.1f} MB | at {end[0]:.0f} s: "
        f"{end[1]:.1f} MB | {growth:+.1%} | within 10% | {verdict(ok, '')} |"
    )
    children.stop(proxy_proc)
    if bench.args.json:
        _write_json(
            bench.args.json,
            {
                "date": str(datetime.date.today()),
                "machine": machine(),
                "minutes": minutes,
                "samples": samples,
                "counts": counts,
                "wrk": result,
                "growth": growth,
            },
        )
    return 0 if counts["broken"] == 0 else 1


SPEED_CHECK = (
    "import time\n"
    "best = 1e9\n"
    "for _ in range(5):\n"
    "    t = time.process_time()\n"
    "    d = {}\n"
    "    for i in range(200_000):\n"
    "        d[i & 1023] = str(i)\n"
    "    best = min(best, time.process_time() - t)\n"
    "print(best / 200_000 * 1e9)\n"
)


def speed_check() -> float:
    """ns per iteration of a fixed pure-Python loop on the proxy's core (best of 5): a
    reading of how much CPU this machine gives right now (lower is faster)."""
    out = subprocess.run(
        ["taskset", "-c", str(PROXY_CORE), sys.executable, "-c", SPEED_CHECK],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(out.strip())


def proxy_python(args: argparse.Namespace) -> str:
    """The proxy's interpreter: version, and whether libpython is a shared library (see
    "The interpreter" in bench/README.md)."""
    python = args.python or sys.executable
    probe = "import platform; print(platform.python_version())"
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True)
    version = out.stdout.strip()
    linked = subprocess.run(["ldd", python], capture_output=True, text=True).stdout
    libpython = "shared libpython" if "libpython" in linked else "libpython linked in"
    shown = Path(python)
    if shown.is_absolute() and shown.is_relative_to(REPO):
        shown = shown.relative_to(REPO)
    return f"{shown} (Python {version}, {libpython})"


def loadavg() -> str:
    with contextlib.suppress(OSError), open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])
    return "?"


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


async def stop_on_signals(run: Awaitable[int]) -> int:
    """Run `run`; SIGINT or SIGTERM cancels it, so every `finally` and `async with` on the
    way out runs (an exception raised from a signal handler could land inside a library's
    own error handling instead)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[int] = []

    def stop(signum: int) -> None:
        received.append(signum)
        task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop, signum)
    try:
        return await run
    except asyncio.CancelledError:
        if not received:
            raise
        print(f"stopped by signal {received[0]}; stopping child processes", flush=True)
        return 128 + received[0]


def _rerun_in_own_session(argv: list[str] | None) -> int:
    cmd = [sys.executable, str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv)]
    child = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.terminate()
        return child.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="inferbridge benchmark (see bench/README.md)")
    parser.add_argument(
        "--quick", action="store_true", help="3 rounds of 2.5 s per phase (under 3 minutes)"
    )
    parser.add_argument("--rounds", type=int, help="rounds per phase (default 5; quick 3)")
    parser.add_argument(
        "--seconds", type=float, help="length of each timed phase (default 8; quick 2.5)"
    )
    parser.add_argument(
        "--chunks",
        type=int,
        default=FAST_CHUNKS,
        help=f"content chunks per stream in (c), (d) and the soak (default "
        f"{FAST_CHUNKS}); compare two values to split CPU per chunk into "
        "per-stream and per-chunk parts",
    )
    parser.add_argument("--only", nargs="+", choices=list("abcdeg"), help="run only these phases")
    parser.add_argument("--skip-workers", action="store_true", help="skip (g)")
    parser.add_argument(
        "--soak",
        action="store_true",
        help="only the flat-memory soak: RSS after N minutes of mixed load vs after 1 minute",
    )
    parser.add_argument("--soak-minutes", type=float, default=10.0)
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="also record py-spy profiles of the proxy under (b)/(d) load",
    )
    parser.add_argument(
        "--commit",
        metavar="REV",
        help="benchmark this commit's src/ (exported) instead of the working tree's",
    )
    parser.add_argument(
        "--server-option",
        action="append",
        metavar="KEY=VALUE",
        help="extra server: setting for the proxy's config, e.g. "
        "access_log=false (repeatable; for A/B comparisons)",
    )
    parser.add_argument(
        "--config-extra",
        metavar="FILE",
        help="YAML merged into the proxy's generated config (auth.keys, state:, router...; "
        "sections merged key by key, models appended)",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help="send this key (Authorization: Bearer) on every request, for a --config-extra "
        "with auth",
    )
    parser.add_argument(
        "--proxy-env",
        action="append",
        metavar="KEY=VALUE",
        help="environment variable for the proxy (repeatable); a PYTHONPATH "
        "given here goes before src/, e.g. for an experiment's "
        "sitecustomize.py",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run every benchmark process at this nice value (e.g. -10 as "
        "root on a machine shared with other work; default 0)",
    )
    parser.add_argument(
        "--reference",
        action="append",
        choices=["nginx", "floor", "none"],
        help="also measure this in the proxy's seat, in the same rounds (repeatable): nginx "
        "as a plain reverse proxy, the Python floor (bench/floor_proxy.py), or none; "
        "default: both (nginx when installed)",
    )
    parser.add_argument(
        "--python",
        metavar="PATH",
        help="the interpreter the proxy runs under, with inferbridge's dependencies "
        'installed (default: the one running this script); see "The interpreter" in '
        "bench/README.md",
    )
    parser.add_argument("--json", metavar="FILE", help="write the raw per-round results")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.seconds = args.seconds or (2.5 if args.quick else 8.0)
    args.max_seconds = 3600 + (args.soak_minutes * 60 if args.soak else 0)

    if os.cpu_count() is None or (os.cpu_count() or 0) < 2:
        print("this benchmark needs 2 cores (proxy on core 0, load on core 1)")
        return 2
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk")
        return 2
    if shutil.which("taskset") is None:
        print("taskset is not installed: apt-get install -y util-linux")
        return 2
    # Ctrl-C stops the run even when started from a shell that ignores SIGINT for
    # background jobs
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.nice and os.getsid(0) != os.getpid():
        # a session of our own, so that raising its autogroup's priority touches nothing
        # but this run (wrk and the streaming client included)
        return _rerun_in_own_session(argv)
    os.sched_setaffinity(0, {LOAD_CORE})
    set_priority(os.getpid(), args.nice)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))

    children = Children(args.nice)
    atexit.register(children.stop_all)

    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    with tempfile.TemporaryDirectory(prefix="inferbridge-bench-") as tmp:
        try:
            import uvloop

            return uvloop.run(stop_on_signals(benchmark(args, children, Path(tmp))))
        except KeyboardInterrupt:
            print("interrupted")
            return 130
        finally:
            children.stop_all()


if __name__ == "__main__":
    sys.exit(main())
