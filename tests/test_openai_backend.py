"""The openai backend (OpenAI itself as the upstream), with its URL pointed at a local fake of
OpenAI's API: auth and organization/project headers, model rewriting, extras relayed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from inferbridge.backends.openai_compat import OpenAISettings
from tests.fakes.azure import FakeOpenAIPlatform
from tests.server import InferbridgeServer

USER = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAIPlatform]:
    with FakeOpenAIPlatform(api_key="sk-upstream", models=("gpt-4o", "gpt-4o-mini")) as server:
        yield server  # type: ignore[misc]


@pytest.fixture(autouse=True)
def _clean(fake: FakeOpenAIPlatform) -> None:
    fake.reset()


def _config(fake: FakeOpenAIPlatform) -> dict[str, Any]:
    base = {"backend": "openai", "url": fake.url + "/v1"}
    models = [
        {**base, "name": "smart", "upstream_model": "gpt-4o", "api_key": "sk-upstream",
         "organization": "org-123", "project": "proj_abc"},
        {**base, "name": "gpt-4o-mini", "api_key": "sk-upstream",
         "params": {"temperature": 0.3}},
        {**base, "name": "badkey", "upstream_model": "gpt-4o", "api_key": "sk-wrong"},
        {**base, "name": "retired", "upstream_model": "gpt-3", "api_key": "sk-upstream"},
    ]  # fmt: skip
    return {"models": models}


@pytest.fixture(scope="module")
def srv(fake: FakeOpenAIPlatform) -> Iterator[InferbridgeServer]:
    with InferbridgeServer(_config(fake)) as server:
        yield server


@pytest.fixture
def fresh(fake: FakeOpenAIPlatform, serve: Any) -> InferbridgeServer:
    """A server of its own for tests that make deployments fail (a shared one would
    put them in cooldown for the tests after)."""
    return serve(_config(fake))


def test_default_url_is_openai() -> None:
    settings = OpenAISettings(name="gpt-4o", backend="openai")
    assert settings.url == "https://api.openai.com/v1"


def test_fake_speaks_openai_to_the_official_client(fake: FakeOpenAIPlatform) -> None:
    client = openai.OpenAI(base_url=fake.url + "/v1", api_key="sk-upstream", max_retries=0)
    assert client.chat.completions.create(model="gpt-4o", messages=USER).choices
    text = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
        if c.choices
    )
    assert text == "Hello from upstream"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=fake.url + "/v1", api_key="x", max_retries=0).completions.create(
            model="gpt-4o", prompt="hi"
        )


def test_headers_and_model_rewrite(srv: InferbridgeServer, fake: FakeOpenAIPlatform) -> None:
    r = srv.openai().chat.completions.create(model="smart", messages=USER, user="u-1")
    assert r.choices[0].message.content == "Hello from upstream"
    assert r.model == "smart"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (11, 3)
    req = fake.requests[-1]
    assert req.path == "/v1/chat/completions"
    assert req.headers["Authorization"] == "Bearer sk-upstream"
    assert req.headers["OpenAI-Organization"] == "org-123"
    assert req.headers["OpenAI-Project"] == "proj_abc"
    assert req.json["model"] == "gpt-4o"
    assert req.json["messages"] == USER and req.json["user"] == "u-1"


def test_extras_and_defaults_relayed(srv: InferbridgeServer, fake: FakeOpenAIPlatform) -> None:
    srv.openai().chat.completions.create(
        model="gpt-4o-mini",
        messages=USER,
        seed=7,
        extra_body={"reasoning_effort": "low", "top_k": 5},
    )
    req = fake.requests[-1]
    body = req.json
    assert body["model"] == "gpt-4o-mini"  # no upstream_model: the name itself
    assert body["top_k"] == 5 and body["reasoning_effort"] == "low" and body["seed"] == 7
    assert body["temperature"] == 0.3  # the entry's params: default
    assert "OpenAI-Organization" not in req.headers


def test_completions_stream_split_with_usage(
    srv: InferbridgeServer, fake: FakeOpenAIPlatform
) -> None:
    fake.behaviour.split_every = 5
    chunks = list(
        srv.openai().completions.create(
            model="smart", prompt="Say", stream=True, stream_options={"include_usage": True},
            stop=["up"],
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello from "
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.total_tokens == 14
    sent = fake.requests[-1].json
    assert sent["stop"] == ["up"] and sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert fake.requests[-1].path == "/v1/completions"


def test_length_finish_reason(srv: InferbridgeServer, fake: FakeOpenAIPlatform) -> None:
    r = srv.openai().completions.create(model="smart", prompt="Say", max_tokens=1)
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("Hello", "length")
    chunks = list(
        srv.openai().chat.completions.create(
            model="smart", messages=USER, stream=True, max_tokens=2
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello from"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "stream_options" not in fake.requests[-1].json


def test_upstream_errors(fresh: InferbridgeServer, fake: FakeOpenAIPlatform) -> None:
    client = fresh.openai()
    with pytest.raises(openai.InternalServerError, match="rejected inferbridge's credentials"):
        client.chat.completions.create(model="badkey", messages=USER)
    with pytest.raises(openai.InternalServerError) as exc:  # the entry's model is gone
        client.chat.completions.create(model="retired", messages=USER)
    assert exc.value.status_code == 502 and exc.value.code == "deployment_misconfigured"
    fake.behaviour.status = 400
    fake.behaviour.error_body = {
        "error": {"message": "Invalid 'temperature': decimal above maximum value.",
                  "type": "invalid_request_error", "param": "temperature",
                  "code": "decimal_above_max_value"}
    }  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="decimal above maximum") as bad:
        client.chat.completions.create(model="smart", messages=USER, temperature=2)
    assert bad.value.code == "decimal_above_max_value"


def test_drop_mid_stream_raises(fresh: InferbridgeServer, fake: FakeOpenAIPlatform) -> None:
    fake.behaviour.drop_after_chunks = 2
    fake.behaviour.delay_between_chunks = 0.05
    got = []
    with pytest.raises(openai.APIError) as exc:
        for chunk in fresh.openai().chat.completions.create(
            model="smart", messages=USER, stream=True
        ):
            got.append(chunk.choices[0].delta.content)
    assert not isinstance(exc.value, openai.APIStatusError)
    assert got == ["", "Hello"]
