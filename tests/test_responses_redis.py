"""The Responses API's store in Redis (`state: {store: redis}`): `RedisResponseStore` against
a real redis-server (put/get/delete, expiry, owners, the size bound, Redis down), and two
inferbridge servers sharing it: a response made through one is retrieved, continued and
deleted through the other with the official SDK."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import orjson
import pytest

from inferbridge.api.responses_api.store import RedisResponseStore, StoredResponse
from inferbridge.config import StateConfig
from inferbridge.errors import InferbridgeError
from tests.redis_server import RedisServer
from tests.redis_server import missing as redis_missing
from tests.server import InferbridgeServer

KEY = "sk-test"
OTHER = "sk-other"
TIMEOUT = 0.2
"""`state.timeout` of the tests that stop Redis."""
SLACK = 0.3
"""What a call may take past the timeout (a loaded machine)."""


def record(rid: str, owner: str = "", size: int = 10) -> StoredResponse:
    items = [{"type": "message", "role": "user", "content": "hi"}]
    return StoredResponse(rid, owner, {"id": rid, "output": ["x" * size]}, items)


def prefix() -> str:
    return f"r{random.randrange(1 << 40):x}"


async def open_store(url: str, timeout: float = 2.0, **kw: Any) -> RedisResponseStore:
    from inferbridge.shared.client import RedisClient

    client = RedisClient(StateConfig(store="redis", url=url, prefix=prefix(), timeout=timeout))
    await client.start()
    return RedisResponseStore(client, **kw)


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisResponseStore]:
    store = await open_store(redis_server.url)
    yield store
    await store.client.close()


# -- the store on its own -------------------------------------------------------------------
async def test_put_get_delete(store: RedisResponseStore) -> None:
    await store.put(record("resp_a"))
    found = await store.get("resp_a", "")
    assert found is not None
    assert found.id == "resp_a" and found.owner == ""
    assert found.response == {"id": "resp_a", "output": ["x" * 10]}
    assert found.input_items == [{"type": "message", "role": "user", "content": "hi"}]
    assert await store.get("resp_unknown", "") is None
    assert await store.delete("resp_a", "")
    assert await store.get("resp_a", "") is None
    assert not await store.delete("resp_a", "")


async def test_one_key_per_response_with_its_ttl(store: RedisResponseStore) -> None:
    await store.put(record("resp_k", owner="k1"))
    redis = store.client.redis
    key = store.key("resp_k", "k1")
    assert key == f"{store.client.prefix}:response:k1:resp_k"
    assert await redis.keys(f"{store.client.prefix}:response:*") == [key]
    assert 3590_000 < await redis.pttl(key) <= 3600_000
    data = orjson.loads(await redis.get(key))
    assert data["id"] == "resp_k" and data["owner"] == "k1"
    assert data["response"]["id"] == "resp_k" and len(data["input_items"]) == 1


async def test_records_expire_after_the_ttl(redis_server: RedisServer) -> None:
    store = await open_store(redis_server.url, ttl=0.3)
    try:
        await store.put(record("resp_t"))
        assert await store.get("resp_t", "") is not None
        await asyncio.sleep(0.45)
        assert await store.get("resp_t", "") is None
        assert not await store.delete("resp_t", "")
    finally:
        await store.client.close()


async def test_records_belong_to_their_owner(store: RedisResponseStore) -> None:
    await store.put(record("resp_o", owner="k1"))
    assert await store.get("resp_o", "k2") is None
    assert await store.get("resp_o", "") is None
    assert not await store.delete("resp_o", "k2")
    assert (await store.get("resp_o", "k1")) is not None  # still there
    assert await store.delete("resp_o", "k1")
    await store.put(record("resp_n"))  # without keys: owner ""
    assert await store.get("resp_n", "k1") is None
    assert await store.get("resp_n", "") is not None


async def test_a_record_over_the_size_bound_is_not_stored(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = await open_store(redis_server.url, max_record_bytes=1000)
    try:
        await store.put(record("resp_small", size=500))
        with caplog.at_level(logging.WARNING, logger="inferbridge"):
            await store.put(record("resp_big", size=2000))
        assert await store.get("resp_big", "") is None
        assert await store.get("resp_small", "") is not None
        assert any(
            "resp_big not stored" in r.message and "max_record_bytes" in r.message
            for r in caplog.records
        )
    finally:
        await store.client.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, to stop or pause."""
    reason = redis_missing()
    if reason:
        pytest.skip(reason)
    with RedisServer() as server:
        yield server


def assert_unavailable(exc: InferbridgeError) -> None:
    assert exc.status == 503 and exc.code == "store_unavailable"
    assert exc.headers == {"Retry-After": "1"}


@pytest.mark.parametrize("outage", ["paused", "stopped"])
async def test_redis_down_within_the_timeout(
    own_redis: RedisServer, outage: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = await open_store(own_redis.url, timeout=TIMEOUT)
    try:
        await store.put(record("resp_before"))
        if outage == "paused":
            own_redis.pause()
        else:
            own_redis.stop()
        for attempt in range(2):  # the first call times out or is refused, the next is cut short
            started = time.monotonic()
            with pytest.raises(InferbridgeError) as raised:
                await store.get("resp_before", "")
            assert time.monotonic() - started < TIMEOUT + SLACK, attempt
            assert_unavailable(raised.value)
        with pytest.raises(InferbridgeError) as raised:
            await store.delete("resp_before", "")
        assert_unavailable(raised.value)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="inferbridge"):
            await store.put(record("resp_during"))  # no exception: logged
        assert time.monotonic() - started < TIMEOUT + SLACK
        assert any("resp_during not stored" in r.message for r in caplog.records)
        # Redis back: the store answers again (after the client's short pause)
        if outage == "paused":
            own_redis.resume()
        else:
            own_redis.start()
        await asyncio.sleep(0.6)
        deadline = time.monotonic() + 5
        while True:
            try:
                found = await store.get("resp_before", "")
                break
            except InferbridgeError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        assert (found is not None) == (outage == "paused")  # a restart forgot it
    finally:
        if outage == "paused":
            own_redis.resume()
        await store.client.close()


# -- two servers on one Redis ---------------------------------------------------------------
def config(url: str, name: str, **state: Any) -> dict[str, Any]:
    return {
        "auth": {"api_keys": [KEY, OTHER]},
        "state": {"store": "redis", "url": url, "prefix": name, "timeout": 1.0, **state},
        "models": [{"name": "echo", "backend": "echo"}],
    }


@dataclass
class Replicas:
    one: openai.OpenAI
    two: openai.OpenAI
    other_on_two: openai.OpenAI
    """Another API key, on server two."""


@pytest.fixture(scope="module")
def replicas(redis_server: RedisServer) -> Iterator[Replicas]:
    name = prefix()
    with (
        InferbridgeServer(config(redis_server.url, name), api_key=KEY) as one,
        InferbridgeServer(config(redis_server.url, name), api_key=KEY) as two,
    ):
        other = openai.OpenAI(base_url=two.base_url, api_key=OTHER, max_retries=0, timeout=20)
        yield Replicas(one.openai(), two.openai(), other)


def test_created_on_one_retrieved_and_continued_on_the_other(replicas: Replicas) -> None:
    r1 = replicas.one.responses.create(model="echo", input="first turn")
    assert r1.store is True and r1.output_text == "first turn"
    got = replicas.two.responses.retrieve(r1.id)
    assert got.id == r1.id and got.output_text == "first turn"
    assert got.model_dump() == r1.model_dump()
    r2 = replicas.two.responses.create(
        model="echo", input="second turn", previous_response_id=r1.id
    )
    assert r2.previous_response_id == r1.id and r2.output_text == "second turn"
    # echo counts the words of every message it was given: 2, then 2 + 2 + 2
    assert r1.usage.input_tokens == 2 and r2.usage.input_tokens == 6
    # and back: the continuation made on two is continued on one
    r3 = replicas.one.responses.create(model="echo", input="third turn", previous_response_id=r2.id)
    assert r3.output_text == "third turn" and r3.usage.input_tokens == 10


def test_a_stream_on_one_is_continued_on_the_other(replicas: Replicas) -> None:
    with replicas.one.responses.stream(model="echo", input="streamed turn") as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert replicas.two.responses.retrieve(final.id).output_text == "streamed turn"
    r2 = replicas.two.responses.create(
        model="echo", input="after the stream", previous_response_id=final.id
    )
    assert r2.output_text == "after the stream" and r2.usage.input_tokens == 7


def test_owners_and_delete_across_servers(replicas: Replicas) -> None:
    r1 = replicas.one.responses.create(model="echo", input="mine")
    other = replicas.other_on_two
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(r1.id)
    with pytest.raises(openai.NotFoundError) as raised:
        other.responses.create(model="echo", input="x", previous_response_id=r1.id)
    assert raised.value.body["param"] == "previous_response_id"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(r1.id)
    replicas.two.responses.delete(r1.id)
    with pytest.raises(openai.NotFoundError):
        replicas.one.responses.retrieve(r1.id)


def test_store_false_keeps_nothing_in_redis(replicas: Replicas) -> None:
    r1 = replicas.one.responses.create(model="echo", input="unstored", store=False)
    with pytest.raises(openai.NotFoundError):
        replicas.two.responses.retrieve(r1.id)


def test_redis_down_answers_503_and_still_answers_creates(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    with InferbridgeServer(config(own_redis.url, prefix(), timeout=TIMEOUT), api_key=KEY) as srv:
        client = srv.openai()
        r1 = client.responses.create(model="echo", input="before")
        own_redis.pause()
        try:
            started = time.monotonic()
            answer = httpx.get(
                f"{srv.base_url}/responses/{r1.id}",
                headers={"authorization": f"Bearer {KEY}"},
                timeout=10,
            )
            assert time.monotonic() - started < TIMEOUT + 0.5
            assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
            error = answer.json()["error"]
            assert error["code"] == "store_unavailable" and error["type"] == "server_error"
            with pytest.raises(openai.InternalServerError) as raised:
                client.responses.create(model="echo", input="next", previous_response_id=r1.id)
            assert raised.value.status_code == 503
            with pytest.raises(openai.InternalServerError):
                client.responses.delete(r1.id)
            # a new response is answered; storing it fails with a warning
            with caplog.at_level(logging.WARNING, logger="inferbridge"):
                started = time.monotonic()
                r2 = client.responses.create(model="echo", input="during")
                assert time.monotonic() - started < TIMEOUT + 1.0
            assert r2.output_text == "during"
            assert any(f"{r2.id} not stored" in r.message for r in caplog.records)
        finally:
            own_redis.resume()
        deadline = time.monotonic() + 5
        while True:  # Redis back: the stored response is there again
            try:
                assert client.responses.retrieve(r1.id).output_text == "before"
                break
            except openai.InternalServerError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
