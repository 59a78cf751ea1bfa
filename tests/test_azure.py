"""The azure backend: the fake checked with the official AzureOpenAI client, then the openai
SDK through inferbridge to the fake (URL forms, auth headers, content filter, tool calls)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from inferbridge.config import ConfigError, load_config
from tests.fakes.azure import FakeAzure
from tests.server import InferbridgeServer

DEPLOYMENT = "gpt4o-prod"
API_VERSION = "2024-10-21"
USER = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeAzure]:
    with FakeAzure(deployments=(DEPLOYMENT, "gpt4o-mini")) as server:
        yield server  # type: ignore[misc]


@pytest.fixture(autouse=True)
def _clean(fake: FakeAzure) -> None:
    fake.reset()


def _entry(fake: FakeAzure, name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "backend": "azure", "url": fake.url, **kw}


def _config(fake: FakeAzure) -> dict[str, Any]:
    models = [
        _entry(fake, "gpt4o", deployment=DEPLOYMENT, api_version=API_VERSION, api_key="azure-key"),
        _entry(fake, "gpt4o-v1", deployment=DEPLOYMENT, api_version="v1", api_key="azure-key"),
        _entry(
            fake,
            "gpt4o-v1-url",
            url=fake.url + "/openai/v1/",
            upstream_model="gpt4o-mini",
            api_key="azure-key",
        ),
        _entry(
            fake,
            "gpt4o-entra",
            deployment=DEPLOYMENT,
            api_version=API_VERSION,
            azure_ad_token="entra-token",
        ),
        _entry(fake, "gpt4o-mini", api_version=API_VERSION, api_key="azure-key"),
        _entry(
            fake, "gpt4o-badkey", deployment=DEPLOYMENT, api_version=API_VERSION, api_key="wrong"
        ),
        _entry(
            fake, "gpt4o-gone", deployment="deleted", api_version=API_VERSION, api_key="azure-key"
        ),
    ]
    return {"models": models}


@pytest.fixture(scope="module")
def srv(fake: FakeAzure) -> Iterator[InferbridgeServer]:
    with InferbridgeServer(_config(fake)) as server:
        yield server


@pytest.fixture
def fresh(fake: FakeAzure, serve: Any) -> InferbridgeServer:
    """A server of its own for tests that make deployments fail (a shared one would
    put them in cooldown for the tests after)."""
    return serve(_config(fake))


# -- the fake, checked with the official Azure client ---------------------------------------
def _azure_client(fake: FakeAzure, **kw: Any) -> openai.AzureOpenAI:
    kw.setdefault("api_key", "azure-key")
    return openai.AzureOpenAI(
        azure_endpoint=fake.url, api_version=API_VERSION, max_retries=0, timeout=10, **kw
    )


def test_fake_speaks_azure_to_the_official_client(fake: FakeAzure) -> None:
    client = _azure_client(fake)
    r = client.chat.completions.create(model=DEPLOYMENT, messages=USER)
    assert r.choices[0].message.content == "Hello from upstream"
    assert r.model_extra["prompt_filter_results"][0]["prompt_index"] == 0
    req = fake.requests[-1]
    assert req.path == f"/openai/deployments/{DEPLOYMENT}/chat/completions"
    assert req.query == {"api-version": API_VERSION}
    assert req.headers["api-key"] == "azure-key"

    chunks = list(client.chat.completions.create(model=DEPLOYMENT, messages=USER, stream=True))
    assert chunks[0].choices == [] and chunks[0].id == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "Hello from upstream"
    )

    r2 = client.completions.create(model=DEPLOYMENT, prompt="Say")
    assert r2.choices[0].text == "Hello from upstream"
    assert fake.requests[-1].path == f"/openai/deployments/{DEPLOYMENT}/completions"

    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model=DEPLOYMENT, messages=[{"role": "user", "content": "forbidden"}]
        )
    assert exc.value.code == "content_filter"
    with pytest.raises(openai.AuthenticationError):
        _azure_client(fake, api_key="nope").chat.completions.create(model=DEPLOYMENT, messages=USER)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=USER)

    entra = _azure_client(fake, api_key=None, azure_ad_token="entra-token")
    assert entra.chat.completions.create(model=DEPLOYMENT, messages=USER).choices
    assert fake.requests[-1].headers["Authorization"] == "Bearer entra-token"


def test_fake_v1_form_and_api_version_check(fake: FakeAzure) -> None:
    client = openai.OpenAI(base_url=fake.url + "/openai/v1/", api_key="azure-key", max_retries=0)
    r = client.chat.completions.create(model=DEPLOYMENT, messages=USER)
    assert r.choices[0].message.content == "Hello from upstream"
    assert fake.requests[-1].path == "/openai/v1/chat/completions"
    raw = httpx.post(
        f"{fake.url}/openai/deployments/{DEPLOYMENT}/chat/completions",
        json={"messages": USER},
        headers={"api-key": "azure-key"},
    )
    assert raw.status_code == 404 and raw.json()["error"]["message"] == "Resource not found"


# -- through inferbridge ---------------------------------------------------------------------
def test_chat_non_stream_classic_url_and_headers(srv: InferbridgeServer, fake: FakeAzure) -> None:
    r = srv.openai().chat.completions.create(
        model="gpt4o", messages=USER, temperature=0.2, extra_body={"data_sources": []}
    )
    assert r.choices[0].message.content == "Hello from upstream"
    assert r.choices[0].finish_reason == "stop"
    assert r.model == "gpt4o"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (11, 3)
    req = fake.requests[-1]
    assert req.path == f"/openai/deployments/{DEPLOYMENT}/chat/completions"
    assert req.query == {"api-version": API_VERSION}
    assert req.headers["api-key"] == "azure-key"
    assert "Authorization" not in req.headers
    body = req.json
    assert body["stream"] is False and "stream_options" not in body
    assert body["temperature"] == 0.2 and body["data_sources"] == []
    assert body["model"] == DEPLOYMENT


def test_chat_stream_drops_prompt_filter_chunk(srv: InferbridgeServer, fake: FakeAzure) -> None:
    fake.behaviour.split_every = 7  # SSE lines cut at awkward byte boundaries
    chunks = list(
        srv.openai().chat.completions.create(
            model="gpt4o", messages=USER, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices for c in chunks[:-1])  # Azure's empty-choices chunk was dropped
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == ("Hello from upstream")
    assert [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason] == [
        "stop"
    ]
    assert chunks[-1].usage.total_tokens == 14
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert {c.model for c in chunks} == {"gpt4o"}
    assert fake.requests[-1].json["stream_options"] == {"include_usage": True}


def test_completions_stream_and_not(srv: InferbridgeServer, fake: FakeAzure) -> None:
    client = srv.openai()
    r = client.completions.create(model="gpt4o", prompt="Say", max_tokens=2)
    assert r.choices[0].text == "Hello from"
    assert r.choices[0].finish_reason == "length"
    assert fake.requests[-1].path == f"/openai/deployments/{DEPLOYMENT}/completions"
    assert fake.requests[-1].json["max_tokens"] == 2
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(model="gpt4o", prompt="Say", stream=True, stop=[" up"])
        if c.choices
    )
    assert text == "Hello from"
    assert fake.requests[-1].json["stop"] == [" up"]


def test_stop_and_length_finish_reasons_stream(srv: InferbridgeServer, fake: FakeAzure) -> None:
    client = srv.openai()
    chunks = list(
        client.chat.completions.create(
            model="gpt4o", messages=USER, stream=True, max_completion_tokens=1
        )
    )
    assert chunks[-1].choices[0].finish_reason == "length"
    assert fake.requests[-1].json["max_completion_tokens"] == 1
    r = client.chat.completions.create(model="gpt4o", messages=USER, stop="rom")
    assert r.choices[0].message.content == "Hello f"
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_content_filter_error_keeps_code(fresh: InferbridgeServer, stream: bool) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        fresh.openai().chat.completions.create(
            model="gpt4o",
            messages=[{"role": "user", "content": "something forbidden"}],
            stream=stream,
        )
    assert exc.value.status_code == 400
    assert exc.value.code == "content_filter"
    assert "content management policy" in exc.value.message


@pytest.mark.parametrize("stream", [False, True])
def test_finish_reason_content_filter(
    srv: InferbridgeServer, fake: FakeAzure, stream: bool
) -> None:
    fake.finish_reason = "content_filter"
    fake.reply = ["Partial", " answer"]
    client = srv.openai()
    if stream:
        chunks = list(client.chat.completions.create(model="gpt4o", messages=USER, stream=True))
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
    else:
        r = client.chat.completions.create(model="gpt4o", messages=USER)
        reasons, text = [r.choices[0].finish_reason], r.choices[0].message.content
    assert reasons == ["content_filter"]
    assert text == "Partial answer"


def test_tool_calls_stream_through(srv: InferbridgeServer, fake: FakeAzure) -> None:
    fake.reply = []
    fake.tool_calls = [
        {"id": "call_a1", "name": "get_weather", "fragments": ['{"ci', 'ty": "Pa', 'ris"}']},
        {"id": "call_b2", "name": "get_time", "fragments": ["{}"]},
    ]
    tools = [
        {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
        for n in ("get_weather", "get_time")
    ]
    chunks = list(
        srv.openai().chat.completions.create(
            model="gpt4o", messages=USER, tools=tools, tool_choice="auto", stream=True
        )
    )
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.id, d.function.name, d.function.arguments) for d in deltas] == [
        (0, "call_a1", "get_weather", '{"ci'),
        (0, None, None, 'ty": "Pa'),
        (0, None, None, 'ris"}'),
        (1, "call_b2", "get_time", "{}"),
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    sent = fake.requests[-1].json
    assert sent["tools"] == tools and sent["tool_choice"] == "auto"

    r = srv.openai().chat.completions.create(model="gpt4o", messages=USER, tools=tools)
    calls = r.choices[0].message.tool_calls
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("call_a1", "get_weather", '{"city": "Paris"}'),
        ("call_b2", "get_time", "{}"),
    ]
    assert r.choices[0].finish_reason == "tool_calls"


def test_connection_dropped_mid_stream_raises(fresh: InferbridgeServer, fake: FakeAzure) -> None:
    fake.behaviour.drop_after_chunks = 3
    fake.behaviour.delay_between_chunks = 0.05
    stream = fresh.openai().chat.completions.create(model="gpt4o", messages=USER, stream=True)
    got = []
    with pytest.raises(openai.APIError, match=r"closed the connection|before the answer"):
        for chunk in stream:
            got.append(chunk.choices[0].delta.content)
    assert got == ["", "Hello"]  # the role chunk and the first text, then the error


def test_error_event_mid_stream_raises(fresh: InferbridgeServer, fake: FakeAzure) -> None:
    fake.error_event_after = 1
    fake.behaviour.delay_between_chunks = 0.05  # the first text leaves before the error
    stream = fresh.openai().completions.create(model="gpt4o", prompt="Say", stream=True)
    got = []
    with pytest.raises(openai.APIError, match="server had an error") as exc:
        for chunk in stream:
            got.append(chunk.choices[0].text)
    assert not isinstance(exc.value, openai.APIStatusError)  # raised inside the stream
    assert got == ["Hello"]


def test_v1_form(srv: InferbridgeServer, fake: FakeAzure) -> None:
    client = srv.openai()
    r = client.chat.completions.create(model="gpt4o-v1", messages=USER)
    assert r.choices[0].message.content == "Hello from upstream"
    req = fake.requests[-1]
    assert req.path == "/openai/v1/chat/completions" and req.query == {}
    assert req.headers["Authorization"] == "Bearer azure-key"
    assert req.json["model"] == DEPLOYMENT
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(model="gpt4o-v1-url", prompt="x", stream=True)
        if c.choices
    )
    assert text == "Hello from upstream"
    assert fake.requests[-1].path == "/openai/v1/completions"
    assert fake.requests[-1].json["model"] == "gpt4o-mini"


def test_entra_token_and_default_deployment(srv: InferbridgeServer, fake: FakeAzure) -> None:
    client = srv.openai()
    client.chat.completions.create(model="gpt4o-entra", messages=USER)
    req = fake.requests[-1]
    assert req.headers["Authorization"] == "Bearer entra-token"
    assert "api-key" not in req.headers
    client.chat.completions.create(model="gpt4o-mini", messages=USER)
    assert fake.requests[-1].path == "/openai/deployments/gpt4o-mini/chat/completions"


def test_upstream_errors_are_mapped(fresh: InferbridgeServer, fake: FakeAzure) -> None:
    client = fresh.openai()
    with pytest.raises(openai.InternalServerError, match="rejected inferbridge's credentials"):
        client.chat.completions.create(model="gpt4o-badkey", messages=USER)
    with pytest.raises(openai.InternalServerError) as exc:  # the entry's deployment is gone
        client.chat.completions.create(model="gpt4o-gone", messages=USER)
    assert exc.value.status_code == 502 and exc.value.code == "deployment_misconfigured"
    fake.behaviour.status = 429
    fake.behaviour.error_body = {
        "error": {
            "code": "429",
            "message": "Requests to the "
            "ChatCompletions_Create Operation have exceeded "
            "call rate limit.",
        }
    }
    with pytest.raises(openai.RateLimitError, match="exceeded call rate limit"):
        client.chat.completions.create(model="gpt4o", messages=USER)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="api_version is required"):
        load_config(
            data={
                "models": [{"name": "a", "backend": "azure", "url": "https://x.openai.azure.com"}]
            }
        )
    with pytest.raises(ConfigError, match="not both"):
        load_config(
            data={
                "models": [
                    {
                        "name": "a",
                        "backend": "azure",
                        "api_version": "v1",
                        "url": "https://x.openai.azure.com",
                        "api_key": "k",
                        "azure_ad_token": "t",
                    }
                ]
            }
        )
    with pytest.raises(ConfigError, match="url"):
        load_config(data={"models": [{"name": "a", "backend": "azure", "api_version": "v1"}]})
