"""Keys, limits and usage: the windows with a fake clock (in memory and in a real Redis,
which must agree), key hashing and the `inferbridge keys` command, and what clients see
through the official SDK (401, 404, 429 and the x-ratelimit-* headers, /v1/usage)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest
import yaml

from inferbridge import cli
from inferbridge.config import AuthConfig, StateConfig, load_config
from inferbridge.config_source import ConfigError
from inferbridge.errors import AuthenticationFailed
from inferbridge.keys import KeyRing, digest_line, new_key
from inferbridge.quotas import (
    WINDOW,
    MemoryQuotaStore,
    QuotaStore,
    SlidingWindow,
    Subject,
    duration,
    limit_headers,
)
from tests.redis_server import RedisServer
from tests.server import InferbridgeServer

T0 = 1_000_000.25
"""A fake clock's start: second 1000000, a quarter in."""


# -- the windows, in memory and in Redis ----------------------------------------------------
@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[QuotaStore]:
    if request.param == "memory":
        yield MemoryQuotaStore(clock=lambda: T0)
        return
    from inferbridge.shared.client import RedisClient
    from inferbridge.shared.quotas import RedisQuotaStore

    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"t{random.randrange(1 << 40):x}"
    client = RedisClient(StateConfig(store="redis", url=server.url, prefix=prefix, timeout=2))
    await client.start()
    quotas = RedisQuotaStore(client)
    quotas.flush = client.flush  # type: ignore[attr-defined]
    yield quotas
    await client.close()


async def settle(store: QuotaStore) -> None:
    """What `finish` queued has reached the store (Redis sends it in the background)."""
    flush = getattr(store, "flush", None)
    if flush is not None:
        await flush()


async def test_rpm_counts_each_request_for_60_to_61_seconds(store: QuotaStore) -> None:
    key = Subject("key", "k", rpm=3)
    for offset, expected in ((0, 1), (10, 2), (59.5, 3)):
        verdict = await store.admit([key], "l", now=T0 + offset)
        assert verdict.admitted
        assert verdict.readings[0].requests == expected
    refused = await store.admit([key], "l", now=T0 + 59.9)
    assert not refused.admitted
    assert refused.readings[0].requests == 3
    # the first request (second 1000000) is forgotten when second 1000061 starts
    assert refused.readings[0].requests_retry == pytest.approx(61 - 60.15, abs=0.002)
    assert not (await store.admit([key], "l", now=T0 + 60.74)).admitted
    again = await store.admit([key], "l", now=T0 + 60.75)
    assert again.admitted and again.readings[0].requests == 3
    assert again.readings[0].requests_reset == pytest.approx(61, abs=0.002)


async def test_a_refused_request_counts_nowhere(store: QuotaStore) -> None:
    key, model = Subject("key", "a", rpm=5), Subject("model", "m", rpm=2)
    assert (await store.admit([key, model], "l1", now=T0)).admitted
    assert (await store.admit([key, model], "l2", now=T0)).admitted
    refused = await store.admit([key, model], "l3", now=T0)
    assert not refused.admitted
    assert [r.requests for r in refused.readings] == [2, 2]
    alone = await store.admit([key], "l4", now=T0)
    assert alone.readings[0].requests == 3  # the refused check did not count for the key


async def test_tpm_refuses_once_the_window_is_spent(store: QuotaStore) -> None:
    key = Subject("key", "t", tpm=25)
    for used in (0, 10, 20):
        verdict = await store.admit([key], "l", now=T0 + used)
        assert verdict.admitted and verdict.readings[0].tokens == used
        store.finish([key], "l", 10, None, now=T0 + used)
        await settle(store)
    refused = await store.admit([key], "l", now=T0 + 30)
    assert not refused.admitted and refused.readings[0].tokens == 30
    # 30 - 10 (second 1000000) = 20 < 25: room again once that second is forgotten
    assert refused.readings[0].tokens_retry == pytest.approx(61 - 30.25, abs=0.002)
    assert (await store.admit([key], "l", now=T0 + 60.75)).admitted


async def test_max_parallel_until_finished(store: QuotaStore) -> None:
    key = Subject("key", "p", max_parallel=2)
    assert (await store.admit([key], "a")).admitted
    assert (await store.admit([key], "b")).admitted
    refused = await store.admit([key], "c")
    assert not refused.admitted and refused.readings[0].parallel == 2
    store.finish([key], "a", 0, None)
    await settle(store)
    verdict = await store.admit([key], "c")
    assert verdict.admitted and verdict.readings[0].parallel == 2


async def test_usage_counters(store: QuotaStore) -> None:
    store.finish([], "", 0, ("team", "m", 3, 4), now=T0)
    store.finish([], "", 0, ("team", "m", 1, 1), now=T0 + 1)
    store.finish([], "", 0, ("team", "m", 5, 5), now=T0 - 86_400)
    await settle(store)
    days = ["1970-01-12", "1970-01-11"]
    found = await store.usage(days)
    assert found["1970-01-12"] == {("team", "m"): [2, 4, 5]}
    assert found["1970-01-11"] == {("team", "m"): [1, 5, 5]}


async def test_memory_and_redis_agree_and_never_exceed_the_limit(
    redis_server: RedisServer,
) -> None:
    """The same random arrivals through both stores: the same verdicts, and never more than
    rpm admitted within any 60 seconds."""
    from inferbridge.shared.client import RedisClient
    from inferbridge.shared.quotas import RedisQuotaStore

    client = RedisClient(
        StateConfig(store="redis", url=redis_server.url, prefix="agree", timeout=2)
    )
    await client.start()
    try:
        memory, shared = MemoryQuotaStore(), RedisQuotaStore(client)
        key = Subject("key", "r", rpm=7)
        rng = random.Random(7)
        now = T0
        admitted: list[float] = []
        for _ in range(150):
            now += rng.expovariate(1 / 1.6)
            a = await memory.admit([key], "x", now=now)
            b = await shared.admit([key], "x", now=now)
            assert a.admitted == b.admitted
            assert a.readings[0].requests == b.readings[0].requests
            if a.admitted:
                admitted.append(now)
        assert len(admitted) > 20  # at most 7 a minute over about 4 minutes
        for i, t in enumerate(admitted):
            assert sum(1 for u in admitted[: i + 1] if t - u < WINDOW) <= 7
    finally:
        await client.close()


def test_sliding_window_alone() -> None:
    window = SlidingWindow()
    window.add(T0, 3)
    window.add(T0 + 0.5, 2)  # the same second
    window.add(T0 + 30, 1)
    assert window.used(T0 + 31) == 6
    assert window.retry(T0 + 31, 5) == pytest.approx(61 - 31.25)
    assert window.reset(T0 + 31) == pytest.approx(30 + 61 - 31.25)
    assert window.used(T0 + 60.75) == 1
    assert window.used(T0 + 90.75) == 0 and window.empty()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.02, "20ms"),
        (1, "1s"),
        (8.64, "8.64s"),
        (59.9999, "1m0s"),
        (360, "6m0s"),
        (61.25, "1m1.25s"),
        (3723, "1h2m3s"),
    ],
)
def test_reset_durations_as_openai_writes_them(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_headers_show_the_tightest_limit() -> None:
    from inferbridge.quotas import Reading

    key, model = Subject("key", "k", rpm=10, tpm=1000), Subject("model", "m", rpm=100)
    readings = [Reading(9, 0, 30, 500, 0, 12), Reading(20, 0, 60, 0, 0, 0)]
    assert limit_headers([key, model], readings) == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "30s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "500",
        "x-ratelimit-reset-tokens": "12s",
    }


# -- keys -----------------------------------------------------------------------------------
def ring(**auth: Any) -> KeyRing:
    return KeyRing(AuthConfig.model_validate(auth))


def test_keys_are_kept_and_compared_as_digests() -> None:
    digest = hashlib.sha256(b"sk-digest").hexdigest()
    keys = ring(
        api_keys=["sk-plain", f"sha256:{digest.upper()}"],
        keys=[
            {"name": "team", "key": "sk-team", "models": ["echo"], "rpm": 3},
            {"name": "hashed", "key_sha256": hashlib.sha256(b"sk-hashed").hexdigest()},
        ],
        admin_keys=["sk-admin"],
    )
    assert keys.authenticate("sk-plain").name == "api_keys[0]"
    assert keys.authenticate("sk-digest").name == "api_keys[1]"
    team = keys.authenticate("sk-team")
    assert (team.name, team.rpm, team.allows("echo"), team.allows("other")) == (
        "team",
        3,
        True,
        False,
    )
    assert keys.authenticate("sk-hashed").name == "hashed"
    assert keys.authenticate("sk-admin").admin
    for wrong in ("sk-Team", "sk-team ", f"sha256:{digest}", digest):
        with pytest.raises(AuthenticationFailed) as info:
            keys.authenticate(wrong)
        assert wrong not in info.value.message
    with pytest.raises(AuthenticationFailed, match="Missing"):
        keys.authenticate(None)
    assert "sk-team" not in repr(
        load_config(data={"auth": {"keys": [{"name": "t", "key": "sk-team"}]}}, environ={})
    )


def test_expired_keys_and_bad_key_config() -> None:
    keys = ring(keys=[{"name": "old", "key": "sk-old", "expires_at": "2000-01-01T00:00:00"}])
    with pytest.raises(AuthenticationFailed) as info:
        keys.authenticate("sk-old")
    assert info.value.code == "expired_api_key" and info.value.status == 401
    with pytest.raises(ConfigError, match="same secret"):
        ring(api_keys=["sk-x"], keys=[{"name": "x", "key": "sk-x"}])
    with pytest.raises(ConfigError, match="64 hex digits"):
        ring(api_keys=["sha256:abc"])
    for bad, message in [
        ({"keys": [{"name": "a"}]}, "exactly one of key and key_sha256"),
        ({"keys": [{"name": "a", "key": "x", "key_sha256": "0" * 64}]}, "exactly one"),
        ({"keys": [{"name": "a", "key": "x"}, {"name": "a", "key": "y"}]}, "named 'a'"),
        ({"keys": [{"name": "a", "key": "x", "models": ["nope"]}]}, "unknown model 'nope'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(data={"auth": bad}, environ={})
    with pytest.raises(ConfigError, match="needs url"):
        load_config(data={"state": {"store": "redis"}}, environ={})
    with pytest.raises(ConfigError, match="redis://"):
        load_config(data={"state": {"store": "redis", "url": "http://x"}}, environ={})


def test_keys_hash_and_new(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("sk-secret\n"))
    assert cli.main(["keys", "hash"]) == 0
    expected = hashlib.sha256(b"sk-secret").hexdigest()
    assert capsys.readouterr().out == f"key_sha256: {expected}\n"
    assert digest_line("sk-secret") == f"key_sha256: {expected}"

    assert cli.main(["keys", "new", "team a"]) == 0
    out = capsys.readouterr()
    key, line = out.out.splitlines()
    assert key.startswith("sk-ib-") and len(key) > 40 and key not in line
    assert "not stored" in out.err
    entry = yaml.safe_load(line)[0]
    assert entry["name"] == "team a"
    config = load_config(data={"auth": {"keys": [entry]}}, environ={})
    assert KeyRing(config.auth).authenticate(key).name == "team a"
    assert new_key("x")[0] != new_key("x")[0]

    # what the config would refuse is refused here, and one key is hashed at a time
    for name in ("", "api_keys[0]", "x" * 101):
        assert cli.main(["keys", "new", name]) == 2
        assert "invalid name" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("sk-one\nsk-two\n"))
    assert cli.main(["keys", "hash"]) == 2
    assert "one key" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="plain key"):
        load_config(data={"auth": {"keys": [{"name": "api_keys[0]", "key": "sk-a"}]}}, environ={})


def test_workers_with_limits_need_redis(tmp_path: Any, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"auth": {"keys": [{"name": "a", "key": "k", "rpm": 5}]}}))
    assert cli.main(["serve", "--config", str(path), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "auth.keys (a)" in err and "state: {store: redis" in err


# -- through the SDK ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server() -> Iterator[InferbridgeServer]:
    config = {
        "auth": {
            "keys": [
                {"name": "team", "key": "sk-team", "models": ["echo", "fast"], "rpm": 3},
                {"name": "wide", "key": "sk-wide"},
                {"name": "old", "key": "sk-old", "expires_at": "2001-01-01T00:00:00Z"},
                {"name": "hashed", "key_sha256": hashlib.sha256(b"sk-hashed").hexdigest()},
                {"name": "par", "key": "sk-par", "max_parallel": 1},
                {"name": "tok", "key": "sk-tok", "tpm": 10},
            ],
            "admin_keys": ["sk-admin"],
        },
        "model_aliases": {"fast": "echo"},
        "router": {"models": {"limited": {"rpm": 2}}},
        "models": [
            {"name": "echo", "backend": "echo"},
            {"name": "other", "backend": "echo"},
            {"name": "slow", "backend": "echo", "delay": 0.3},
            {"name": "limited", "backend": "echo"},
        ],
    }
    with InferbridgeServer(config) as srv:
        yield srv


def sdk(server: InferbridgeServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=20)


def say(client: openai.OpenAI, model: str = "echo", text: str = "one two three") -> Any:
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}]
    )


def test_401_for_wrong_expired_or_missing_keys(server: InferbridgeServer) -> None:
    for key, code in (("sk-nope", "invalid_api_key"), ("sk-old", "expired_api_key")):
        with pytest.raises(openai.AuthenticationError) as info:
            say(sdk(server, key))
        assert info.value.code == code
        assert key not in info.value.response.text
    answer = httpx.post(server.base_url + "/chat/completions", json={"model": "echo"})
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"
    assert say(sdk(server, "sk-hashed")).http_response.status_code == 200


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_404_for_models_a_key_may_not_use(server: InferbridgeServer) -> None:
    team = sdk(server, "sk-team")
    assert [m.id for m in team.models.list()] == ["echo", "fast"]
    with pytest.raises(openai.NotFoundError) as info:
        say(team, "other")
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        team.models.retrieve("other")
    assert team.models.retrieve("fast").id == "fast"
    wide = sdk(server, "sk-wide")
    assert {m.id for m in wide.models.list()} == {"echo", "other", "slow", "limited", "fast"}
    readiness = httpx.get(server.url + "/health/readiness", headers=bearer("sk-team")).json()
    assert set(readiness["models"]) == {"echo"} and set(readiness["aliases"]) == {"fast"}
    readiness = httpx.get(server.url + "/health/readiness", headers=bearer("sk-wide")).json()
    assert "other" in readiness["models"]


def test_429_per_key_with_headers(server: InferbridgeServer) -> None:
    team = sdk(server, "sk-team")
    seen = []
    for _ in range(3):
        answer = say(team, "fast")  # an alias counts for the key like its model
        headers = answer.http_response.headers
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-reset-requests"].endswith("s")
        seen.append(headers["x-ratelimit-remaining-requests"])
    assert seen == ["2", "1", "0"]
    with pytest.raises(openai.RateLimitError) as info:
        say(team)
    response = info.value.response
    assert 1 <= int(response.headers["retry-after"]) <= 61
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert "key 'team': 3 requests per minute (rpm)" in info.value.message


def test_429_per_model_for_every_key(server: InferbridgeServer) -> None:
    say(sdk(server, "sk-wide"), "limited")
    say(sdk(server, "sk-hashed"), "limited")
    with pytest.raises(openai.RateLimitError) as info:
        say(sdk(server, "sk-wide"), "limited")
    assert "model 'limited'" in info.value.message


def test_429_over_max_parallel(server: InferbridgeServer) -> None:
    client = sdk(server, "sk-par")
    first = threading.Thread(target=say, args=(client, "slow", "a b c d"))
    first.start()
    in_flight = 'inferbridge_requests_in_flight{model="slow"} 1.0'
    deadline = time.monotonic() + 5
    while in_flight not in httpx.get(server.url + "/metrics").text:  # the first one is in
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with pytest.raises(openai.RateLimitError) as info:
        say(client)
    assert "max_parallel" in info.value.message
    first.join()
    assert say(client).http_response.status_code == 200


def test_tpm_counts_the_answers_usage(server: InferbridgeServer) -> None:
    client = sdk(server, "sk-tok")
    left = []
    for _ in range(2):
        answer = say(client, text="one two three")  # 3 + 3 words
        left.append(answer.http_response.headers["x-ratelimit-remaining-tokens"])
    assert left == ["10", "4"]
    with pytest.raises(openai.RateLimitError, match="tokens per minute"):
        say(client)


def test_usage_for_admins_only(server: InferbridgeServer) -> None:
    wide = sdk(server, "sk-wide")
    say(wide, "other", "a b")
    with pytest.raises(openai.PermissionDeniedError):
        wide.get("/usage", cast_to=object)
    report = sdk(server, "sk-admin").get("/usage", cast_to=object)
    assert isinstance(report, dict) and report["store"] == "memory"
    today = report["days"][0]
    assert today["date"] == time.strftime("%Y-%m-%d", time.gmtime())
    row = next(r for r in today["usage"] if r["key"] == "wide" and r["model"] == "other")
    assert (
        row["requests"] >= 1
        and row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
    )
    metrics = httpx.get(server.url + "/metrics").text
    assert 'inferbridge_key_requests_total{key="wide",model="other",status="200"}' in metrics
    assert 'inferbridge_rate_limited_total{key="team",limit="key_rpm",model="echo"}' in metrics
    for secret in ("sk-team", "sk-wide", "sk-admin", "sk-hashed"):
        assert secret not in metrics


# -- the shared store from one process ------------------------------------------------------
def test_redis_down_at_start_allow_and_deny() -> None:
    from tests.redis_server import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    base = {
        "auth": {"keys": [{"name": "k", "key": "sk-k", "rpm": 5}]},
        "models": [{"name": "echo", "backend": "echo", "max_concurrent": 4}],
    }
    for policy, status in (("allow", 200), ("deny", 503)):
        config = {**base, "state": {"store": "redis", "url": dead, "on_store_error": policy}}
        with InferbridgeServer(config, api_key="sk-k") as srv:
            started = time.monotonic()
            answer = httpx.post(
                srv.base_url + "/chat/completions",
                json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": "Bearer sk-k"},
            )
            assert answer.status_code == status
            assert time.monotonic() - started < 1
            metrics = httpx.get(srv.url + "/metrics").text
            assert "inferbridge_state_store_errors_total" in metrics


def test_redis_store_in_one_process(redis_server: RedisServer) -> None:
    config = {
        "auth": {"keys": [{"name": "solo", "key": "sk-solo", "rpm": 2}], "admin_keys": ["sk-a"]},
        "state": {"store": "redis", "url": redis_server.url, "prefix": "solo", "timeout": 1},
        "models": [{"name": "echo", "backend": "echo"}],
    }
    with InferbridgeServer(config) as srv:
        client = sdk(srv, "sk-solo")
        assert [
            say(client).http_response.headers["x-ratelimit-remaining-requests"] for _ in "ab"
        ] == [
            "1",
            "0",
        ]
        with pytest.raises(openai.RateLimitError):
            say(client)
        time.sleep(0.1)
        report = sdk(srv, "sk-a").get("/usage", cast_to=object)
        assert isinstance(report, dict) and report["store"] == "redis"
        assert report["days"][0]["usage"][0]["requests"] == 2


async def test_background_writes_survive_a_redis_restart(redis_server: RedisServer) -> None:
    """Scripts are reloaded when a restarted Redis forgot them (NOSCRIPT)."""
    from inferbridge.shared.client import RedisClient
    from inferbridge.shared.quotas import RedisQuotaStore

    client = RedisClient(
        StateConfig(store="redis", url=redis_server.url, prefix="restart", timeout=2)
    )
    await client.start()
    try:
        await client.redis.script_flush()
        shared = RedisQuotaStore(client)
        key = Subject("key", "r", tpm=100)
        shared.finish([key], "l", 7, None, now=T0)
        await client.flush()
        verdict = await shared.admit([key], "l", now=T0 + 1)
        assert verdict.readings[0].tokens == 7
    finally:
        await client.close()
    await asyncio.sleep(0)


async def test_connections_are_opened_at_start_and_a_burst_shares_them(
    redis_server: RedisServer,
) -> None:
    """A cold replica's first burst must not spend its checks' short timeout connecting (the
    `allow` policy would let the excess through): the pool is opened at start-up, and a
    burst takes turns on it."""
    from inferbridge.shared.client import RedisClient
    from inferbridge.shared.quotas import RedisQuotaStore

    config = StateConfig(
        store="redis", url=redis_server.url, prefix="burst", timeout=0.5, max_connections=4
    )
    client = RedisClient(config)
    watcher = RedisClient(StateConfig(store="redis", url=redis_server.url, max_connections=2))
    await watcher.start()

    async def connections() -> int:  # of this Redis, other tests' servers included
        return len(await watcher.redis.client_list())

    before = await connections()
    await client.start()
    try:
        assert await connections() == before + 4
        shared = RedisQuotaStore(client)
        key = Subject("key", "burst", rpm=10)
        verdicts = await asyncio.gather(*(shared.admit([key], f"l{i}") for i in range(60)))
        assert sum(v.admitted for v in verdicts) == 10
        assert await connections() == before + 4
    finally:
        await client.close()
        await watcher.close()


async def test_concurrent_checks_share_one_round_trip(redis_server: RedisServer) -> None:
    """The checks of requests that arrive together go out in one pipeline; a script Redis
    forgot (it restarted) is loaded again and the check still answered."""
    from inferbridge.shared.client import RedisClient
    from inferbridge.shared.quotas import RedisQuotaStore

    client = RedisClient(
        StateConfig(store="redis", url=redis_server.url, prefix="batch", timeout=2)
    )
    await client.start()
    try:
        sent: list[int] = []
        pipeline = client._pipeline_calls

        async def counted(ops: Any, calls: Any) -> Any:
            sent.append(len(calls))
            return await pipeline(ops, calls)

        client._pipeline_calls = counted  # type: ignore[method-assign]
        shared = RedisQuotaStore(client)
        key = Subject("key", "together", rpm=25)
        verdicts = await asyncio.gather(*(shared.admit([key], f"l{i}") for i in range(40)))
        assert sum(v.admitted for v in verdicts) == 25
        assert sent == [40]
        await client.redis.script_flush()
        sent.clear()
        verdict = await shared.admit([Subject("key", "after-flush", rpm=5)], "x")
        assert verdict.admitted and sent == [1, 1]  # NOSCRIPT, loaded, sent again
    finally:
        await client.close()


async def test_a_slot_freed_before_it_was_sent_costs_redis_nothing(
    redis_server: RedisServer,
) -> None:
    from inferbridge.shared.client import RedisClient

    client = RedisClient(StateConfig(store="redis", url=redis_server.url, prefix="short"))
    await client.start()
    try:
        client.hold("short:inflight:d", "a", add=True)
        client.drop("short:inflight:d", "a")  # within the linger: neither is sent
        assert client._pending == []
        client.hold("short:inflight:d", "b", add=True)
        await client.flush()
        assert await client.redis.zrange("short:inflight:d", 0, -1) == ["b"]
        client.drop("short:inflight:d", "b")  # sent already: its removal is
        await client.flush()
        assert await client.redis.exists("short:inflight:d") == 0
    finally:
        await client.close()


async def test_a_slot_freed_before_a_check_is_free_for_it(redis_server: RedisServer) -> None:
    """A client whose requests follow one another with `max_parallel: 1` is never refused:
    the release queued when one ends goes out before the next one's check, in its pipeline."""
    from inferbridge.shared.client import RedisClient
    from inferbridge.shared.quotas import RedisQuotaStore

    client = RedisClient(StateConfig(store="redis", url=redis_server.url, prefix="seq"))
    await client.start()
    try:
        shared = RedisQuotaStore(client)
        key = Subject("key", "one-at-a-time", max_parallel=1)
        for i in range(20):
            verdict = await shared.admit([key], f"l{i}")
            assert verdict.admitted, i
            shared.finish([key], f"l{i}", 0, None)  # queued, not sent yet
    finally:
        await client.close()
