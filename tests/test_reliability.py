"""Retries, fallbacks, cooldowns, timeouts and limits, end to end with fault injection.

The official openai SDK talks to a real inferbridge whose deployments are fake upstreams on
real sockets that refuse connections, answer 4xx/5xx/429 (with Retry-After), stall before
the first byte, stall mid-stream or die mid-stream.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from aiohttp import web

from tests.fakes.faulty import Fault, FaultyOpenAI, closed_port_url

MESSAGES = [{"role": "user", "content": "Say hello"}]
ANSWER = "Hello from upstream"


@pytest.fixture
def fakes():
    started: list[FaultyOpenAI] = []

    def make(count: int = 1, kind: type[FaultyOpenAI] = FaultyOpenAI) -> list[FaultyOpenAI]:
        new = [kind().start() for _ in range(count)]
        started.extend(new)  # type: ignore[arg-type]
        return new  # type: ignore[return-value]

    yield make
    for fake in started:
        fake.stop()


def entry(target: FaultyOpenAI | str, name: str = "m", **kw) -> dict:
    url = target if isinstance(target, str) else target.url + "/v1"
    return {
        "name": name,
        "backend": "vllm",
        "url": url,
        "upstream_model": "upstream-model",
        "timeout": 5,
        **kw,
    }


def client(srv) -> openai.OpenAI:
    """One SDK client per server (making one costs more than a request)."""
    if not hasattr(srv, "sdk"):
        srv.sdk = srv.openai()
    return srv.sdk


def chat(srv, stream: bool = False, model: str = "m") -> tuple[str, str]:
    """(answer text, x-inferbridge-model) for one request."""
    raw = client(srv).chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, stream=stream
    )
    parsed = raw.parse()
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in parsed if c.choices)
    else:
        text = parsed.choices[0].message.content
    return text, raw.headers["x-inferbridge-model"]


def readiness(srv) -> tuple[int, dict]:
    r = httpx.get(srv.url + "/health/readiness")
    return r.status_code, r.json()


def states(srv, model: str = "m") -> list[str]:
    return [d["state"] for d in readiness(srv)[1]["models"][model]["deployments"]]


# -- retries ----------------------------------------------------------------------------------
def test_refused_connection_is_retried_on_a_healthy_deployment(serve, fakes):
    (healthy,) = fakes(1)
    srv = serve(
        {
            "router": {"allowed_fails": 100},
            "models": [entry(closed_port_url(), weight=1000), entry(healthy, weight=0.001)],
        }
    )
    for stream in (False, True, False, True):
        assert chat(srv, stream) == (ANSWER, "m")
    assert healthy.served == 4
    assert readiness(srv)[1]["models"]["m"]["deployments"][0]["recent_failures"] == 4


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_retryable_status_is_retried_elsewhere(serve, fakes, status):
    bad, good = fakes(2)
    bad.behaviour.status = status
    srv = serve({"models": [entry(bad, weight=1000), entry(good, weight=0.001)]})
    assert chat(srv, stream=True) == (ANSWER, "m")
    assert (bad.served, good.served) == (1, 1)


@pytest.mark.parametrize("status", [401, 403, 404, 405])
def test_a_refusal_caused_by_the_deployment_is_retried_elsewhere(serve, fakes, status):
    """401/403 (the entry's upstream key), 404 (its path or model), 405 (its path): the
    deployment's fault, not the client's, refused before any generation."""
    bad, good = fakes(2)
    bad.behaviour.status = status
    srv = serve({"models": [entry(bad, weight=1000), entry(good, weight=0.001)]})
    for stream in (False, True):
        assert chat(srv, stream) == (ANSWER, "m")
    assert good.served == 2


def test_a_deployment_without_its_base_path_is_retried_then_a_502_naming_it(serve, fakes):
    """`url` without `/v1`: the upstream answers 404 to every request. The other deployment
    answers them all; alone, the deployment fails with a 502 naming it (never its URL),
    counted as an upstream error."""
    good, lone = fakes(2)
    srv = serve(
        {
            "router": {"retry_backoff": 0.01, "allowed_fails": 100},
            "models": [entry(good.url), entry(good), entry(lone.url, "alone")],
        }
    )
    for _ in range(8):
        assert chat(srv) == (ANSWER, "m")
    assert good.served == 8
    with pytest.raises(openai.InternalServerError) as info:
        chat(srv, stream=True, model="alone")
    assert info.value.status_code == 502
    assert info.value.code == "deployment_misconfigured"
    assert "- backend 'vllm' (alone[0]) failed with HTTP 404: " in info.value.message
    assert "127.0.0.1" not in info.value.message and "http" not in info.value.message
    metrics = httpx.get(srv.url + "/metrics").text
    assert 'model="alone",outcome="upstream_error"' in metrics
    assert 'model="alone",outcome="client_error"' not in metrics


class Redirecting(FaultyOpenAI):
    """Answers every completion with a redirect whose target carries a token."""

    def error_response(self) -> web.Response:
        return web.Response(status=302, headers={"Location": "http://evil.example/?token=abc"})


@pytest.mark.parametrize(
    "status,message,hidden,shown",
    [
        (500, "internal error at http://127.0.0.1:19403/e500/v1", ["127.0.0.1", "19403"], "<url>"),
        (401, "Incorrect API key provided: sk-upstr*****T123.", ["sk-upstr", "T123"], "***"),
        (302, None, ["evil.example", "token", "abc"], "redirect (HTTP 302)"),
        (
            500,
            "down: [fd00::1]:8000, 2001:db8::42, gpu7.internal:8000, localhost:11434, "
            "alice:pw@db.internal, password=hunter2, ghp_0123456789abcdefghij0123",
            ["fd00", "db8", "gpu7", "11434", "alice", "hunter2", "ghp_0123"],
            "<address>",
        ),
    ],
)
def test_upstream_error_text_shows_no_address_key_or_redirect_target(
    serve, fakes, status, message, hidden, shown
):
    (fake,) = fakes(1, Redirecting if status == 302 else FaultyOpenAI)
    fake.behaviour.status = status
    fake.behaviour.error_body = {"error": {"message": message}}
    srv = serve({"models": [entry(fake, api_key="sk-upstream-0123456789-T123")]})
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as info:
            chat(srv, stream)
        text = info.value.message
        assert info.value.status_code == 502 and "backend 'vllm' (m[0])" in text
        assert shown in text
        assert not [word for word in [*hidden, "http"] if word in text], text


def test_request_rejected_by_the_backend_is_not_retried(serve, fakes):
    bad, good = fakes(2)
    bad.behaviour.status = 400
    bad.behaviour.error_body = {"error": {"message": "context too long", "code": 400}}
    srv = serve({"models": [entry(bad, weight=1000), entry(good, weight=0.001)]})
    with pytest.raises(openai.BadRequestError, match="context too long"):
        chat(srv)
    assert (bad.served, good.served) == (1, 0)


def test_retry_after_is_honoured_before_retrying_the_same_deployment(serve, fakes):
    (fake,) = fakes(1)
    fake.faults = [Fault(429, retry_after="0.4")]
    srv = serve({"models": [entry(fake)]})
    start = time.monotonic()
    assert chat(srv) == (ANSWER, "m")
    assert time.monotonic() - start >= 0.4
    assert fake.served == 2


def test_retry_after_beyond_the_cap_is_relayed_not_waited(serve, fakes):
    (fake,) = fakes(1)
    fake.behaviour.status = 429
    fake.retry_after = "60"
    srv = serve({"router": {"retry_after_max": 5}, "models": [entry(fake)]})
    with pytest.raises(openai.RateLimitError) as info:
        chat(srv)
    assert info.value.response.headers["retry-after"] == "60"
    assert fake.served == 1


def test_attempts_are_bounded(serve, fakes):
    (fake,) = fakes(1)
    fake.behaviour.status = 503
    srv = serve({"router": {"retries": 2, "retry_backoff": 0.01}, "models": [entry(fake)]})
    with pytest.raises(openai.InternalServerError) as info:
        chat(srv)
    assert info.value.status_code == 503 and "unavailable" in info.value.message
    assert fake.served == 3


# -- fallbacks ---------------------------------------------------------------------------------
def test_fallback_answers_when_the_model_is_down(serve, fakes):
    (backup,) = fakes(1)
    srv = serve(
        {
            "router": {"models": {"primary": {"fallbacks": ["backup"]}}},
            "models": [entry(closed_port_url(), "primary"), entry(backup, "backup")],
        }
    )
    assert chat(srv, model="primary") == (ANSWER, "backup")
    assert chat(srv, stream=True, model="primary") == (ANSWER, "backup")
    assert backup.served == 2


def test_when_fallbacks_fail_too_the_primary_error_is_returned(serve, fakes):
    (backup,) = fakes(1)
    backup.behaviour.status = 500
    srv = serve(
        {
            "router": {"retry_backoff": 0.01, "models": {"primary": {"fallbacks": ["backup"]}}},
            "models": [entry(closed_port_url(), "primary"), entry(backup, "backup")],
        }
    )
    with pytest.raises(openai.InternalServerError) as info:
        chat(srv, model="primary")
    assert info.value.status_code == 502 and "unreachable" in info.value.message
    assert backup.served == 3


# -- circuit breaker ---------------------------------------------------------------------------
def test_cooldown_takes_a_failing_deployment_out_and_the_probe_brings_it_back(serve, fakes):
    flaky, steady = fakes(2)
    flaky.behaviour.status = 500
    srv = serve(
        {
            "router": {"allowed_fails": 2, "cooldown": 3.0},
            "models": [entry(flaky, weight=1000), entry(steady, weight=0.001)],
        }
    )
    for _ in range(2):
        assert chat(srv) == (ANSWER, "m")
    assert flaky.served == 2
    assert states(srv) == ["cooling_down", "ok"]
    for _ in range(3):
        assert chat(srv, stream=True) == (ANSWER, "m")
    assert flaky.served == 2  # out of rotation
    flaky.behaviour.status = 200
    deadline = time.monotonic() + 10
    while states(srv) != ["half_open", "ok"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert states(srv) == ["half_open", "ok"]
    assert chat(srv) == (ANSWER, "m")
    assert flaky.served == 3  # the probe went there and succeeded
    assert states(srv) == ["ok", "ok"]


def test_a_failed_probe_starts_a_new_cooldown(serve, fakes):
    flaky, steady = fakes(2)
    flaky.behaviour.status = 503
    srv = serve(
        {
            "router": {"allowed_fails": 1, "cooldown": 2.0},
            "models": [entry(flaky, weight=1000), entry(steady, weight=0.001)],
        }
    )
    assert chat(srv) == (ANSWER, "m")
    deadline = time.monotonic() + 10
    while states(srv) != ["half_open", "ok"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert chat(srv) == (ANSWER, "m")  # probe failed, retried on the steady one
    assert flaky.served == 2
    assert states(srv) == ["cooling_down", "ok"]


def test_readiness_is_503_when_a_model_has_no_usable_deployment(serve, fakes):
    (other,) = fakes(1)
    srv = serve(
        {
            "router": {"allowed_fails": 1, "cooldown": 30},
            "models": [entry(closed_port_url()), entry(closed_port_url()), entry(other, "other")],
        }
    )
    assert readiness(srv)[0] == 200
    with pytest.raises(openai.InternalServerError) as info:
        chat(srv)
    assert info.value.status_code == 502
    status, report = readiness(srv)
    assert status == 503 and report["status"] == "unavailable"
    assert report["models"]["m"]["ready"] is False and report["models"]["other"]["ready"]
    assert states(srv) == ["cooling_down", "cooling_down"]
    with pytest.raises(openai.InternalServerError) as info:
        chat(srv)  # fails fast: nothing is tried while every deployment cools down
    assert info.value.status_code == 503
    assert 1 <= int(info.value.response.headers["retry-after"]) <= 30
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}


# -- timeouts and mid-stream failures ----------------------------------------------------------
def test_a_stall_before_the_first_token_is_retried_elsewhere(serve, fakes):
    stalled, fast = fakes(2)
    stalled.behaviour.delay_first_byte = 3
    srv = serve(
        {
            "models": [
                entry(stalled, weight=1000, ttft_timeout=0.2),
                entry(fast, weight=0.001, ttft_timeout=0.2),
            ]
        }
    )
    start = time.monotonic()
    assert chat(srv, stream=True) == (ANSWER, "m")
    assert time.monotonic() - start < 1.5
    assert (stalled.served, fast.served) == (1, 1)


def test_a_stalled_stream_is_cut_with_an_error_event(serve, fakes):
    (fake,) = fakes(1)
    fake.behaviour.delay_between_chunks = 0.6
    srv = serve({"models": [entry(fake, stream_idle_timeout=0.25)]})
    got = []
    with pytest.raises(openai.APIError, match="stream_idle_timeout"):
        for chunk in srv.openai().chat.completions.create(
            model="m", messages=MESSAGES, stream=True
        ):
            got.append(chunk)
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "Hello"
    assert fake.served == 1


def test_a_death_mid_stream_reaches_the_client_and_is_not_retried(serve, fakes):
    a, b = fakes(2)
    for fake in (a, b):
        fake.reply = ["one", " two", " three", " four"]
        fake.behaviour.drop_after_chunks = 3
    srv = serve({"models": [entry(a), entry(b)]})
    got = []
    with pytest.raises(openai.APIError):
        for chunk in srv.openai().chat.completions.create(
            model="m", messages=MESSAGES, stream=True
        ):
            got.append(chunk)
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "one two"
    assert a.served + b.served == 1


# -- concurrency limits ------------------------------------------------------------------------
def test_full_deployments_answer_429_with_retry_after(serve, fakes):
    (fake,) = fakes(1)
    fake.behaviour.delay_between_chunks = 0.1
    srv = serve({"models": [entry(fake, max_concurrent=1)]})
    client = srv.openai()
    held = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    next(iter(held))
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert info.value.response.headers["retry-after"] == "1"
    assert info.value.body["code"] == "rate_limit_exceeded"
    assert "max_concurrent" in info.value.message
    list(held)
    assert chat(srv) == (ANSWER, "m")
    assert fake.served == 2


async def test_a_full_deployment_queues_then_serves(serve, fakes):
    (fake,) = fakes(1)
    fake.behaviour.delay_between_chunks = 0.3
    srv = serve({"models": [entry(fake, max_concurrent=1, max_queue=1, queue_timeout=10)]})
    client = srv.async_openai()
    held = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    waiting = asyncio.create_task(client.chat.completions.create(model="m", messages=MESSAGES))

    def queued() -> int:
        report = httpx.get(srv.url + "/health/readiness", timeout=5).json()
        return report["models"]["m"]["deployments"][0]["queued"]

    for _ in range(100):  # until the waiting request holds the queue place
        if queued() == 1:
            break
        await asyncio.sleep(0.05)
    with pytest.raises(openai.RateLimitError):  # the one queue place is taken
        await client.chat.completions.create(model="m", messages=MESSAGES)
    assert fake.served == 1
    async for _ in held:
        pass
    assert (await waiting).choices[0].message.content == ANSWER
    assert fake.served == 2


async def test_a_queued_request_gives_up_after_queue_timeout(serve, fakes):
    (fake,) = fakes(1)
    fake.behaviour.delay_between_chunks = 0.3
    srv = serve({"models": [entry(fake, max_concurrent=1, max_queue=4, queue_timeout=0.2)]})
    client = srv.async_openai()
    held = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    with pytest.raises(openai.RateLimitError, match="queue_timeout"):
        await client.chat.completions.create(model="m", messages=MESSAGES)
    await held.close()


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("model 'llama3:8b' failed: context length 4096 exceeded", True),
        ('model "qwen2.5:7b" not found, try pulling it first', True),
        ("Invalid 'temperature': expected a value <= 2, but got 3", True),
        ("Error: 404 at 12:30", True),
        ("backend 'vllm' (m[0]) failed (HTTP 401): bad key", True),
        ("connect to fe80::1 failed", False),
        ("api-key=0123456789abcdef0123456789abcdef", False),
    ],
)
def test_scrub_keeps_ordinary_words(text, kept):
    from inferbridge.backends.upstream_errors import scrub

    assert (scrub(text) == text) is kept, scrub(text)
