"""Routing end to end: how load spreads per strategy (counted at the fakes), aliases,
active health checks and graceful shutdown, through the official openai SDK."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from inferbridge.backends import registry
from tests.fakes.ollama import FakeOllama
from tests.test_reliability import ANSWER, MESSAGES, chat, client, entry, fakes, states

__all__ = ["fakes"]  # the fixture, shared with test_reliability


def test_simple_shuffle_spreads_by_weight(serve, fakes):
    heavy, light = fakes(2)
    srv = serve({"models": [entry(heavy, weight=3), entry(light, weight=1)]})
    for _ in range(120):
        chat(srv)
    assert heavy.served + light.served == 120
    assert 70 <= heavy.served <= 110  # expected 90, sd ~4.7


async def test_least_busy_sends_each_request_to_the_idlest_deployment(serve, fakes):
    a, b = fakes(2)
    for fake in (a, b):
        fake.behaviour.delay_between_chunks = 0.15
    srv = serve({"router": {"strategy": "least-busy"}, "models": [entry(a), entry(b)]})
    sdk = srv.async_openai()

    async def one() -> str:
        stream = await sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    tasks = []
    for _ in range(6):
        tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(0.03)  # each request is routed before the next arrives
    assert await asyncio.gather(*tasks) == [ANSWER] * 6
    assert (a.served, b.served) == (3, 3)


def test_latency_based_prefers_the_fastest_deployment(serve, fakes):
    slow, fast = fakes(2)
    slow.behaviour.delay_first_byte = 0.2
    srv = serve(
        {
            "router": {"models": {"m": {"strategy": "latency-based"}}},
            "models": [entry(slow), entry(fast)],
        }
    )
    for _ in range(10):
        assert chat(srv, stream=True) == (ANSWER, "m")
    assert (slow.served, fast.served) == (1, 9)  # measured once, then avoided
    report = httpx.get(srv.url + "/health/readiness").json()["models"]["m"]
    assert report["strategy"] == "latency-based"
    slow_ms, fast_ms = (d["ttft_ms"] for d in report["deployments"])
    assert slow_ms > 150 > fast_ms


def test_aliases_answer_and_are_listed(serve, fakes):
    (fake,) = fakes(1)
    srv = serve({"model_aliases": {"gpt-3.5-turbo": "mistral"}, "models": [entry(fake, "mistral")]})
    assert chat(srv, model="gpt-3.5-turbo") == (ANSWER, "mistral")
    sdk = client(srv)
    assert [m.id for m in sdk.models.list()] == ["mistral", "gpt-3.5-turbo"]
    assert sdk.models.retrieve("gpt-3.5-turbo").id == "gpt-3.5-turbo"
    assert fake.requests[-1].json["model"] == "upstream-model"


@pytest.fixture
def health_backend(monkeypatch):
    monkeypatch.setitem(registry.BACKENDS, "vllm-health", "tests.fakes.faulty:HealthCheckedBackend")


def wait_until(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_health_checks_take_a_deployment_out_and_back(serve, fakes, health_backend):
    sick, well = fakes(2)
    sick.healthy = False
    srv = serve(
        {
            "router": {"health_check_interval": 0.1, "health_check_timeout": 1},
            "models": [
                entry(sick, backend="vllm-health", weight=1000),
                entry(well, backend="vllm-health", weight=0.001),
            ],
        }
    )
    assert wait_until(lambda: states(srv) == ["unhealthy", "ok"])
    for _ in range(3):
        assert chat(srv) == (ANSWER, "m")
    assert (sick.served, well.served) == (0, 3)
    sick.healthy = True
    assert wait_until(lambda: states(srv) == ["ok", "ok"])
    assert chat(srv) == (ANSWER, "m")
    assert sick.served == 1


def test_shutdown_lets_an_in_flight_stream_finish(serve, fakes):
    (fake,) = fakes(1)
    fake.reply = [f" t{i}" for i in range(12)]
    fake.behaviour.delay_between_chunks = 0.2
    srv = serve({"models": [entry(fake)]})
    stream = client(srv).chat.completions.create(model="m", messages=MESSAGES, stream=True)
    chunks = iter(stream)
    next(chunks)
    stopper = threading.Thread(target=srv.stop)
    stopper.start()  # what SIGTERM does: stop accepting, drain, then close the gateway

    def refused() -> bool:
        try:
            httpx.get(srv.url + "/health", timeout=1)
        except httpx.ConnectError:
            return True
        return False

    assert wait_until(refused)  # new connections are refused while the stream goes on
    rest = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert rest.endswith(" t10 t11")
    stopper.join(5)
    assert not stopper.is_alive()
    assert fake.closed_streams == 0  # nothing was cut


def test_an_ollama_deployment_without_its_model_pulled_is_retried_on_the_other(serve):
    """Ollama's 404 `model "x" not found` is the entry's `upstream_model`, not the
    client's request: the deployment that has the model answers every request."""
    with FakeOllama() as ollama:
        pulled = {"name": "m", "backend": "ollama", "url": ollama.url, "weight": 0.001}
        srv = serve(
            {
                "router": {"allowed_fails": 100},
                "models": [
                    {**pulled, "upstream_model": "nope", "weight": 1000},
                    {**pulled, "upstream_model": "llama3.2"},
                ],
            }
        )
        for stream in (False, True, False, True):
            raw = client(srv).chat.completions.with_raw_response.create(
                model="m", messages=MESSAGES, stream=stream
            )
            assert raw.status_code == 200
        assert [r.json["model"] for r in ollama.requests] == ["nope", "llama3.2"] * 4


def test_an_upstream_url_with_a_query_string_keeps_it_on_every_call(serve, fakes):
    """`url: http://host/v1?api-version=...`: routes join the path, the query is sent."""
    (fake,) = fakes(1)
    srv = serve({"models": [entry(fake.url + "/v1?api-version=2024-01-01")]})
    for stream in (False, True):
        assert chat(srv, stream) == (ANSWER, "m")
    assert [(r.path, r.query) for r in fake.requests] == [
        ("/v1/chat/completions", {"api-version": "2024-01-01"})
    ] * 2
