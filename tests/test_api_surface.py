"""The OpenAI surface itself: errors, validation, auth, limits, models, fan-out (echo model)."""

from __future__ import annotations

import httpx
import openai
import pytest

USER = [{"role": "user", "content": "alpha beta gamma delta"}]


def post(srv, path: str, body, **kw) -> httpx.Response:
    if not isinstance(body, bytes):
        return httpx.post(srv.url + path, json=body, timeout=10, **kw)
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return httpx.post(srv.url + path, content=body, headers=headers, timeout=10, **kw)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        ({"model": "echo", "messages": []}, "messages"),
        ({"model": "echo"}, "messages"),
        ({"messages": USER}, "model"),
        ({"model": "echo", "messages": USER, "max_tokens": -1}, "max_tokens"),
        ({"model": "echo", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "echo", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "echo", "messages": USER, "temperature": "hot"}, "temperature"),
        ({"model": "echo", "messages": USER, "temperature": 3}, "temperature"),
        ({"model": "echo", "messages": USER, "n": 0}, "n"),
        ({"model": "echo", "messages": USER, "stream": "yes"}, "stream"),
        (
            {"model": "echo", "messages": [{"role": "tool", "content": "x"}]},
            "messages[0].tool_call_id",
        ),
        (
            {"model": "echo", "messages": USER, "response_format": {"type": "xml"}},
            "response_format.type",
        ),
        ({"model": "echo", "messages": USER, "tool_choice": "required"}, "tool_choice"),
        (
            {
                "model": "echo",
                "messages": USER,
                "tools": [{"type": "function", "function": {"name": "a"}}],
                "tool_choice": {"type": "function", "function": {"name": "b"}},
            },
            "tool_choice",
        ),
    ],
)
def test_bad_body_is_400_naming_the_field(echo_server, body, param):
    r = post(echo_server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    if param:
        assert param in err["message"]


def test_bad_completion_body(echo_server):
    r = post(echo_server, "/v1/completions", {"model": "echo", "prompt": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = post(echo_server, "/v1/completions", {"model": "echo"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_validation_messages_speak_json_not_python():
    """A wrong type is described as JSON ("a valid dictionary"), never as a Python class, and
    a json_schema format without its schema names the field."""
    from inferbridge.api.protocol import build_request
    from inferbridge.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as info:
        build_request("chat", {"model": "m", "messages": ["hi"]})
    assert info.value.param == "messages[0]"
    assert "valid dictionary" in info.value.message
    assert "instance" not in info.value.message
    with pytest.raises(InvalidRequest) as info:
        build_request(
            "chat", {"model": "m", "messages": USER, "response_format": {"type": "json_schema"}}
        )
    assert info.value.param == "response_format"
    assert "json_schema is required" in info.value.message


def test_sdk_raises_bad_request(echo_server):
    with pytest.raises(openai.BadRequestError) as info:
        echo_server.openai().chat.completions.create(model="echo", messages=[])
    assert info.value.param == "messages"


def test_unsupported_parameter_is_400_unless_dropped():
    """The shared policy (`Backend.prepare`) for an adapter that declares few parameters."""
    from inferbridge.api.protocol import build_request
    from inferbridge.backends.base import Backend
    from inferbridge.config import DeploymentConfig
    from inferbridge.errors import UnsupportedParameter

    class Strict(Backend):
        supported_params = frozenset({"max_tokens"})

    def prepared(drop: bool, **fields):
        backend = Strict(DeploymentConfig(name="strict", backend="strict"))
        backend.drop_unsupported = drop
        return backend.prepare(
            build_request("chat", {"model": "strict", "messages": USER, **fields})
        )

    with pytest.raises(UnsupportedParameter) as info:
        prepared(False, logprobs=True)
    assert info.value.param == "logprobs"
    with pytest.raises(UnsupportedParameter) as info:
        prepared(False, top_k=3)
    assert info.value.param == "top_k"
    lenient = prepared(True, logprobs=True, top_k=3)
    assert "logprobs" not in lenient.params and "top_k" not in lenient.extras
    assert lenient.ignored == ["logprobs", "top_k"]
    # neutral values are not a use of an unsupported parameter
    assert prepared(False, n=1, logprobs=False).ignored == []


def test_max_tokens_and_stop(echo_server):
    client = echo_server.openai()
    r = client.chat.completions.create(model="echo", messages=USER, max_tokens=2)
    assert r.choices[0].message.content == "alpha beta"
    assert r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model="echo", messages=USER, stop=[" gam"])
    assert r.choices[0].message.content == "alpha beta"
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="echo", messages=USER, max_completion_tokens=1)
    assert r.choices[0].message.content == "alpha"


def test_n_fans_out_into_interleaved_choices(echo_server):
    client = echo_server.openai()
    r = client.chat.completions.create(model="echo", messages=USER, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert {c.message.content for c in r.choices} == {"alpha beta gamma delta"}
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == 4
    chunks = list(
        client.chat.completions.create(model="slow-echo", messages=USER, n=2, stream=True)
    )
    per_choice: dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            per_choice[ch.index] = per_choice.get(ch.index, "") + (ch.delta.content or "")
    assert per_choice == {0: "alpha beta gamma delta", 1: "alpha beta gamma delta"}
    finishes = [ch.index for c in chunks for ch in c.choices if ch.finish_reason]
    assert sorted(finishes) == [0, 1]


def test_completion_prompt_list(echo_server):
    r = echo_server.openai().completions.create(model="echo", prompt=["one two", "three"])
    assert [(c.index, c.text) for c in r.choices] == [(0, "one two"), (1, "three")]


def test_raw_stream_shape(echo_server):
    with httpx.stream(
        "POST",
        echo_server.base_url + "/chat/completions",
        timeout=10,
        json={
            "model": "echo",
            "messages": USER,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        assert r.headers["x-request-id"]
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    for chunk in chunks[:-1]:
        assert chunk["usage"] is None
        for choice in chunk["choices"]:
            assert "logprobs" in choice and "finish_reason" in choice
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 8
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_non_stream_shape_has_strict_client_fields(echo_server):
    r = post(echo_server, "/v1/chat/completions", {"model": "echo", "messages": USER}).json()
    choice = r["choices"][0]
    assert choice["logprobs"] is None and choice["message"]["refusal"] is None
    assert r["id"].startswith("chatcmpl-") and r["object"] == "chat.completion"
    other = post(echo_server, "/v1/chat/completions", {"model": "echo", "messages": USER})
    assert other.json()["id"] != r["id"]


def test_request_id_is_taken_from_the_client(echo_server):
    r = post(
        echo_server,
        "/v1/chat/completions",
        {"model": "echo", "messages": USER},
        headers={"x-request-id": "abc-123"},
    )
    assert r.headers["x-request-id"] == "abc-123"


def test_body_over_the_limit_is_413(serve):
    srv = serve({"server": {"max_body_bytes": 1000}, "models": [{"name": "e", "backend": "echo"}]})
    r = post(
        srv,
        "/v1/chat/completions",
        {"model": "e", "messages": [{"role": "user", "content": "x" * 2000}]},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_api_keys(serve):
    srv = serve(
        {"auth": {"api_keys": ["sk-right"]}, "models": [{"name": "e", "backend": "echo"}]},
        api_key="sk-wrong",
    )
    with pytest.raises(openai.AuthenticationError):
        srv.openai().chat.completions.create(model="e", messages=USER)
    with pytest.raises(openai.AuthenticationError):
        srv.openai().models.list()
    r = post(srv, "/v1/chat/completions", {"model": "e", "messages": USER})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    ok = openai.OpenAI(base_url=srv.base_url, api_key="sk-right", max_retries=0)
    assert ok.chat.completions.create(model="e", messages=USER).choices
    assert httpx.get(srv.url + "/health").status_code == 200


def test_models_list_and_retrieve(serve):
    srv = serve(
        {
            "models": [
                {"name": "meta-llama/Llama-3-8B", "backend": "echo"},
                {"name": "echo", "backend": "echo"},
                {"name": "echo", "backend": "echo"},
            ]
        }
    )
    client = srv.openai()
    assert [m.id for m in client.models.list()] == ["meta-llama/Llama-3-8B", "echo"]
    assert client.models.retrieve("meta-llama/Llama-3-8B").id == "meta-llama/Llama-3-8B"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("missing")
    assert info.value.body["code"] == "model_not_found"


def test_unknown_path_and_docs(echo_server):
    r = httpx.get(echo_server.url + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    schema = httpx.get(echo_server.url + "/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]
    assert httpx.get(echo_server.url + "/docs").status_code == 200
