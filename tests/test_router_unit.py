"""Router parts in isolation: state store, breaker, limits, strategies, Retry-After, the
attempt loop with scripted backends (fan-out included), drain, and config validation."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from inferbridge.backends.base import Backend
from inferbridge.config import ConfigError, DeploymentConfig, RouterConfig, load_config
from inferbridge.errors import (
    InvalidRequest,
    RateLimited,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
)
from inferbridge.events import Event, Finish, TextDelta
from inferbridge.request import InferenceRequest, RouteInfo
from inferbridge.router import Router
from inferbridge.routing.attempts import retry_after_seconds, routed_stream
from inferbridge.routing.breaker import COOLING, HALF_OPEN, OK, Breaker
from inferbridge.routing.drain import Drain
from inferbridge.routing.limits import Limiter
from inferbridge.routing.state import MemoryStateStore
from inferbridge.routing.strategies import latency_based, least_busy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- state and breaker ----------------------------------------------------------------------
def test_failures_expire_after_the_window():
    store = MemoryStateStore(fail_window=10)
    assert store.add_failure("a", 100) == 1
    assert store.add_failure("a", 105) == 2
    assert store.failures("a", 111) == 1
    assert store.add_failure("a", 116) == 1


def test_latency_is_a_decaying_average_that_goes_stale():
    store = MemoryStateStore(latency_window=60, alpha=0.5)
    store.add_latency("a", 1.0, 0)
    store.add_latency("a", 3.0, 1)
    assert store.latency("a", 2) == 2.0
    assert store.latency("a", 62) is None  # stale: measure again
    store.add_latency("a", 0.5, 70)
    assert store.latency("a", 70) == 0.5  # a stale average is replaced, not blended


def test_breaker_cools_down_then_lets_one_probe_through():
    store = MemoryStateStore()
    breaker = Breaker(store, allowed_fails=2, cooldown=5)
    assert not breaker.on_failure("a", 100)
    assert breaker.on_failure("a", 101)
    assert breaker.state("a", 103) == COOLING and not breaker.usable("a", 103)
    assert breaker.state("a", 106) == HALF_OPEN and breaker.usable("a", 106)
    assert store.claim_probe("a") and not breaker.usable("a", 106)
    breaker.on_success("a", probe=True)
    assert breaker.state("a", 106) == OK and not store.probing("a")
    assert store.failures("a", 106) == 0


def test_a_failed_probe_cools_down_again_and_single_deployments_never_trip():
    store = MemoryStateStore()
    breaker = Breaker(store, allowed_fails=1, cooldown=5)
    breaker.on_failure("a", 100)
    store.claim_probe("a")
    assert breaker.on_failure("a", 106, probe=True)
    assert breaker.state("a", 110) == COOLING and not store.probing("a")
    assert not breaker.on_failure("b", 100, trip=False)
    assert breaker.state("b", 100) == OK and store.failures("b", 100) == 1


# -- limits -----------------------------------------------------------------------------------
async def test_a_freed_slot_goes_to_the_oldest_waiter():
    store = MemoryStateStore()
    limit = Limiter(store, "a", max_concurrent=1, max_queue=2, queue_timeout=1)
    assert limit.has_room()
    limit.take()
    assert not limit.has_room() and limit.can_queue()
    order: list[int] = []

    async def waiter(k: int) -> None:
        await limit.wait("m")
        order.append(k)

    first = asyncio.create_task(waiter(1))
    await asyncio.sleep(0)
    second = asyncio.create_task(waiter(2))
    await asyncio.sleep(0)
    assert limit.queued == 2 and not limit.can_queue()
    limit.release()
    await first
    assert order == [1] and store.in_flight("a") == 1 and not limit.has_room()
    limit.release()
    await second
    assert order == [1, 2] and limit.queued == 0


async def test_queue_timeout_is_a_429_and_a_cancelled_waiter_passes_its_slot_on():
    store = MemoryStateStore()
    limit = Limiter(store, "a", max_concurrent=1, max_queue=2, queue_timeout=0.05)
    limit.take()
    with pytest.raises(RateLimited) as info:
        await limit.wait("m")
    assert info.value.headers == {"Retry-After": "1"} and limit.queued == 0
    limit.queue_timeout = 5
    gone = asyncio.create_task(limit.wait("m"))
    stays = asyncio.create_task(limit.wait("m"))
    await asyncio.sleep(0)
    gone.cancel()
    limit.release()
    await stays
    assert store.in_flight("a") == 1


# -- strategies -------------------------------------------------------------------------------
class _D:
    def __init__(self, id: str) -> None:
        self.id = id
        self.weight = 1.0


def test_least_busy_and_latency_based_pick():
    store = MemoryStateStore()
    a, b, c = _D("a"), _D("b"), _D("c")
    for key, load in (("a", 2), ("b", 0), ("c", 1)):
        for _ in range(load):
            store.begin(key)
    assert least_busy([a, b, c], store, 0) is b
    store.add_latency("a", 0.3, 0)
    store.add_latency("b", 0.1, 0)
    assert latency_based([a, b, c], store, 0) is c  # unmeasured first
    store.add_latency("c", 0.2, 0)
    assert latency_based([a, b, c], store, 0) is b


def test_retry_after_values():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("0.5") == 0.5
    assert retry_after_seconds("Wed, 21 Oct 2099 07:28:00 GMT") > 1e8
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_backoff_is_jittered_and_capped():
    router = Router([], RouterConfig(retry_backoff=0.1, retry_backoff_max=0.3))
    random.seed(1)
    waits = [router.backoff(n) for n in range(5)]
    assert 0.05 <= waits[0] <= 0.1 and all(w <= 0.3 for w in waits)
    assert waits[4] >= 0.15


# -- the attempt loop with scripted backends --------------------------------------------------
class Scripted(Backend):
    """Fails with the next scripted error, if any; else streams "a", "b"."""

    supported_params = frozenset({"n", "max_tokens"})

    def __init__(self, name: str, errors: list[Exception] | None = None, **kw) -> None:
        super().__init__(DeploymentConfig(name=name, backend="echo", **kw))
        self.errors = list(errors or [])
        self.calls = 0

    async def stream(self, request: InferenceRequest) -> AsyncIterator[list[Event]]:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        yield [TextDelta("a")]
        await asyncio.sleep(0)
        yield [TextDelta("b"), Finish("stop")]


def request(model: str = "m", **params) -> InferenceRequest:
    return InferenceRequest(
        "chat", model, params, messages=[{"role": "user", "content": "x"}], stream=True
    )


async def run(router: Router, req: InferenceRequest) -> tuple[list[Event], RouteInfo]:
    route = RouteInfo()
    events = [
        e
        async for batch in routed_stream(router, router.resolve(req.model), req, route, Drain())
        for e in batch
    ]
    return events, route


def boom(label: str = "x") -> UpstreamError:
    return UpstreamError(f"{label} failed", backend=label)


async def test_retries_then_fallback_fill_the_route_info():
    a = Scripted("m", [boom(), boom(), boom()])
    b = Scripted("backup")
    router = Router([a, b], RouterConfig(retry_backoff=0, models={"m": {"fallbacks": ["backup"]}}))
    events, route = await run(router, request())
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["a", "b"]
    assert (route.model, route.attempts, a.calls, b.calls) == ("backup", 4, 3, 1)


async def test_non_retryable_errors_and_invalid_requests_stop_at_once():
    a = Scripted("m", [UpstreamRejected("bad", status=400), InvalidRequest("no")], weight=1e6)
    b = Scripted("m", weight=1e-6)
    router = Router([a, b], RouterConfig(retry_backoff=0))
    with pytest.raises(UpstreamRejected):
        await run(router, request())
    with pytest.raises(InvalidRequest):
        await run(router, request())
    assert b.calls == 0 and router.store.in_flight("m[0]") == 0


async def test_fan_out_is_retried_as_a_whole_and_keeps_choice_indices():
    a = Scripted("m", [UpstreamTimeout("slow", backend="x")], weight=1e6)
    b = Scripted("m", weight=1e-6)
    router = Router([a, b], RouterConfig(retry_backoff=0))
    events, route = await run(router, request(n=2))
    assert sorted(e.index for e in events if isinstance(e, Finish)) == [0, 1]
    assert route.attempts == 2 and b.calls == 2


async def test_the_slot_is_released_when_the_client_leaves_mid_stream():
    router = Router([Scripted("m", max_concurrent=1)])
    drain = Drain()
    stream = routed_stream(router, router.resolve("m"), request(), RouteInfo(), drain)
    await stream.__anext__()
    assert router.store.in_flight("m[0]") == 1 and drain.active == 1
    await stream.aclose()
    assert router.store.in_flight("m[0]") == 0 and drain.active == 0


async def test_a_death_mid_stream_is_raised_not_retried_and_counted():
    class Dies(Scripted):
        async def stream(self, request):
            self.calls += 1
            yield [TextDelta("a")]
            raise boom()

    a, b = Dies("m"), Dies("m")
    router = Router([a, b], RouterConfig(allowed_fails=1, retry_backoff=0))
    got = []
    with pytest.raises(UpstreamError):
        async for batch in routed_stream(
            router, router.resolve("m"), request(), RouteInfo(), Drain()
        ):
            got.extend(batch)
    assert len(got) == 1 and a.calls + b.calls == 1
    assert [s["state"] for s in router.readiness()[1]["models"]["m"]["deployments"]].count(
        "cooling_down"
    ) == 1


async def test_drain_waits_for_requests_in_progress():
    drain = Drain()
    assert await drain.wait(0.01)
    drain.enter()
    assert not await drain.wait(0.01)
    asyncio.get_running_loop().call_later(0.02, drain.leave)
    assert await drain.wait(1)


# -- config ------------------------------------------------------------------------------------
def test_routing_config_errors_name_the_field():
    with pytest.raises(ConfigError) as info:
        load_config(
            data={
                "model_aliases": {"gpt-4": "nope", "m": "m"},
                "router": {"models": {"ghost": {}, "m": {"fallbacks": ["missing"]}}},
                "models": [{"name": "m", "backend": "echo"}],
            },
            environ={},
        )
    text = str(info.value)
    assert "model_aliases.gpt-4: unknown model 'nope'" in text
    assert "model_aliases.m: 'm' is already a model name" in text
    assert "router.models.ghost: unknown model 'ghost'" in text
    assert "router.models.m.fallbacks: unknown model 'missing'" in text
    with pytest.raises(ConfigError, match=r"router\.strategy"):
        load_config(data={"router": {"strategy": "fastest"}}, environ={})
    with pytest.raises(ConfigError, match=r"models\[0\] \(m\): max_concurrent"):
        load_config(
            data={"models": [{"name": "m", "backend": "echo", "max_concurrent": 0}]}, environ={}
        )


def test_drain_timeout_from_file_and_env():
    assert load_config(environ={}).server.drain_timeout == 30
    cfg = load_config(data={"server": {"drain_timeout": 3}}, environ={})
    assert cfg.server.drain_timeout == 3
    assert load_config(environ={"INFERBRIDGE_DRAIN_TIMEOUT": "5"}).server.drain_timeout == 5


async def test_gateway_close_waits_for_streams_in_progress_then_closes_backends():
    from inferbridge.gateway import Gateway

    config = load_config(
        data={
            "server": {"drain_timeout": 2},
            "models": [{"name": "m", "backend": "echo", "delay": 0.01}],
        },
        environ={},
    )
    gateway = Gateway(config)
    closed: list[bool] = []

    async def close() -> None:
        closed.append(True)

    gateway.backends[0].close = close  # type: ignore[method-assign]
    await gateway.start()
    stream, _ = gateway.open_stream(request(), RouteInfo())
    await stream.__anext__()
    closing = asyncio.create_task(gateway.close())
    await asyncio.sleep(0.05)
    assert not closing.done() and not closed
    async for _ in stream:
        pass
    await asyncio.wait_for(closing, 1)
    assert closed == [True]


def test_an_attempt_copies_every_field_and_owns_its_dicts():
    """`InferenceRequest.copy` (what each attempt's `prepare` changes) keeps every field,
    a field added later included, and gives the attempt its own params, extras and body."""
    import dataclasses

    values = {
        "kind": "completion",
        "model": "m",
        "params": {"temperature": 0.5},
        "extras": {"top_k": 3},
        "messages": [{"role": "user", "content": "hi"}],
        "prompt": "p",
        "stream": True,
        "include_usage": True,
        "body": {"model": "m"},
        "request_id": "rid",
        "ignored": [],  # a fresh list per attempt
        "input": ["to embed"],
        "responses_body": {"input": "hi"},
        "key": "team",
    }
    assert set(values) == {f.name for f in dataclasses.fields(InferenceRequest)}
    original = InferenceRequest(**values)
    copy = original.copy()
    for name, value in values.items():
        assert getattr(copy, name) == value, name
    copy.params["temperature"] = 1.0
    copy.extras.clear()
    copy.body["model"] = "other"
    assert original.params == {"temperature": 0.5}
    assert original.extras == {"top_k": 3}
    assert original.body == {"model": "m"}
