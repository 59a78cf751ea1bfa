"""The unsupported-parameter policy, end to end and at its source.

1. Fields that never change what a model generates (`IGNORABLE_PARAMS`: user, metadata,
   store, ...) are answered 200 by every built-in backend, each through a real inferbridge
   server in front of its fake upstream on a real socket (the official openai SDK), and
   translating adapters do not forward them upstream.
2. The policy knows every schema field: `OPENAI_PARAMS` is computed from the request
   schemas, so a field added to a schema can not be missed; a translating backend answers
   400 `unsupported_parameter` for a field it can not honour, 200 for its neutral value.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from inferbridge.api.protocol import (
    IGNORABLE_PARAMS,
    OPENAI_PARAMS,
    ChatCompletionRequest,
    CompletionRequest,
    build_request,
)
from inferbridge.backends import registry
from inferbridge.config import load_config
from inferbridge.errors import UnsupportedParameter
from tests.fakes.azure import FakeAzure, FakeOpenAIPlatform
from tests.fakes.base import FakeServer
from tests.fakes.h2ogpt_app import FakeH2OGPT
from tests.fakes.llamacpp import FakeLlamaCpp
from tests.fakes.ollama import FakeOllama
from tests.fakes.openai_compat import FakeOpenAI
from tests.fakes.replicate import LLAMA3, FakeReplicate
from tests.fakes.sagemaker import FakeSageMaker
from tests.fakes.tgi import FakeTGI
from tests.server import InferbridgeServer

USER = [{"role": "user", "content": "Say hello"}]
STRUCTURAL = frozenset(
    {"model", "messages", "prompt", "stream", "stream_options", "max_completion_tokens"}
)
IGNORABLE: dict[str, Any] = {
    "metadata": {"k": "v"},
    "store": False,
    "user": "u",
    "service_tier": "auto",
    "safety_identifier": "s",
    "prompt_cache_key": "p",
    "parallel_tool_calls": True,
}
_SDK_KNOWS = inspect.signature(openai.OpenAI(api_key="x").chat.completions.create).parameters


def fields(schema: Any) -> frozenset[str]:
    return frozenset(schema.__required_keys__ | schema.__optional_keys__)


def keys_of(value: Any) -> set[str]:
    """Every object key at any depth of a JSON value."""
    if isinstance(value, dict):
        return set(value).union(*(keys_of(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(keys_of(v) for v in value))
    return set()


# -- the fakes, one real server in front of all of them ------------------------------------
@pytest.fixture(scope="module")
def aws_env() -> Iterator[None]:
    """Dummy AWS credentials for the SageMaker client (no account, no metadata lookups)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION"):
            mp.delenv(name, raising=False)
        yield


class Fakes:
    def __init__(self) -> None:
        self.vllm = FakeOpenAI()
        self.openai = FakeOpenAIPlatform(api_key="sk-upstream", models=("gpt-4o",))
        self.azure = FakeAzure(deployments=("gpt4o-prod",))
        self.tgi = FakeTGI()
        self.llamacpp = FakeLlamaCpp()
        self.ollama = FakeOllama()
        self.replicate = FakeReplicate(token="r8_test")
        self.sagemaker = FakeSageMaker()
        self.h2ogpt = FakeH2OGPT()

    def all(self) -> list[Any]:
        return list(vars(self).values())


@pytest.fixture(scope="module")
def fakes() -> Iterator[Fakes]:
    f = Fakes()
    started: list[Any] = []
    try:
        for fake in f.all():
            started.append(fake.start())
        yield f
    finally:
        for fake in started:
            fake.stop()


@pytest.fixture(scope="module")
def srv(fakes: Fakes, aws_env: None) -> Iterator[InferbridgeServer]:
    f = fakes
    sagemaker = {"backend": "sagemaker", "region": "us-east-1", "url": f.sagemaker.url,
                 "endpoint_name": "my-endpoint", "timeout": 5}  # fmt: skip
    models = [
        {"name": "echo", "backend": "echo"},
        {"name": "vllm", "backend": "vllm", "url": f.vllm.url + "/v1",
         "upstream_model": "upstream-model"},
        {"name": "openai-compatible", "backend": "openai-compatible", "url": f.vllm.url + "/v1",
         "upstream_model": "upstream-model"},
        {"name": "openai", "backend": "openai", "url": f.openai.url + "/v1",
         "upstream_model": "gpt-4o", "api_key": "sk-upstream"},
        {"name": "azure", "backend": "azure", "url": f.azure.url, "deployment": "gpt4o-prod",
         "api_version": "2024-10-21", "api_key": "azure-key"},
        {"name": "tgi", "backend": "tgi", "url": f.tgi.url, "prompt_template": "chatml"},
        {"name": "llamacpp", "backend": "llamacpp", "url": f.llamacpp.url,
         "prompt_template": "chatml", "timeout": 5},
        {"name": "ollama", "backend": "ollama", "url": f.ollama.url,
         "upstream_model": "llama3.2"},
        {"name": "h2ogpt", "backend": "h2ogpt", "url": f.h2ogpt.url, "auth": "alice:wonder",
         "api_key": "good-key", "prompt_type": "human_bot"},
        {"name": "replicate", "backend": "replicate", "url": f.replicate.url + "/v1",
         "api_key": "r8_test", "poll_interval": 0.01, "model": LLAMA3,
         "prompt_template": "llama3", "input": {"prompt_template": "{prompt}"}},
        {**sagemaker, "name": "sagemaker", "prompt_template": "llama3"},
        {**sagemaker, "name": "sagemaker-messages", "payload": "messages"},
    ]  # fmt: skip
    # no retries or cooldowns: each request sees exactly one upstream attempt
    router = {"retries": 0, "allowed_fails": 1000}
    with InferbridgeServer({"models": models, "router": router}) as server:
        yield server


@pytest.fixture(scope="module")
def client(srv: InferbridgeServer) -> openai.OpenAI:
    return srv.openai()


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest) -> None:
    """Each test reads only what its own requests sent upstream."""
    if "fakes" in request.fixturenames:
        for fake in request.getfixturevalue("fakes").all():
            fake.reset()


def _last_post(fake: FakeServer, path: str = "") -> Any:
    return [r for r in fake.requests if r.method == "POST" and path in r.path][-1].json


# model name -> what its upstream received last (None: no upstream, or a pass-through one)
Sent = Callable[[Fakes], Any]
BACKENDS: dict[str, Sent | None] = {
    "echo": None,
    "vllm": None,  # OpenAI-compatible upstreams get the client's body as it is
    "openai-compatible": None,
    "openai": None,
    "azure": None,
    "tgi": lambda f: _last_post(f.tgi, "/generate"),
    "llamacpp": lambda f: _last_post(f.llamacpp, "/completion"),
    "ollama": lambda f: _last_post(f.ollama, "/api/"),
    "h2ogpt": lambda f: f.h2ogpt.received[-1].kwargs,
    "replicate": lambda f: _last_post(f.replicate, "/predictions"),
    "sagemaker": lambda f: _last_post(f.sagemaker, "/invocations"),
    "sagemaker-messages": lambda f: _last_post(f.sagemaker, "/invocations"),
}
TRANSLATING = [name for name, sent in BACKENDS.items() if sent is not None]


def test_every_builtin_backend_is_covered(srv):
    assert {m.backend for m in srv.config.models} == set(registry.BACKENDS)
    assert {m.name for m in srv.config.models} == set(BACKENDS)


def _chat(client: openai.OpenAI, model: str, fields: dict[str, Any], **kw: Any) -> Any:
    known = {k: v for k, v in fields.items() if k in _SDK_KNOWS}
    unknown = {k: v for k, v in fields.items() if k not in _SDK_KNOWS}
    return client.chat.completions.with_raw_response.create(
        model=model, messages=USER, extra_body=unknown or None, **known, **kw
    )


def _check_not_forwarded(fakes: Fakes, model: str, sent_fields: dict[str, Any]) -> None:
    sent = BACKENDS[model]
    if sent is None:
        return
    leaked = keys_of(sent(fakes)) & set(sent_fields)
    assert not leaked, f"{model} forwarded {sorted(leaked)} upstream"


@pytest.mark.parametrize("model", list(BACKENDS))
def test_all_ignorable_fields_at_once(client, fakes, model):
    raw = _chat(client, model, IGNORABLE)
    assert raw.status_code == 200
    assert raw.parse().choices[0].message.content
    _check_not_forwarded(fakes, model, IGNORABLE)


@pytest.mark.parametrize("model", list(BACKENDS))
def test_all_ignorable_fields_at_once_streamed(client, fakes, model):
    raw = _chat(client, model, IGNORABLE, stream=True)
    assert raw.status_code == 200
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text
    _check_not_forwarded(fakes, model, IGNORABLE)


@pytest.mark.parametrize("field", list(IGNORABLE))
@pytest.mark.parametrize("model", list(BACKENDS))
def test_each_ignorable_field_alone(client, fakes, model, field):
    one = {field: IGNORABLE[field]}
    raw = _chat(client, model, one)
    assert raw.status_code == 200
    assert raw.parse().choices[0].message.content
    _check_not_forwarded(fakes, model, one)


@pytest.mark.parametrize("model", TRANSLATING)
def test_ignorable_fields_on_legacy_completions(client, fakes, model):
    fields = {k: v for k, v in IGNORABLE.items() if k != "parallel_tool_calls"}  # chat only
    r = client.completions.with_raw_response.create(
        model=model, prompt="Say hello", extra_body=fields
    )
    assert r.status_code == 200
    assert r.parse().choices[0].text
    _check_not_forwarded(fakes, model, fields)


def test_the_ignorable_list_is_the_one_in_the_protocol_module():
    assert set(IGNORABLE) == IGNORABLE_PARAMS


# -- the policy knows every schema field ---------------------------------------------------
def test_every_schema_field_is_an_openai_param():
    for schema in (ChatCompletionRequest, CompletionRequest):
        missing = (fields(schema) - STRUCTURAL) - OPENAI_PARAMS
        assert not missing, f"{schema.__name__}: {sorted(missing)} unknown to the policy"


def test_openai_params_are_computed_from_the_schemas():
    # Computed, not listed: a field added to either schema is a parameter at once.
    from_schemas = (fields(ChatCompletionRequest) | fields(CompletionRequest)) - STRUCTURAL
    assert from_schemas == OPENAI_PARAMS
    assert fields(ChatCompletionRequest) >= IGNORABLE_PARAMS


@pytest.mark.parametrize("backend", sorted(registry.BACKENDS))
def test_every_adapter_accepts_the_ignorable_params(backend, aws_env):
    entry: dict[str, Any] = {"name": "m", "backend": backend, "url": "http://127.0.0.1:1"}
    if backend == "azure":
        entry["api_version"] = "v1"
    if backend == "replicate":
        entry["model"] = LLAMA3
    if backend == "sagemaker":
        entry["region"] = "us-east-1"
    adapter = registry.create(load_config(data={"models": [entry]}, environ={}).models[0])
    request = build_request("chat", {"model": "m", "messages": USER, **IGNORABLE})
    adapter.prepare(request)  # no UnsupportedParameter
    # Only an adapter that declares one (h2oGPT's `user` login) sees it in `params`;
    # pass-through adapters relay `body`, which keeps them all.
    assert set(request.params) == IGNORABLE_PARAMS & adapter.supported_params
    assert set(request.body) >= IGNORABLE_PARAMS


def _tgi():
    cfg = load_config(
        data={"models": [{"name": "m", "backend": "tgi", "url": "http://tgi"}]}, environ={}
    )
    return registry.create(cfg.models[0])


@pytest.mark.parametrize("field", sorted(OPENAI_PARAMS))
def test_tgi_policy_decides_every_field(field):
    """Each OpenAI parameter is honoured, ignored, or refused naming it: none slips by."""
    adapter = _tgi()
    request = build_request("completion", {"model": "m", "prompt": "x"})
    request.params[field] = "not-neutral"
    if field in adapter.supported_params:
        adapter.prepare(request)
        assert field in request.params
    elif field in IGNORABLE_PARAMS:
        adapter.prepare(request)
        assert field not in request.params  # accepted, and not for the upstream
    else:
        with pytest.raises(UnsupportedParameter) as exc:
            adapter.prepare(request)
        assert exc.value.param == field


def test_tgi_refuses_a_schema_field_it_does_not_support(client, fakes):
    assert "presence_penalty" in fields(ChatCompletionRequest)
    assert "presence_penalty" not in _tgi().supported_params
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tgi", messages=USER, presence_penalty=0.5)
    assert exc.value.status_code == 400
    assert exc.value.code == "unsupported_parameter"
    assert exc.value.param == "presence_penalty"
    assert "presence_penalty" in exc.value.message


@pytest.mark.parametrize("value", [0, 0.0])
def test_tgi_accepts_the_neutral_value(client, fakes, value):
    raw = client.chat.completions.with_raw_response.create(
        model="tgi", messages=USER, presence_penalty=value
    )
    assert raw.status_code == 200
    assert raw.parse().choices[0].message.content
    assert "presence_penalty" not in keys_of(_last_post(fakes.tgi, "/generate"))
