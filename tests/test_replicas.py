"""Several inferbridge processes sharing one real Redis (`state: {store: redis}`).

Three replicas (`python -m inferbridge serve`, each on its own port) behind a client that
spreads requests over them round-robin, in front of fake upstreams running in this
process: rate limits hold across replicas, `max_concurrent` holds at the upstream, a
cooldown started through one replica keeps the others away, the slots of a replica killed
mid-stream come back within the lease, and a Redis that stops answering (or dies) is
handled by `on_store_error` within the store timeout, counting again when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiohttp import web

from tests.fakes.openai_compat import FakeOpenAI
from tests.redis_server import RedisServer, free_port

pytestmark = pytest.mark.slow

LEASE_TTL = 2.0
SYNC = 0.1


class CountingOpenAI(FakeOpenAI):
    """A fake that records how many chat requests it serves at once."""

    def __init__(self) -> None:
        super().__init__()
        self.active = 0
        self.peak = 0

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            return await super().chat(request)
        finally:
            self.active -= 1


class Replica:
    """One `inferbridge serve` process on its own port."""

    def __init__(self, config: Path, logs: Path) -> None:
        self.port = free_port()
        self.log_path = logs / f"replica-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFERBRIDGE_")}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "inferbridge",
                    "serve",
                    "--config",
                    str(config),
                    "--port",
                    str(self.port),
                    "--log-level",
                    "warning",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, client: httpx.Client, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if client.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"replica on {self.port} did not start:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_replicas(configs: list[dict[str, Any]], tmp: Path) -> list[Replica]:
    """One replica per config, started together."""
    replicas = []
    for i, config in enumerate(configs):
        path = tmp / f"inferbridge-{i}.yaml"
        path.write_text(yaml.safe_dump(config))
        replicas.append(Replica(path, tmp))
    try:
        with httpx.Client() as client:
            for replica in replicas:
                replica.wait_ready(client)
    except BaseException:
        for replica in replicas:
            replica.stop()
        raise
    return replicas


def entry(name: str, fake: FakeOpenAI, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "openai-compatible",
        "url": fake.url + "/v1",
        "upstream_model": "upstream-model",
        **extra,
    }


def chat(model: str, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body["stream"] = True
    return body


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Cluster:
    def __init__(self, replicas: list[Replica], fakes: dict[str, FakeOpenAI]) -> None:
        self.replicas = replicas
        self.fakes = fakes

    async def spread(self, n: int, key: str, model: str) -> list[httpx.Response]:
        """`n` requests at once, round-robin over the replicas."""
        clients = [
            httpx.AsyncClient(base_url=r.url + "/v1", headers=auth(key), timeout=30)
            for r in self.replicas
        ]
        try:
            turn = itertools.cycle(clients)
            return await asyncio.gather(
                *(next(turn).post("/chat/completions", json=chat(model)) for _ in range(n))
            )
        finally:
            for client in clients:
                await client.aclose()

    def deployment(self, replica: Replica, model: str, index: int) -> dict[str, Any]:
        report = httpx.get(replica.url + "/health/readiness", headers=auth("sk-plain")).json()
        return report["models"][model]["deployments"][index]


@pytest.fixture(scope="module")
def cluster(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    redis_server.flush()
    fakes: dict[str, FakeOpenAI] = {
        "capped": CountingOpenAI(),
        "counted": FakeOpenAI(),
        "bad": FakeOpenAI(),
        "good": FakeOpenAI(),
        "slow": FakeOpenAI(),
    }
    for fake in fakes.values():
        fake.start()
    fakes["capped"].behaviour.delay_first_byte = 0.3
    fakes["bad"].behaviour.status = 500
    fakes["slow"].reply = ["x"] * 400
    fakes["slow"].behaviour.delay_between_chunks = 0.05
    config = {
        "server": {"access_log": False, "drain_timeout": 1},
        "auth": {
            "keys": [
                {"name": "burst", "key": "sk-burst", "rpm": 30},
                {"name": "tokens", "key": "sk-tokens", "tpm": 25},
                {"name": "plain", "key": "sk-plain"},
            ]
        },
        "state": {
            "store": "redis",
            "url": redis_server.url,
            "timeout": 1.0,
            "lease_ttl": LEASE_TTL,
            "sync_interval": SYNC,
        },
        "router": {"allowed_fails": 1, "cooldown": 120, "retries": 2, "retry_backoff": 0},
        "models": [
            {"name": "echo", "backend": "echo"},
            entry("capped", fakes["capped"], max_concurrent=2, max_queue=20, queue_timeout=20),
            entry("counted", fakes["counted"]),
            entry("flaky", fakes["bad"]),
            entry("flaky", fakes["good"]),
            entry("held", fakes["slow"], max_concurrent=2),
        ],
    }
    tmp = tmp_path_factory.mktemp("replicas")
    replicas = start_replicas([config] * 3, tmp)
    yield Cluster(replicas, fakes)
    for replica in replicas:
        replica.stop()
    for fake in fakes.values():
        fake.stop()


async def test_rpm_holds_across_replicas(cluster: Cluster) -> None:
    answers = await cluster.spread(90, "sk-burst", "echo")
    statuses = [a.status_code for a in answers]
    assert statuses.count(200) == 30, statuses
    assert statuses.count(429) == 60
    for answer in answers:
        if answer.status_code == 429:
            assert 1 <= int(answer.headers["retry-after"]) <= 61
            assert answer.headers["x-ratelimit-remaining-requests"] == "0"
            assert answer.json()["error"]["code"] == "rate_limit_exceeded"
        else:
            assert answer.headers["x-ratelimit-limit-requests"] == "30"
    # each admitted request saw its own count: 29 left, 28 ... 0
    ok = [int(a.headers["x-ratelimit-remaining-requests"]) for a in answers if a.status_code == 200]
    assert sorted(ok) == list(range(30))


def test_tpm_is_charged_with_the_backends_usage(cluster: Cluster) -> None:
    # the fake reports 7 + 3 tokens per answer; tpm 25: three answers, then the window is spent
    seen = []
    for i in range(5):
        replica = cluster.replicas[i % 3]
        answer = httpx.post(
            replica.url + "/v1/chat/completions", json=chat("counted"), headers=auth("sk-tokens")
        )
        seen.append((answer.status_code, answer.headers.get("x-ratelimit-remaining-tokens")))
        if answer.status_code == 429:
            assert int(answer.headers["retry-after"]) >= 1
            assert "tokens per minute (tpm)" in answer.json()["error"]["message"]
        time.sleep(0.05)  # the charge is sent as the answer leaves
    assert seen == [(200, "25"), (200, "15"), (200, "5"), (429, "0"), (429, "0")]


async def test_max_concurrent_holds_at_the_upstream_across_replicas(cluster: Cluster) -> None:
    fake = cluster.fakes["capped"]
    assert isinstance(fake, CountingOpenAI)
    started = time.monotonic()
    answers = await cluster.spread(9, "sk-plain", "capped")
    assert [a.status_code for a in answers] == [200] * 9
    assert fake.peak == 2
    assert time.monotonic() - started >= 4 * 0.3  # 9 requests, 2 at a time


def test_a_cooldown_started_on_one_replica_holds_on_the_others(cluster: Cluster) -> None:
    bad, good = cluster.fakes["bad"], cluster.fakes["good"]
    first = cluster.replicas[0]
    with httpx.Client(base_url=first.url + "/v1", headers=auth("sk-plain")) as client:
        for _ in range(20):  # until the failing deployment was tried once (allowed_fails: 1)
            assert client.post("/chat/completions", json=chat("flaky")).status_code == 200
            if bad.requests:
                break
    assert bad.requests, "the failing deployment was never picked"
    for replica in cluster.replicas[1:]:  # within a few sync intervals
        deadline = time.monotonic() + 5
        while cluster.deployment(replica, "flaky", 0)["state"] != "cooling_down":
            assert time.monotonic() < deadline, "the cooldown did not reach the other replicas"
            time.sleep(SYNC)
    tried = len(bad.requests)
    before = len(good.requests)
    for replica in cluster.replicas[1:]:
        assert cluster.deployment(replica, "flaky", 0)["state"] == "cooling_down"
        with httpx.Client(base_url=replica.url + "/v1", headers=auth("sk-plain")) as client:
            for _ in range(8):
                assert client.post("/chat/completions", json=chat("flaky")).status_code == 200
    assert len(bad.requests) == tried  # replicas 2 and 3 kept off it
    assert len(good.requests) == before + 16


def test_a_killed_replica_releases_its_slots_within_the_lease(cluster: Cluster) -> None:
    victim, survivor = cluster.replicas[2], cluster.replicas[0]
    client = httpx.Client(base_url=victim.url + "/v1", headers=auth("sk-plain"), timeout=30)
    streams = []
    try:
        for _ in range(2):  # both slots of `held`, streaming for 20 s
            stream = client.stream("POST", "/chat/completions", json=chat("held", stream=True))
            response = stream.__enter__()
            assert response.status_code == 200
            chunks = response.iter_bytes()  # kept: dropping it would close the stream
            next(chunks)
            streams.append((stream, chunks))
        deadline = time.monotonic() + 2
        while cluster.deployment(survivor, "held", 0)["in_flight"] != 2:
            assert time.monotonic() < deadline, "the survivor never saw the victim's streams"
            time.sleep(SYNC)
        victim.kill()
        killed = time.monotonic()
    finally:
        with contextlib.suppress(Exception):
            client.close()
    body = chat("held")
    with httpx.Client(base_url=survivor.url + "/v1", headers=auth("sk-plain")) as other:
        answer = other.post("/chat/completions", json=body)
        assert answer.status_code == 429  # the dead replica's leases still count
        while (answer := other.post("/chat/completions", json=body)).status_code != 200:
            assert time.monotonic() - killed < LEASE_TTL + 2, "the slots leaked past the lease"
            time.sleep(0.1)
    assert time.monotonic() - killed >= LEASE_TTL / 3  # released by expiry, not at once
    deadline = time.monotonic() + 1
    while cluster.deployment(survivor, "held", 0)["in_flight"] != 0:
        assert time.monotonic() < deadline
        time.sleep(SYNC)


# -- Redis slow, down, back -----------------------------------------------------------------
@pytest.fixture(scope="module")
def outage(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RedisServer, Replica, Replica]]:
    from tests.redis_server import missing

    if missing():
        pytest.skip(missing())
    tmp = tmp_path_factory.mktemp("outage")
    with RedisServer() as redis:

        def config(policy: str) -> dict[str, Any]:
            return {
                "server": {"access_log": False, "drain_timeout": 1},
                "auth": {"keys": [{"name": "k", "key": "sk-k", "rpm": 1000}]},
                "state": {
                    "store": "redis",
                    "url": redis.url,
                    "timeout": 0.1,
                    "on_store_error": policy,
                    "sync_interval": SYNC,
                },
                "models": [{"name": "echo", "backend": "echo", "max_concurrent": 50}],
            }

        allow, deny = start_replicas([config("allow"), config("deny")], tmp)
        yield redis, allow, deny
        allow.stop()
        deny.stop()


def timed(replica: Replica) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    answer = httpx.post(
        replica.url + "/v1/chat/completions", json=chat("echo"), headers=auth("sk-k"), timeout=10
    )
    return answer, time.monotonic() - started


def wait_counting(replica: Replica, timeout: float = 5) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        answer, _ = timed(replica)
        if answer.status_code == 200 and "x-ratelimit-remaining-requests" in answer.headers:
            return answer
        assert time.monotonic() < deadline, "counting did not resume"
        time.sleep(0.1)


def test_store_slow_or_down_then_back(outage: tuple[RedisServer, Replica, Replica]) -> None:
    redis, allow, deny = outage
    for replica in (allow, deny):
        answer, _ = timed(replica)
        assert answer.status_code == 200
        assert answer.headers["x-ratelimit-limit-requests"] == "1000"

    for down in ("slow", "dead"):
        if down == "slow":
            redis.pause()  # accepts connections, never answers
        else:
            redis.stop()
        for _ in range(3):
            answer, took = timed(allow)
            assert answer.status_code == 200  # allow: served, without shared limits
            assert "x-ratelimit-remaining-requests" not in answer.headers
            assert took < 1.0
            answer, took = timed(deny)
            assert answer.status_code == 503  # deny: refused
            assert answer.headers["retry-after"] == "1"
            assert answer.json()["error"]["code"] == "store_unavailable"
            assert took < 1.0
        if down == "slow":
            redis.resume()
        else:
            redis.start()  # the same port, empty
        first = wait_counting(allow)
        wait_counting(deny)
        second, _ = timed(allow)
        assert int(second.headers["x-ratelimit-remaining-requests"]) < int(
            first.headers["x-ratelimit-remaining-requests"]
        )
