"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`) end to end: the
official `anthropic` SDK -> inferbridge -> echo, the OpenAI-compatible fake and the
llama.cpp fake; and the translation, rendering and error envelope in units."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from typing import Any

import anthropic
import httpx
import orjson
import pytest
from aiohttp import web

from inferbridge.api.anthropic.render import MessagesRenderer, tool_input
from inferbridge.api.anthropic.schema import MessagesRequest, field_path, to_chat
from inferbridge.api.heartbeat import Heartbeats
from inferbridge.backends.openai_compat import chunk_events
from inferbridge.events import Finish, TextDelta, ToolCallDelta, Usage
from inferbridge.request import InferenceRequest
from tests.fakes.llamacpp import FakeLlamaCpp
from tests.fakes.openai_compat import FakeOpenAI
from tests.fakes.tgi import FakeTGI

KEY = "sk-test"
USER = [{"role": "user", "content": "hello there world"}]
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def client(srv: Any, **kw: Any) -> anthropic.Anthropic:
    kw.setdefault("api_key", KEY)
    return anthropic.Anthropic(base_url=srv.url, max_retries=0, timeout=20, **kw)


def post(srv: Any, path: str, body: Any, **headers: str) -> httpx.Response:
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01", **headers}
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    headers.setdefault("content-type", "application/json")
    return httpx.post(srv.url + path, content=data, headers=headers, timeout=20)


def same_message(streamed: Any, whole: Any) -> None:
    """A streamed answer's final message is the whole answer (but for its id)."""
    a = streamed.model_dump(exclude_none=True, exclude={"id"})
    b = whole.model_dump(exclude_none=True, exclude={"id"})
    assert a == b


def metric(srv: Any, name: str, model: str) -> float:
    text = httpx.get(srv.url + "/metrics").text
    found = re.search(rf'^{name}\{{model="{model}"\}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def wait_until(condition: Any, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- echo: text, stop sequences, max_tokens ---------------------------------------------------
@pytest.fixture(scope="module")
def echo():
    from tests.server import InferbridgeServer

    config = {
        "auth": {"api_keys": [KEY]},
        "models": [
            {"name": "echo", "backend": "echo"},
            {"name": "slow", "backend": "echo", "delay": 0.05},
        ],
        "model_aliases": {"claude-sonnet-4-5": "echo"},
    }
    with InferbridgeServer(config, api_key=KEY) as srv:
        yield srv


def test_text_whole_and_streamed(echo):
    c = client(echo)
    m = c.messages.create(model="echo", max_tokens=100, messages=USER)
    assert m.type == "message" and m.role == "assistant" and m.model == "echo"
    assert m.id.startswith("msg_")
    assert [(b.type, b.text) for b in m.content] == [("text", "hello there world")]
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    assert (m.usage.input_tokens, m.usage.output_tokens) == (3, 3)

    with c.messages.stream(model="echo", max_tokens=100, messages=USER) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "message_delta" in kinds
    same_message(final, m)


def test_alias_system_and_blocks(echo):
    m = client(echo).messages.create(
        model="claude-sonnet-4-5",
        max_tokens=100,
        system=[{"type": "text", "text": "be brief"}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "one"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "three", "cache_control": {"type": "ephemeral"}},
                    {"type": "text", "text": "four"},
                ],
            },
        ],
        metadata={"user_id": "u-1"},
        extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 5},  # not in newer SDKs
    )
    assert m.content[0].text == "three four"  # text blocks joined with a newline
    assert m.model == "claude-sonnet-4-5"


def test_stop_sequence(echo):
    c = client(echo)
    kw = {
        "model": "echo",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "say one two END three"}],
        "stop_sequences": ["NEVER", "END"],
    }
    m = c.messages.create(**kw)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "END"
    assert m.content[0].text == "say one two "
    with c.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    same_message(final, m)


def test_max_tokens(echo):
    c = client(echo)
    kw = {"model": "echo", "max_tokens": 2, "messages": USER}
    m = c.messages.create(**kw)
    assert m.stop_reason == "max_tokens" and m.content[0].text == "hello there"
    assert m.usage.output_tokens == 2
    with c.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    same_message(final, m)


def test_raw_stream_events(echo):
    """The wire shape: `event: <type>` and `data: <json>` whose `type` matches, in order."""
    body = {"model": "echo", "max_tokens": 10, "messages": USER, "stream": True}
    r = post(echo, "/v1/messages", body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = []
    for chunk in r.text.split("\n\n"):
        if not chunk:
            continue
        head, data = chunk.split("\n")
        kind = head.removeprefix("event: ")
        payload = orjson.loads(data.removeprefix("data: "))
        assert payload["type"] == kind
        events.append(payload)
    assert [e["type"] for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == 3  # the whole answer came in the first batch
    assert events[1]["content_block"] == {"type": "text", "text": ""}
    assert events[2]["delta"] == {"type": "text_delta", "text": "hello there world"}
    assert events[4]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[4]["usage"] == {"input_tokens": 3, "output_tokens": 3}


def test_pings_on_silence(echo, monkeypatch):
    monkeypatch.setattr(MessagesRenderer, "heartbeat", 0.04)
    body = {
        "model": "slow",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "a b c d e f"}],
        "stream": True,
    }
    r = post(echo, "/v1/messages", body)
    assert 'event: ping\ndata: {"type":"ping"}\n\n' in r.text
    with client(echo).messages.stream(**{k: v for k, v in body.items() if k != "stream"}) as s:
        assert s.get_final_message().content[0].text == "a b c d e f"


def test_count_tokens_estimated(echo):
    r = post(echo, "/v1/messages/count_tokens", {"model": "echo", "messages": USER})
    assert r.status_code == 200
    assert r.headers["x-inferbridge-tokens-estimated"] == "true"
    assert r.json() == {"input_tokens": 9}  # ceil(15 chars / 4) + 4 per message
    with_tools = client(echo).messages.count_tokens(model="echo", messages=USER, tools=[WEATHER])
    assert with_tools.input_tokens > 9


def test_disconnect_mid_stream_cancels_the_upstream(echo):
    assert wait_until(lambda: metric(echo, "inferbridge_requests_in_flight", "slow") == 0.0)
    before = metric(echo, "inferbridge_client_disconnects_total", "slow")
    words = " ".join(f"w{i}" for i in range(100))  # 5 s of tokens
    body = orjson.dumps(
        {
            "model": "slow",
            "max_tokens": 200,
            "messages": [{"role": "user", "content": words}],
            "stream": True,
        }
    )
    head = (
        f"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: {KEY}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", echo.port)) as sock:
        sock.sendall(head + body)
        received = b""
        while received.count(b"content_block_delta") < 3:
            received += sock.recv(65536)
        assert metric(echo, "inferbridge_requests_in_flight", "slow") == 1.0
    assert wait_until(lambda: metric(echo, "inferbridge_requests_in_flight", "slow") == 0.0)
    assert metric(echo, "inferbridge_client_disconnects_total", "slow") == before + 1


# -- errors, in Anthropic's envelope ---------------------------------------------------------
def envelope(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert body["type"] == "error" and set(body) == {"type", "error"}
    assert set(body["error"]) == {"type", "message"}
    return body["error"]


def test_bad_input_names_the_field(echo):
    c = client(echo)
    with pytest.raises(anthropic.BadRequestError) as info:
        c.messages.create(
            model="echo", max_tokens=10, messages=USER, extra_body={"temperature": 1.5}
        )
    assert info.value.status_code == 400
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert info.value.body["error"]["message"].startswith("temperature: ")

    with pytest.raises(anthropic.BadRequestError) as info:
        c.messages.create(
            model="echo",
            max_tokens=10,
            messages=[{"role": "user", "content": [{"type": "txt", "text": "x"}]}],
        )
    assert info.value.body["error"]["message"].startswith("messages.0.content.0.type: ")

    cases = {
        "max_tokens: Field required": {"model": "echo", "messages": USER},
        "messages.0.content.0.text: Field required": {
            "model": "echo",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "text"}]}],
        },
        "messages.0.role: ": {
            "model": "echo",
            "max_tokens": 5,
            "messages": [{"role": "system", "content": "x"}],
        },
        "stop_sequences: ": {
            "model": "echo",
            "max_tokens": 5,
            "messages": USER,
            "stop_sequences": "END",
        },
        "frequency_penalty: Extra inputs are not permitted": {
            "model": "echo",
            "max_tokens": 5,
            "messages": USER,
            "frequency_penalty": 1,
        },
        "tool_choice.name: ": {
            "model": "echo",
            "max_tokens": 5,
            "messages": USER,
            "tools": [WEATHER],
            "tool_choice": {"type": "tool", "name": "nope"},
        },
        "messages.0.content.0.type: tool_use blocks belong in assistant messages.": {
            "model": "echo",
            "max_tokens": 5,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "tool_use", "id": "t", "name": "n", "input": {}}],
                }
            ],
        },
        "thinking: ": {
            "model": "echo",
            "max_tokens": 5,
            "messages": USER,
            "thinking": {"type": "enabled", "budget_tokens": 1024},
        },
        "messages.0: all messages must have non-empty content": {
            "model": "echo",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": []}],
        },
        "messages.1: all messages must have non-empty content": {
            "model": "echo",
            "max_tokens": 5,
            "messages": [*USER, {"role": "assistant", "content": ""}, *USER],
        },
        "tools.1.type: server tools ('web_search_20250305') are not supported": {
            "model": "echo",
            "max_tokens": 5,
            "messages": USER,
            "tools": [WEATHER, {"type": "web_search_20250305", "name": "web_search"}],
        },
        "messages.0.content.0.source.data: the data is not valid base64": {
            "model": "echo",
            "max_tokens": 5,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "!!"},
                        }
                    ],
                }
            ],
        },
        "tool_choice: tool_choice 'any' needs at least one tool": {
            "model": "echo",
            "max_tokens": 5,
            "messages": USER,
            "tool_choice": {"type": "any"},
        },
    }
    for message, body in cases.items():
        r = post(echo, "/v1/messages", body)
        assert r.status_code == 400, body
        err = envelope(r)
        assert err["type"] == "invalid_request_error"
        assert err["message"].startswith(message), (message, err["message"])


def test_body_that_is_not_json_or_an_object(echo):
    r = post(echo, "/v1/messages", b"{nope")
    assert r.status_code == 400 and "not valid JSON" in envelope(r)["message"]
    r = post(echo, "/v1/messages", [1, 2])
    assert r.status_code == 400 and envelope(r)["message"].endswith("must be a JSON object.")


def test_keys(echo):
    with pytest.raises(anthropic.AuthenticationError) as info:
        client(echo, api_key="sk-wrong").messages.create(model="echo", max_tokens=5, messages=USER)
    assert info.value.body["error"]["type"] == "authentication_error"
    r = httpx.post(echo.url + "/v1/messages", json={"model": "echo"}, timeout=5)
    assert r.status_code == 401 and envelope(r)["type"] == "authentication_error"
    # a Bearer token works too (Anthropic's auth_token), and x-api-key on the OpenAI routes
    bearer = anthropic.Anthropic(base_url=echo.url, auth_token=KEY, max_retries=0)
    assert bearer.messages.create(model="echo", max_tokens=5, messages=USER).content
    r = httpx.post(
        echo.url + "/v1/chat/completions",
        json={"model": "echo", "messages": USER},
        headers={"x-api-key": KEY},
        timeout=5,
    )
    assert r.status_code == 200


def test_unknown_model(echo):
    with pytest.raises(anthropic.NotFoundError) as info:
        client(echo).messages.create(model="nope", max_tokens=5, messages=USER)
    assert info.value.body["error"] == {
        "type": "not_found_error",
        "message": "The model 'nope' does not exist.",
    }
    with pytest.raises(anthropic.NotFoundError):
        client(echo).messages.count_tokens(model="nope", messages=USER)


def test_gate_and_routing_errors_use_the_envelope(echo):
    r = post(echo, "/v1/messages", b"{}", **{"content-type": "text/plain"})
    assert r.status_code == 415 and envelope(r)["type"] == "invalid_request_error"
    r = httpx.get(echo.url + "/v1/messages", headers={"x-api-key": KEY}, timeout=5)
    assert r.status_code == 405 and envelope(r)["type"] == "invalid_request_error"
    r = post(echo, "/v1/messages/batches", {})
    assert r.status_code == 404 and envelope(r)["type"] == "not_found_error"
    # the OpenAI routes keep theirs
    r = post(echo, "/v1/chat/completions", b"{}", **{"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_body_too_large(serve):
    srv = serve(
        {
            "auth": {"api_keys": [KEY]},
            "server": {"max_body_bytes": 200},
            "models": [{"name": "echo", "backend": "echo"}],
        }
    )
    with pytest.raises(anthropic.APIStatusError) as info:
        client(srv).messages.create(
            model="echo", max_tokens=5, messages=[{"role": "user", "content": "x" * 500}]
        )
    assert info.value.status_code == 413
    assert info.value.body["error"]["type"] == "request_too_large"


def test_openapi_documents_the_routes(echo):
    spec = httpx.get(echo.url + "/openapi.json").json()
    post_ = spec["paths"]["/v1/messages"]["post"]
    ref = post_["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/MessagesRequest")
    schema = spec["components"]["schemas"]["MessagesRequest"]
    assert {"model", "max_tokens", "messages"} <= set(schema["required"])
    assert "/v1/messages/count_tokens" in spec["paths"]


# -- an OpenAI-compatible upstream: tools, upstream errors ------------------------------------
class TokenizingOpenAI(FakeOpenAI):
    """The OpenAI-compatible fake with vLLM's `POST /tokenize` (chat form)."""

    def routes(self) -> list[web.RouteDef]:
        return [*super().routes(), web.post("/tokenize", self.tokenize)]

    async def tokenize(self, request: web.Request) -> web.Response:
        rec = await self.record(request)
        words = sum(len(str(m.get("content") or "").split()) for m in rec.json["messages"])
        return web.json_response({"count": words + 10, "max_model_len": 4096, "tokens": []})


@pytest.fixture(scope="module")
def upstream():
    with TokenizingOpenAI() as fake:
        yield fake


@pytest.fixture
def vllm(serve, upstream):
    upstream.reset()
    upstream.reply = ["Hello", " from", " upstream"]
    upstream.tool_calls = None
    upstream.finish_reason = "stop"
    entry = {"url": upstream.url + "/v1", "upstream_model": "upstream-model", "timeout": 5}
    return serve(
        {
            "auth": {"api_keys": [KEY]},
            "models": [
                {"name": "vllm", "backend": "vllm", **entry},
                {"name": "compat", "backend": "openai-compatible", **entry},
            ],
        }
    )


def test_request_translation_reaches_the_upstream(vllm, upstream):
    m = client(vllm).messages.create(
        model="vllm",
        max_tokens=64,
        system="be brief",
        messages=USER,
        stop_sequences=["END"],
        extra_body={"temperature": 0.2, "top_p": 0.5, "top_k": 7},
        metadata={"user_id": "u-1"},
    )
    assert m.content[0].text == "Hello from upstream"
    assert (m.usage.input_tokens, m.usage.output_tokens) == (7, 3)
    sent = upstream.requests[-1].json
    assert sent == {
        "model": "upstream-model",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there world"},
        ],
        "max_tokens": 64,
        "stop": ["END"],
        "temperature": 0.2,
        "top_p": 0.5,
        "top_k": 7,
        "user": "u-1",
        "stream": False,
    }
    with client(vllm).messages.stream(model="vllm", max_tokens=64, messages=USER) as stream:
        final = stream.get_final_message()
    assert upstream.requests[-1].json["stream_options"] == {"include_usage": True}
    assert (final.usage.input_tokens, final.usage.output_tokens) == (7, 3)


def test_tool_use_round_trip(vllm, upstream):
    upstream.reply = ["Let me check."]
    upstream.tool_calls = [
        {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"id": "call_2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
    ]
    upstream.finish_reason = "tool_calls"
    c = client(vllm)
    kw: dict[str, Any] = {
        "model": "vllm",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "Weather in Paris and Rome?"}],
        "tools": [WEATHER],
        "tool_choice": {"type": "any"},
    }
    m = c.messages.create(**kw)
    assert m.stop_reason == "tool_use"
    assert [b.type for b in m.content] == ["text", "tool_use", "tool_use"]
    assert m.content[0].text == "Let me check."
    calls = [(b.id, b.name, b.input) for b in m.content[1:]]
    assert calls == [
        ("call_1", "get_weather", {"city": "Paris"}),
        ("call_2", "get_weather", {"city": "Rome"}),
    ]
    sent = upstream.requests[-1].json
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": WEATHER["input_schema"],
            },
        }
    ]
    assert sent["tool_choice"] == "required"

    with c.messages.stream(**kw) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    same_message(final, m)
    assert kinds.count("content_block_start") == 3 and kinds.count("content_block_stop") == 3

    # the results go back as tool messages after the assistant's tool calls
    upstream.tool_calls = None
    upstream.finish_reason = "stop"
    upstream.reply = ["Sunny in both."]
    answer = c.messages.create(
        model="vllm",
        max_tokens=100,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        messages=[
            kw["messages"][0],
            {"role": "assistant", "content": m.content},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "18 C, sunny"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "call_2",
                        "content": [
                            {"type": "text", "text": "24 C"},
                            {"type": "text", "text": "sunny"},
                        ],
                        "is_error": False,
                    },
                    {"type": "text", "text": "Summarize."},
                ],
            },
        ],
    )
    assert answer.stop_reason == "end_turn" and answer.content[0].text == "Sunny in both."
    sent = upstream.requests[-1].json
    assert sent["messages"][1:] == [
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "24 C\nsunny"},
        {"role": "user", "content": "Summarize."},
    ]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["parallel_tool_calls"] is False


def test_tool_arguments_that_are_not_an_object(vllm, upstream):
    upstream.reply = []
    upstream.tool_calls = [
        {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Par'},
        {"id": "call_2", "name": "get_weather", "arguments": ""},
    ]
    upstream.finish_reason = "tool_calls"
    c = client(vllm)
    kw: dict[str, Any] = {"model": "vllm", "max_tokens": 100, "messages": USER, "tools": [WEATHER]}
    m = c.messages.create(**kw)
    assert [b.input for b in m.content] == [{"_raw_arguments": '{"city": "Par'}, {}]
    with c.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    same_message(final, m)


def test_upstream_errors(vllm, upstream):
    upstream.behaviour.status = 500
    with pytest.raises(anthropic.InternalServerError) as info:
        client(vllm).messages.create(model="compat", max_tokens=5, messages=USER)
    assert info.value.status_code == 502
    assert info.value.body["error"]["type"] == "api_error"
    upstream.behaviour.status = 503
    with pytest.raises(anthropic.APIStatusError) as info:
        client(vllm).messages.create(model="vllm", max_tokens=5, messages=USER)
    assert info.value.status_code == 503
    assert info.value.body["error"]["type"] == "overloaded_error"


def test_error_after_the_stream_started(vllm, upstream):
    upstream.reply = ["a", "b", "c"]
    upstream.error_event_after = 1
    try:
        body = {"model": "vllm", "max_tokens": 5, "messages": USER, "stream": True}
        r = post(vllm, "/v1/messages", body)
        assert r.status_code == 200
        last = r.text.strip().split("\n\n")[-1]
        assert last.startswith("event: error\ndata: ")
        error = orjson.loads(last.split("data: ", 1)[1])
        assert error["type"] == "error" and error["error"]["type"] == "api_error"
        with (
            pytest.raises(anthropic.APIStatusError),
            client(vllm).messages.stream(model="vllm", max_tokens=5, messages=USER) as stream,
        ):
            for _ in stream:
                pass
    finally:
        upstream.error_event_after = None


def test_count_tokens_through_vllm_tokenize(vllm, upstream):
    count = client(vllm).messages.count_tokens(model="vllm", system="be brief", messages=USER)
    assert count.input_tokens == 5 + 10
    sent = [r for r in upstream.requests if r.path == "/tokenize"][-1].json
    assert sent["model"] == "upstream-model" and sent["add_generation_prompt"] is True
    assert sent["messages"][0] == {"role": "system", "content": "be brief"}
    r = post(vllm, "/v1/messages/count_tokens", {"model": "vllm", "messages": USER})
    assert "x-inferbridge-tokens-estimated" not in r.headers
    # an OpenAI-compatible server other than vLLM has no /tokenize: estimated
    r = post(vllm, "/v1/messages/count_tokens", {"model": "compat", "messages": USER})
    assert r.headers["x-inferbridge-tokens-estimated"] == "true"


# -- a native backend: llama.cpp's /completion with a chat template ---------------------------
class TokenizingLlamaCpp(FakeLlamaCpp):
    """The llama.cpp fake with `POST /tokenize` (one token per word, plus BOS)."""

    def routes(self) -> list[web.RouteDef]:
        return [*super().routes(), web.post("/tokenize", self.tokenize)]

    async def tokenize(self, request: web.Request) -> web.Response:
        rec = await self.record(request)
        tokens = list(range(len(rec.json["content"].split()) + bool(rec.json.get("add_special"))))
        return web.json_response({"tokens": tokens})


@pytest.fixture(scope="module")
def llama_upstream():
    with TokenizingLlamaCpp() as fake:
        yield fake


@pytest.fixture
def llama(serve, llama_upstream):
    llama_upstream.reset()
    entry = {"backend": "llamacpp", "url": llama_upstream.url, "timeout": 5}
    return serve(
        {
            "auth": {"api_keys": [KEY]},
            "models": [{"name": "llama", "prompt_template": "chatml", **entry}],
        }
    )


def test_native_backend(llama, llama_upstream):
    c = client(llama)
    kw: dict[str, Any] = {"model": "llama", "max_tokens": 100, "system": "hi", "messages": USER}
    m = c.messages.create(**kw)
    assert m.content[0].text == "Hello, world! Bye."
    assert m.stop_reason == "end_turn"
    assert (m.usage.input_tokens, m.usage.output_tokens) == (8, 7)  # fake: words + BOS
    sent = [r for r in llama_upstream.requests if r.path == "/completion"][-1].json
    assert sent["prompt"] == (
        "<|im_start|>system\nhi<|im_end|>\n<|im_start|>user\nhello there world<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert sent["n_predict"] == 100
    with c.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    same_message(final, m)

    stopped = c.messages.create(**{**kw, "stop_sequences": ["!"]})
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "!"
    assert stopped.content[0].text == "Hello, world"
    with c.messages.stream(**{**kw, "stop_sequences": ["!"]}) as stream:
        same_message(stream.get_final_message(), stopped)

    short = c.messages.create(**{**kw, "max_tokens": 2})
    assert short.stop_reason == "max_tokens" and short.content[0].text == "Hello,"


def test_native_backend_refuses_tools_by_name(llama):
    with pytest.raises(anthropic.BadRequestError) as info:
        client(llama).messages.create(model="llama", max_tokens=5, messages=USER, tools=[WEATHER])
    assert "'tools'" in info.value.body["error"]["message"]


def test_count_tokens_through_llamacpp_tokenize(llama, llama_upstream):
    count = client(llama).messages.count_tokens(model="llama", messages=USER)
    # "<|im_start|>user\nhello there world<|im_end|>\n<|im_start|>assistant\n": 5 words + BOS
    assert count.input_tokens == 6
    m = client(llama).messages.create(model="llama", max_tokens=5, messages=USER)
    assert m.usage.input_tokens == count.input_tokens  # the prompt /completion was sent
    sent = [r for r in llama_upstream.requests if r.path == "/tokenize"][-1].json
    assert sent["add_special"] is True and sent["content"].startswith("<|im_start|>user")


# -- TGI's native /generate with a chat template ----------------------------------------------
class TokenizingTGI(FakeTGI):
    """The TGI fake with `POST /tokenize` (one token per word, plus BOS, as it counts)."""

    def routes(self) -> list[web.RouteDef]:
        return [*super().routes(), web.post("/tokenize", self.tokenize)]

    async def tokenize(self, request: web.Request) -> web.Response:
        rec = await self.record(request)
        words = ["<s>", *rec.json["inputs"].split()]
        return web.json_response(
            [{"id": i, "text": w, "start": 0, "stop": 0} for i, w in enumerate(words)]
        )


def test_tgi(serve):
    with TokenizingTGI() as fake:
        entry = {"backend": "tgi", "url": fake.url, "prompt_template": "chatml"}
        srv = serve({"auth": {"api_keys": [KEY]}, "models": [{"name": "tgi", **entry}]})
        c = client(srv)
        kw: dict[str, Any] = {"model": "tgi", "max_tokens": 20, "messages": USER}
        m = c.messages.create(**kw)
        assert m.content[0].type == "text" and m.content[0].text
        assert m.stop_reason in ("end_turn", "max_tokens")
        with c.messages.stream(**kw) as stream:
            same_message(stream.get_final_message(), m)
        count = c.messages.count_tokens(model="tgi", messages=USER)
        assert count.input_tokens == m.usage.input_tokens
        sent = [r for r in fake.requests if r.path == "/tokenize"][-1].json
        assert sent["inputs"].startswith("<|im_start|>user\nhello there world")


# -- units ------------------------------------------------------------------------------------
def test_field_paths():
    assert field_path(("messages", 0, "content", "str")) == "messages.0.content"
    assert (
        field_path(("messages", 0, "content", "list[tagged-union[...]]", 1, "text", "text"))
        == "messages.0.content.1.text"
    )
    assert (
        field_path(
            ("messages", 0, "content", "list[...]", 0, "tool_result", "content", "list[...]", 2)
        )
        == "messages.0.content.0.content.2"
    )
    assert field_path(("tool_choice", "tool", "name")) == "tool_choice.name"
    assert field_path(("system", "list[TextBlockParam]", 0, "text")) == "system.0.text"
    assert (
        field_path(("messages", 1, "content", "list[...]", 0, "image", "source", "base64", "data"))
        == "messages.1.content.0.source.data"
    )


def test_to_chat_images_and_thinking():
    body: MessagesRequest = {
        "model": "m",
        "max_tokens": 5,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "s"},
                    {"type": "text", "text": "a cat"},
                ],
            },
        ],
        "tool_choice": {"type": "none"},
        "thinking": {"type": "disabled"},
    }
    chat = to_chat(dict(body))
    assert chat["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
            ],
        },
        {"role": "assistant", "content": "a cat"},
    ]
    assert chat["tool_choice"] == "none"


def test_tool_input():
    assert tool_input('{"a": 1}') == {"a": 1}
    assert tool_input("  ") == {}
    assert tool_input("[1, 2]") == {"_raw_arguments": "[1, 2]"}
    assert tool_input('{"a": ') == {"_raw_arguments": '{"a": '}


def _render(batches: list[list[Any]], stop: list[str] | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"stop": stop} if stop else {}
    request = InferenceRequest("chat", "m", params, messages=[{"role": "user", "content": "x"}])
    render = MessagesRenderer(request, 1, False)
    for batch in batches:
        render.add(batch)
    return render.result()[0]


def test_stop_reasons():
    text = [TextDelta("hi")]
    assert _render([[*text, Finish("stop")]])["stop_reason"] == "end_turn"
    assert _render([[*text, Finish("length")]])["stop_reason"] == "max_tokens"
    assert _render([[*text, Finish("content_filter")]])["stop_reason"] == "refusal"
    assert _render([[*text]])["stop_reason"] == "end_turn"  # no finish at all
    found = _render([[*text, Finish("stop", stop_sequence="END")]], stop=["END"])
    assert (found["stop_reason"], found["stop_sequence"]) == ("stop_sequence", "END")
    # a template's stop string is not one of the request's: the turn ended
    other = _render([[*text, Finish("stop", stop_sequence="<|im_end|>")]], stop=["END"])
    assert (other["stop_reason"], other["stop_sequence"]) == ("end_turn", None)
    # the backend says a stop string ended it, not which
    unknown = _render([[*text, Finish("stop", stop_sequence="")]], stop=["END"])
    assert (unknown["stop_reason"], unknown["stop_sequence"]) == ("stop_sequence", None)
    call = ToolCallDelta(0, id="c", name="f", arguments="{}")
    assert _render([[call, Finish("stop")]])["stop_reason"] == "tool_use"


def test_text_after_a_tool_call_opens_a_new_block_and_usage_is_relayed():
    message = _render(
        [
            [TextDelta("a"), ToolCallDelta(0, id="c1", name="f", arguments='{"x"')],
            [ToolCallDelta(0, arguments=": 1}"), TextDelta("b")],
            [Finish("tool_calls"), Usage(11, 4)],
        ]
    )
    assert message["content"] == [
        {"type": "text", "text": "a"},
        {"type": "tool_use", "id": "c1", "name": "f", "input": {"x": 1}},
        {"type": "text", "text": "b"},
    ]
    assert message["usage"] == {"input_tokens": 11, "output_tokens": 4}


def test_vllm_and_tgi_say_which_stop():
    def finish(choice: dict[str, Any]) -> Finish:
        return next(e for e in chunk_events({"choices": [choice]}, True) if isinstance(e, Finish))

    assert (
        finish(
            {"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "END"}
        ).stop_sequence
        == "END"
    )
    assert (
        finish(
            {"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": 128009}
        ).stop_sequence
        is None
    )
    assert finish({"index": 0, "delta": {}, "finish_reason": "stop_sequence"}).stop_sequence == ""


async def test_heartbeats_ping_while_the_stream_is_silent_and_close_it():
    closed = asyncio.Event()

    async def slow():
        try:
            yield [TextDelta("a")]
            await asyncio.sleep(0.2)
            yield [TextDelta("b")]
            await asyncio.sleep(10)
            yield [TextDelta("never")]
        finally:
            closed.set()

    beats = Heartbeats(slow(), 0.05)
    seen = []
    async for item in beats:
        seen.append(item)
        if item is not None and item[0].text == "b":
            break
    await beats.aclose()
    assert closed.is_set()
    texts = [i[0].text if i is not None else None for i in seen]
    assert texts[0] == "a" and texts[-1] == "b" and 2 <= texts.count(None) <= 4


async def test_heartbeats_relay_errors_and_the_end():
    async def failing():
        yield [TextDelta("a")]
        raise RuntimeError("boom")

    beats = Heartbeats(failing(), 10)
    assert (await anext(beats))[0].text == "a"
    with pytest.raises(RuntimeError):
        await anext(beats)
    with pytest.raises(StopAsyncIteration):
        await anext(beats)
    await beats.aclose()

    async def short():
        yield [TextDelta("a")]

    items = [b async for b in Heartbeats(short(), 10)]
    assert [[e.text for e in b] for b in items] == [["a"]]
