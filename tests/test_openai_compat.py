"""The OpenAI-compatible backend (vLLM & co.) end to end: openai SDK -> inferbridge -> fake."""

from __future__ import annotations

import http.client
import json
import socket
import time

import httpx
import openai
import pytest

from tests.fakes.openai_compat import FakeOpenAI

MESSAGES = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
def upstream():
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def proxy(serve, upstream):
    return serve(
        {
            "models": [
                {
                    "name": "mistral",
                    "backend": "vllm",
                    "url": upstream.url + "/v1",
                    "upstream_model": "upstream-model",
                    "api_key": "sk-upstream",
                    "timeout": 5,
                }
            ]
        }
    )


def test_chat_non_stream_rewrites_model_and_relays_usage(proxy, upstream):
    r = proxy.openai().chat.completions.create(model="mistral", messages=MESSAGES)
    assert r.choices[0].message.content == "Hello from upstream"
    assert r.model == "mistral"
    assert r.usage.prompt_tokens == 7 and r.usage.completion_tokens == 3
    sent = upstream.requests[-1]
    assert sent.json["model"] == "upstream-model"
    assert sent.json["stream"] is False
    assert "stream_options" not in sent.json
    assert sent.headers["Authorization"] == "Bearer sk-upstream"


def test_chat_stream_relays_chunks_and_asks_for_usage(proxy, upstream):
    stream = proxy.openai().chat.completions.create(
        model="mistral",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == "Hello from upstream"
    )
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 10
    assert {c.model for c in chunks} == {"mistral"}
    assert len({c.id for c in chunks}) == 1
    assert upstream.requests[-1].json["stream_options"] == {"include_usage": True}


def test_stream_without_usage_request_has_no_usage_chunk(proxy, upstream):
    chunks = list(
        proxy.openai().chat.completions.create(model="mistral", messages=MESSAGES, stream=True)
    )
    assert all(c.choices for c in chunks)
    assert "stream_options" not in upstream.requests[-1].json


def test_extras_and_openai_fields_are_relayed(proxy, upstream):
    proxy.openai().chat.completions.create(
        model="mistral",
        messages=MESSAGES,
        temperature=0.2,
        seed=3,
        stop="END",
        max_completion_tokens=20,
        logit_bias={"42": 5},
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1},
    )
    body = upstream.requests[-1].json
    assert body["temperature"] == 0.2 and body["seed"] == 3 and body["stop"] == "END"
    assert body["max_completion_tokens"] == 20 and body["logit_bias"] == {"42": 5}
    assert body["top_k"] == 5 and body["min_p"] == 0.1 and body["repetition_penalty"] == 1.1


def test_entry_params_are_defaults_the_client_overrides(serve, upstream):
    srv = serve(
        {
            "models": [
                {
                    "name": "m",
                    "backend": "vllm",
                    "url": upstream.url + "/v1",
                    "upstream_model": "upstream-model",
                    "params": {"max_tokens": 512, "temperature": 0.1},
                }
            ]
        }
    )
    srv.openai().chat.completions.create(model="m", messages=MESSAGES, temperature=0.9)
    body = upstream.requests[-1].json
    assert body["max_tokens"] == 512 and body["temperature"] == 0.9


def test_legacy_completions_stream_and_not(proxy, upstream):
    client = proxy.openai()
    r = client.completions.create(model="mistral", prompt="Once")
    assert r.choices[0].text == "Hello from upstream" and r.object == "text_completion"
    chunks = list(client.completions.create(model="mistral", prompt=["Once"], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "Hello from upstream"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert upstream.requests[-1].path == "/v1/completions"


def test_streamed_tool_calls_keep_index_id_and_fragments(proxy, upstream):
    upstream.reply = []
    upstream.finish_reason = "tool_calls"
    upstream.tool_calls = [
        {"id": "call_a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"id": "call_b", "name": "get_time", "arguments": '{"tz": "CET"}'},
    ]
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {}}},
    ]
    client = proxy.openai()
    chunks = list(
        client.chat.completions.create(model="mistral", messages=MESSAGES, tools=tools, stream=True)
    )
    calls: dict[int, dict] = {}
    for c in chunks:
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            slot = calls.setdefault(tc.index, {"id": None, "name": "", "args": ""})
            slot["id"] = tc.id or slot["id"]
            slot["name"] += tc.function.name or ""
            slot["args"] += tc.function.arguments or ""
    assert calls == {
        0: {"id": "call_a", "name": "get_weather", "args": '{"city": "Paris"}'},
        1: {"id": "call_b", "name": "get_time", "args": '{"tz": "CET"}'},
    }
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert upstream.requests[-1].json["tools"] == tools
    r = client.chat.completions.create(model="mistral", messages=MESSAGES, tools=tools)
    assert [t.function.arguments for t in r.choices[0].message.tool_calls] == [
        '{"city": "Paris"}',
        '{"tz": "CET"}',
    ]
    assert r.choices[0].finish_reason == "tool_calls"


def test_stream_split_at_awkward_byte_boundaries(proxy, upstream):
    upstream.behaviour.split_every = 7
    upstream.reply = ["naïve ", "café ", "😀", " done"]
    text = "".join(
        c.choices[0].delta.content or ""
        for c in proxy.openai().chat.completions.create(
            model="mistral", messages=MESSAGES, stream=True
        )
        if c.choices
    )
    assert text == "naïve café 😀 done"


def test_upstream_4xx_is_relayed_with_status_and_message(proxy, upstream):
    upstream.behaviour.status = 400
    upstream.behaviour.error_body = {
        "error": {
            "message": "This model's maximum context length is 4096 tokens.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    }
    with pytest.raises(openai.BadRequestError) as info:
        proxy.openai().chat.completions.create(model="mistral", messages=MESSAGES)
    assert "maximum context length" in info.value.message
    body = info.value.body
    assert set(body) == {"message", "type", "param", "code"}


def test_upstream_flat_vllm_error_is_read(proxy, upstream):
    upstream.behaviour.status = 400
    upstream.behaviour.error_body = {
        "object": "error",
        "message": "bad stop",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
    with pytest.raises(openai.BadRequestError, match="bad stop"):
        proxy.openai().chat.completions.create(model="mistral", messages=MESSAGES, stream=True)


def test_upstream_500_is_502_naming_the_backend(proxy, upstream):
    upstream.behaviour.status = 500
    with pytest.raises(openai.InternalServerError) as info:
        proxy.openai().chat.completions.create(model="mistral", messages=MESSAGES)
    assert info.value.status_code == 502
    assert "vllm" in info.value.message and "mistral" in info.value.message


def test_upstream_down_is_502(serve):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = serve(
        {"models": [{"name": "m", "backend": "vllm", "url": f"http://127.0.0.1:{port}/v1"}]}
    )
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as info:
            srv.openai().chat.completions.create(model="m", messages=MESSAGES, stream=stream)
        assert info.value.status_code == 502
        assert "unreachable" in info.value.message


def test_upstream_timeout_is_504(serve, upstream):
    upstream.behaviour.delay_first_byte = 2
    srv = serve(
        {
            "models": [
                {
                    "name": "m",
                    "backend": "vllm",
                    "url": upstream.url + "/v1",
                    "upstream_model": "upstream-model",
                    "timeout": 0.3,
                }
            ]
        }
    )
    with pytest.raises(openai.InternalServerError) as info:
        srv.openai().chat.completions.create(model="m", messages=MESSAGES)
    assert info.value.status_code == 504


def test_error_event_mid_stream_reaches_the_sdk(proxy, upstream):
    upstream.error_event_after = 1
    stream = proxy.openai().chat.completions.create(model="mistral", messages=MESSAGES, stream=True)
    got = []
    with pytest.raises(openai.APIError, match="engine died"):
        for chunk in stream:
            got.append(chunk)
    assert got  # the first token had already arrived


def test_connection_dropped_mid_stream_is_not_silent(proxy, upstream):
    upstream.behaviour.drop_after_chunks = 2
    upstream.reply = ["a", "b", "c", "d", "e"]
    stream = proxy.openai().chat.completions.create(model="mistral", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError):
        list(stream)


def test_stream_is_not_buffered(proxy, upstream):
    upstream.behaviour.delay_between_chunks = 0.3
    upstream.reply = ["one", " two", " three"]
    start = time.monotonic()
    stream = proxy.openai().chat.completions.create(model="mistral", messages=MESSAGES, stream=True)
    arrivals = [
        time.monotonic() - start for c in stream if c.choices and c.choices[0].delta.content
    ]
    # Upstream writes "one" at ~0.3 s and "three" at ~0.9 s: buffered relaying would
    # deliver all three together at the end.
    assert arrivals[0] < 0.8
    assert arrivals[-1] - arrivals[0] > 0.4


def test_client_disconnect_closes_the_upstream_stream(proxy, upstream):
    upstream.behaviour.delay_between_chunks = 0.2
    upstream.reply = [f" t{i}" for i in range(50)]
    with (
        httpx.Client(timeout=10) as http,
        http.stream(
            "POST",
            proxy.base_url + "/chat/completions",
            json={"model": "mistral", "messages": MESSAGES, "stream": True},
        ) as resp,
    ):
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 3
    while upstream.open_streams and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.open_streams == 0
    assert upstream.closed_streams == 1


async def test_health_check_lists_models(upstream):
    from inferbridge.backends.openai_compat import OpenAICompatBackend, OpenAICompatSettings
    from inferbridge.errors import UpstreamError

    ok = OpenAICompatBackend(
        OpenAICompatSettings(name="m", backend="vllm", url=upstream.url + "/v1")
    )
    down = OpenAICompatBackend(
        OpenAICompatSettings(name="m", backend="vllm", url=upstream.url + "/nothing")
    )
    for backend in (ok, down):
        await backend.start()
    try:
        await ok.health()
        assert upstream.requests[-1].path == "/v1/models"
        with pytest.raises(UpstreamError):
            await down.health()
    finally:
        for backend in (ok, down):
            await backend.close()


def test_a_slow_client_gets_a_large_stream_intact(proxy, upstream):
    """The upstream outruns the client: the proxy stops reading the upstream while the
    client's buffers are full and resumes once they drain (push delivery's flow control).
    The stream is larger than what the kernel buffers between proxy and client can hold."""
    upstream.reply = [f"<{i:05d}>" + "x" * 1000 for i in range(8000)]  # ~8 MB of chunks
    body = json.dumps({"model": "mistral", "messages": MESSAGES, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    conn.sock = socket.socket()
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    conn.sock.settimeout(30)
    conn.sock.connect(("127.0.0.1", proxy.port))
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        time.sleep(1.0)  # not reading: the proxy's buffer toward the client fills up
        data = resp.read()
    finally:
        conn.close()
    got = []
    for line in data.decode().splitlines():
        if line.startswith("data: {"):
            choices = json.loads(line[6:])["choices"]
            if choices and choices[0]["delta"].get("content"):
                got.append(choices[0]["delta"]["content"])
    assert data.endswith(b"data: [DONE]\n\n")
    assert "".join(got) == "".join(upstream.reply)


def test_chunk_parser_keeps_events_before_a_bad_event_and_stops_there():
    from inferbridge.backends.openai_compat import ChunkParser, OpenAICompatBackend
    from inferbridge.backends.openai_compat import OpenAICompatSettings as Settings

    backend = OpenAICompatBackend(Settings(name="m", backend="vllm", url="http://127.0.0.1:9/v1"))
    good = b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
    bad_events = [(b"data: [1, 2]\n\n", "not a JSON object"), (b"data: {oops\n\n", "invalid")]
    for bad, message in bad_events:
        parser = ChunkParser(backend, chat=True)
        events = parser.feed(good + bad + good)
        assert [e.text for e in events] == ["hi"]  # type: ignore[union-attr]
        assert parser.error is not None and message in parser.error.message
        assert parser.feed(good) == []  # nothing after the error
