"""The `ollama` backend: request/response translation, the fake checked with the official
`ollama` client, and the official openai SDK through inferbridge to the fake."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest

from inferbridge.api.protocol import build_request
from inferbridge.backends import registry
from inferbridge.backends.ollama import OllamaBackend, ResponseReader
from inferbridge.config import ConfigError, load_config
from inferbridge.errors import InvalidRequest, UnsupportedParameter, UpstreamError
from inferbridge.events import Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage
from tests.fakes.ollama import FakeOllama, tokens_of
from tests.server import InferbridgeServer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "strict": True,
    },
}
USER = [{"role": "user", "content": "one two three"}]
PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5E"
    "rkJggg=="
)


# -- helpers ------------------------------------------------------------------------------
def backend(**entry: Any) -> OllamaBackend:
    cfg = load_config(data={"models": [{"name": "m", "backend": "ollama", **entry}]})
    b = registry.create(cfg.models[0])
    assert isinstance(b, OllamaBackend)
    return b


def build(b: OllamaBackend, kind: str = "chat", **body: Any) -> tuple[str, dict[str, Any]]:
    body.setdefault("model", "m")
    if kind == "chat":
        body.setdefault("messages", USER)
    else:
        body.setdefault("prompt", "Once upon")
    request = build_request(kind, body)  # type: ignore[arg-type]
    b.prepare(request)
    return b.build(request)


# -- request translation ------------------------------------------------------------------
def test_defaults_send_only_model_messages_and_stream():
    b = backend()
    assert b.config.url == "http://127.0.0.1:11434"
    path, body = build(b)
    assert path == "/api/chat"
    assert body == {"model": "m", "messages": USER, "stream": False}


def test_stream_is_always_explicit():
    assert build(backend(), stream=True)[1]["stream"] is True
    assert build(backend(), "completion", stream=False)[1]["stream"] is False


def test_completion_uses_generate_raw_with_the_prompt_as_given():
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    path, body = build(backend(upstream_model="qwen3:8b"), "completion", prompt=prompt)
    assert path == "/api/generate"
    assert body == {"model": "qwen3:8b", "prompt": prompt, "raw": True, "stream": False}


def test_openai_params_and_extras_go_into_options():
    _, body = build(
        backend(),
        max_tokens=7,
        temperature=0.2,
        top_p=0.5,
        seed=42,
        stop="END",
        presence_penalty=0.1,
        frequency_penalty=0.3,
        top_k=20,
        min_p=0.05,
        repetition_penalty=1.1,
    )
    assert body["options"] == {
        "num_predict": 7,
        "temperature": 0.2,
        "top_p": 0.5,
        "seed": 42,
        "stop": ["END"],
        "presence_penalty": 0.1,
        "frequency_penalty": 0.3,
        "top_k": 20,
        "min_p": 0.05,
        "repeat_penalty": 1.1,
    }


def test_repeat_penalty_wins_over_repetition_penalty():
    _, body = build(backend(), repeat_penalty=1.3, repetition_penalty=1.1)
    assert body["options"] == {"repeat_penalty": 1.3}


def test_num_ctx_per_entry_and_per_request():
    b = backend(num_ctx=8192, options={"num_ctx": 2048, "num_gpu": 1})
    assert build(b)[1]["options"] == {"num_ctx": 8192, "num_gpu": 1}
    assert build(b, num_ctx=1024)[1]["options"] == {"num_ctx": 1024, "num_gpu": 1}
    assert build(backend(options={"num_ctx": 2048}))[1]["options"] == {"num_ctx": 2048}
    b2 = backend(options={"num_thread": 2})
    _, body = build(b2, options={"num_thread": 8, "num_batch": 64}, num_ctx=4096)
    assert body["options"] == {"num_thread": 8, "num_batch": 64, "num_ctx": 4096}


def test_entry_params_defaults_are_mapped_too():
    _, body = build(backend(params={"temperature": 0.0, "top_k": 1}))
    assert body["options"] == {"temperature": 0.0, "top_k": 1}


def test_keep_alive_per_entry_and_per_request():
    assert build(backend(keep_alive="10m"))[1]["keep_alive"] == "10m"
    assert build(backend(keep_alive="300"))[1]["keep_alive"] == 300  # "300" fails upstream
    assert build(backend(keep_alive="10m"), keep_alive=0)[1]["keep_alive"] == 0
    assert build(backend(), keep_alive=-1)[1]["keep_alive"] == -1
    with pytest.raises(InvalidRequest) as exc:
        build(backend(), keep_alive="soon")
    assert exc.value.param == "keep_alive"
    with pytest.raises(ConfigError, match="keep_alive"):
        backend(keep_alive="5 minutes")


def test_bad_extra_types_are_400_naming_the_field():
    for field, value in (("top_k", "5"), ("num_ctx", 1.5), ("min_p", True)):
        with pytest.raises(InvalidRequest) as exc:
            build(backend(), **{field: value})
        assert exc.value.param == field


def test_response_format_becomes_format():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert build(backend(), response_format={"type": "json_object"})[1]["format"] == "json"
    _, body = build(
        backend(),
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": schema, "strict": True},
        },
    )
    assert body["format"] == schema
    assert "format" not in build(backend(), response_format={"type": "text"})[1]


def test_think_extra_passes_through():
    assert build(backend(), think="high")[1]["think"] == "high"
    assert build(backend(), think=False)[1]["think"] is False


def test_content_parts_and_data_uri_images():
    messages = [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is "},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
                {"type": "text", "text": "this?"},
            ],
        },
    ]
    _, body = build(backend(), messages=messages)
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is this?", "images": [PNG_B64]},
    ]


def test_image_urls_are_unsupported_naming_the_field():
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hi"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            ],
        }
    ]
    with pytest.raises(InvalidRequest) as exc:
        build(backend(), messages=messages)
    assert exc.value.param == "messages[0].content[1].image_url.url"
    assert exc.value.code == "unsupported_parameter"


def test_tools_and_tool_history_are_translated():
    messages = [
        {"role": "user", "content": "Weather in Tokyo and Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sun"}]},
    ]
    _, body = build(backend(), messages=messages, tools=[WEATHER_TOOL], tool_choice="auto")
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": WEATHER_TOOL["function"]["parameters"],
            },
        }
    ]
    assert body["messages"][1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Tokyo"}},
            },
            {
                "id": "call_2",
                "function": {"index": 1, "name": "get_weather", "arguments": {"city": "Paris"}},
            },
        ],
    }
    assert body["messages"][2] == {
        "role": "tool",
        "content": "rain",
        "tool_call_id": "call_2",
        "tool_name": "get_weather",
    }
    assert body["messages"][3]["content"] == "sun"
    assert body["messages"][3]["tool_name"] == "get_weather"


def test_tool_arguments_must_be_a_json_object():
    messages = [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}
            ],
        }
    ]
    with pytest.raises(InvalidRequest) as exc:
        build(backend(), messages=messages)
    assert exc.value.param == "messages[0].tool_calls[0].function.arguments"


def test_tool_choice_policy():
    assert "tools" not in build(backend(), tools=[WEATHER_TOOL], tool_choice="none")[1]
    with pytest.raises(UnsupportedParameter) as exc:
        build(backend(), tools=[WEATHER_TOOL], tool_choice="required")
    assert exc.value.param == "tool_choice"
    _, body = build(
        backend(drop_unsupported_params=True),
        tools=[WEATHER_TOOL],
        tool_choice="required",
        logit_bias={"1": 2},
    )
    assert "tools" in body and "logit_bias" not in json.dumps(body)


@pytest.mark.parametrize("field,value", [("logit_bias", {"50": 1}), ("logprobs", True)])
def test_unsupported_params_are_400(field, value):
    with pytest.raises(UnsupportedParameter) as exc:
        build(backend(), **{field: value})
    assert exc.value.param == field


# -- response translation -----------------------------------------------------------------
def _line(chat: bool = True, **fields: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"model": "m", "created_at": "2025-01-01T00:00:00.1Z"}
    if chat:
        obj["message"] = {
            "role": "assistant",
            "content": fields.pop("content", ""),
            **fields.pop("message", {}),
        }
    else:
        obj["response"] = fields.pop("content", "")
    return {**obj, "done": False, **fields}


def test_reader_text_thinking_and_final_line():
    r = ResponseReader("ollama", chat=True)
    assert r.events(_line(content="")) == []
    (think,) = r.events(_line(message={"thinking": "hmm"}))
    assert isinstance(think, ReasoningDelta) and think.text == "hmm"
    (text,) = r.events(_line(content="Hi"))
    assert isinstance(text, TextDelta) and text.text == "Hi"
    done = r.events(
        _line(content="!", done=True, done_reason="stop", prompt_eval_count=26, eval_count=282)
    )
    assert [type(e) for e in done] == [TextDelta, Finish, Usage]
    assert done[1].reason == "stop"
    assert (done[2].prompt_tokens, done[2].completion_tokens) == (26, 282)
    assert r.done


@pytest.mark.parametrize(
    "reason,expected",
    [
        ("stop", "stop"),
        ("length", "length"),
        ("", "stop"),
        (None, "stop"),
        ("load", "stop"),
        ("unload", "stop"),
    ],
)
def test_reader_done_reasons(reason, expected):
    line = _line(chat=False, done=True, eval_count=1)
    if reason is not None:
        line["done_reason"] = reason
    events = ResponseReader("ollama", chat=False).events(line)
    assert [e.reason for e in events if isinstance(e, Finish)] == [expected]


def test_reader_usage_absent_or_partial():
    r = ResponseReader("ollama", chat=True)
    assert not any(isinstance(e, Usage) for e in r.events(_line(done=True)))
    (usage,) = [
        e
        for e in ResponseReader("o", True).events(_line(done=True, eval_count=3))
        if isinstance(e, Usage)
    ]
    assert (usage.prompt_tokens, usage.completion_tokens) == (0, 3)


def test_reader_tool_calls_get_ids_indices_and_json_arguments():
    r = ResponseReader("ollama", chat=True)
    first = r.events(
        _line(
            message={
                "tool_calls": [
                    {
                        "function": {
                            "index": 0,
                            "name": "get_weather",
                            "arguments": {"city": "東京"},
                        }
                    },
                    {
                        "id": "call_up",
                        "function": {"index": 1, "name": "get_time", "arguments": {}},
                    },
                ]
            }
        )
    )
    second = r.events(
        _line(
            message={
                "tool_calls": [
                    {"function": {"index": 0, "name": "noop", "arguments": {"a": [1, {"b": None}]}}}
                ]
            }
        )
    )
    calls = [e for e in first + second if isinstance(e, ToolCallDelta)]
    assert [c.call_index for c in calls] == [0, 1, 2]
    assert calls[0].id.startswith("call_") and calls[1].id == "call_up"
    assert calls[0].id != calls[2].id
    assert [c.name for c in calls] == ["get_weather", "get_time", "noop"]
    assert [json.loads(c.arguments) for c in calls] == [
        {"city": "東京"},
        {},
        {"a": [1, {"b": None}]},
    ]


def test_reader_error_line_raises():
    with pytest.raises(UpstreamError, match="out of memory") as exc:
        ResponseReader("backend 'ollama'", chat=True).events({"error": "out of memory"})
    assert "backend 'ollama'" in exc.value.message


# -- the fake, checked with the official ollama client --------------------------------------
@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllama() as server:
        yield server


@pytest.fixture(autouse=True)
def _reset(request: pytest.FixtureRequest) -> None:
    if "fake" in request.fixturenames:
        request.getfixturevalue("fake").reset()


def test_official_client_chat_and_stream(fake):
    client = ollama.Client(host=fake.url)
    r = client.chat(model="llama3.2", messages=[{"role": "user", "content": "héllo <b> & you"}])
    assert r.message.content == "héllo <b> & you"
    assert r.done and r.done_reason == "stop" and r.eval_count == 4
    chunks = list(client.chat(model="llama3.2", messages=USER, stream=True))
    assert "".join(c.message.content for c in chunks) == "one two three"
    assert [c.done for c in chunks] == [False, False, False, True]
    assert chunks[-1].prompt_eval_count and chunks[-1].total_duration


def test_official_client_generate_list_and_errors(fake):
    client = ollama.Client(host=fake.url)
    r = client.generate(model="llama3.2", prompt="a b", raw=True)
    assert r.response == "a b" and r.done_reason == "stop"
    assert fake.requests[-1].json["raw"] is True
    parts = list(client.generate(model="llama3.2", prompt="x y z", stream=True))
    assert "".join(p.response for p in parts) == "x y z" and parts[-1].done
    assert [m.model for m in client.list().models] == ["llama3.2:latest", "qwen3:8b"]
    with pytest.raises(ollama.ResponseError) as exc:
        client.chat(model="nope", messages=USER)
    assert exc.value.status_code == 404
    assert exc.value.error == 'model "nope" not found, try pulling it first'
    fake.behaviour.extra = {"error_after": 1, "error_message": "boom"}
    with pytest.raises(ollama.ResponseError, match="boom"):
        list(client.chat(model="llama3.2", messages=USER, stream=True))


def test_official_client_tool_calls(fake):
    fake.behaviour.extra = {
        "reply": "",
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Tokyo"}, "id": "call_x"}],
    }
    r = ollama.Client(host=fake.url).chat(model="llama3.2", messages=USER, tools=[WEATHER_TOOL])
    (call,) = r.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Tokyo"}


def test_fake_writes_go_style_json(fake):
    fake.behaviour.extra = {"reply": "a<b>"}
    body = {"model": "llama3.2", "messages": USER, "stream": False}
    resp = httpx.post(fake.url + "/api/chat", json=body)
    assert resp.headers["content-type"] == "application/json; charset=utf-8"
    raw = resp.content
    assert b'"content":"a\\u003cb\\u003e"' in raw
    assert raw.index(b'"done_reason"') < raw.index(b'"done":true')
    resp = httpx.post(fake.url + "/api/generate", json={**body, "prompt": "x", "stream": True})
    assert resp.headers["content-type"] == "application/x-ndjson"
    last = resp.content.splitlines()[-1]
    assert last.index(b'"done":true') < last.index(b'"done_reason":"stop"')


# -- the openai SDK through inferbridge -----------------------------------------------------
def _models(fake: FakeOllama) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": "llama",
                "backend": "ollama",
                "url": fake.url,
                "upstream_model": "llama3.2",
                "num_ctx": 8192,
                "keep_alive": "10m",
            },
            {"name": "missing", "backend": "ollama", "url": fake.url, "upstream_model": "nope"},
        ]
    }


@pytest.fixture(scope="module")
def server(fake) -> Iterator[InferbridgeServer]:
    with InferbridgeServer(_models(fake)) as srv:
        yield srv


@pytest.fixture
def fresh(fake, serve) -> InferbridgeServer:
    """A server of its own, for tests that make the deployment fail (the router remembers
    failures and cools a deployment down; that must not leak into other tests)."""
    return serve(_models(fake))


def _sent(fake: FakeOllama) -> dict[str, Any]:
    return fake.requests[-1].json


def test_sdk_chat(server, fake):
    r = server.openai().chat.completions.create(model="llama", messages=USER)
    assert r.choices[0].message.content == "one two three"
    assert r.choices[0].finish_reason == "stop"
    sent = _sent(fake)
    assert fake.requests[-1].path == "/api/chat"
    assert sent == {
        "model": "llama3.2",
        "messages": USER,
        "stream": False,
        "options": {"num_ctx": 8192},
        "keep_alive": "10m",
    }
    prompt_tokens = len(tokens_of(json.dumps(USER)))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, 3)


def test_sdk_chat_stream_with_usage(server, fake):
    chunks = list(
        server.openai().chat.completions.create(
            model="llama", messages=USER, stream=True, stream_options={"include_usage": True}
        )
    )
    assert _sent(fake)["stream"] is True
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1
    assert chunks[-1].usage.completion_tokens == 3


def test_sdk_completions_raw(server, fake):
    client = server.openai()
    prompt = "<s>[INST] one two [/INST]"
    r = client.completions.create(model="llama", prompt=prompt, max_tokens=50)
    assert r.choices[0].text == prompt and r.choices[0].finish_reason == "stop"
    sent = _sent(fake)
    assert fake.requests[-1].path == "/api/generate"
    assert sent["raw"] is True and sent["prompt"] == prompt and sent["stream"] is False
    assert sent["options"] == {"num_ctx": 8192, "num_predict": 50}
    assert r.usage.completion_tokens == 4
    chunks = list(client.completions.create(model="llama", prompt="x y", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "x y"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sdk_stop(server, fake):
    r = server.openai().chat.completions.create(model="llama", messages=USER, stop=["thr"])
    assert r.choices[0].message.content == "one two "
    assert r.choices[0].finish_reason == "stop"
    assert _sent(fake)["options"]["stop"] == ["thr"]


@pytest.mark.parametrize("stream", [False, True])
def test_sdk_finish_length(server, fake, stream):
    client = server.openai()
    if stream:
        chunks = list(
            client.completions.create(model="llama", prompt="a b c d", max_tokens=2, stream=True)
        )
        text = "".join(c.choices[0].text for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        r = client.chat.completions.create(
            model="llama",
            messages=[{"role": "user", "content": "a b c d"}],
            max_completion_tokens=2,
        )
        text, reason = r.choices[0].message.content, r.choices[0].finish_reason
    assert (text, reason) == ("a b", "length")
    assert _sent(fake)["options"]["num_predict"] == 2


def test_sdk_params_and_extras_reach_ollama(server, fake):
    server.openai().chat.completions.create(
        model="llama",
        messages=USER,
        temperature=0.3,
        top_p=0.9,
        seed=7,
        response_format={"type": "json_object"},
        extra_body={"top_k": 5, "repetition_penalty": 1.2, "num_ctx": 2048, "keep_alive": 0},
    )
    sent = _sent(fake)
    assert sent["options"] == {
        "num_ctx": 2048,
        "temperature": 0.3,
        "top_p": 0.9,
        "seed": 7,
        "top_k": 5,
        "repeat_penalty": 1.2,
    }
    assert sent["keep_alive"] == 0 and sent["format"] == "json"


TWO_CALLS = [
    {"name": "get_weather", "arguments": {"city": "Tokyo", "units": ["c"]}},
    {"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call_ollama7"},
]


def test_sdk_tool_calls(server, fake):
    fake.behaviour.extra = {"reply": "", "tool_calls": TWO_CALLS}
    r = server.openai().chat.completions.create(model="llama", messages=USER, tools=[WEATHER_TOOL])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_weather"]
    assert [json.loads(c.function.arguments) for c in calls] == [
        {"city": "Tokyo", "units": ["c"]},
        {"city": "Paris"},
    ]
    assert calls[0].id.startswith("call_") and calls[1].id == "call_ollama7"
    assert _sent(fake)["tools"][0]["function"]["name"] == "get_weather"


def test_sdk_tool_calls_stream(server, fake):
    fake.behaviour.extra = {"reply": "", "tool_calls": TWO_CALLS}
    chunks = list(
        server.openai().chat.completions.create(
            model="llama", messages=USER, tools=[WEATHER_TOOL], stream=True
        )
    )
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert [d.index for d in deltas] == [0, 1]
    assert deltas[0].id.startswith("call_") and deltas[1].id == "call_ollama7"
    assert json.loads(deltas[0].function.arguments) == {"city": "Tokyo", "units": ["c"]}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_sdk_tool_result_round_trip(server, fake):
    messages = [
        *USER,
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_9",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_9", "content": "snow"},
    ]
    fake.behaviour.extra = {"reply": "It snows."}
    r = server.openai().chat.completions.create(
        model="llama", messages=messages, tools=[WEATHER_TOOL]
    )
    assert r.choices[0].message.content == "It snows."
    sent = _sent(fake)["messages"]
    assert sent[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert sent[2] == {
        "role": "tool",
        "content": "snow",
        "tool_call_id": "call_9",
        "tool_name": "get_weather",
    }


def test_sdk_image(server, fake):
    content = [
        {"type": "text", "text": "describe"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
    ]
    server.openai().chat.completions.create(
        model="llama", messages=[{"role": "user", "content": content}]
    )
    assert _sent(fake)["messages"] == [{"role": "user", "content": "describe", "images": [PNG_B64]}]
    content[1]["image_url"]["url"] = "http://example.com/x.png"
    with pytest.raises(openai.BadRequestError) as exc:
        server.openai().chat.completions.create(
            model="llama", messages=[{"role": "user", "content": content}]
        )
    assert exc.value.body["param"] == "messages[0].content[1].image_url.url"


def test_sdk_thinking_becomes_reasoning_content(server, fake):
    fake.behaviour.extra = {"thinking": "Let me see.", "reply": "Yes."}
    r = server.openai().chat.completions.create(model="llama", messages=USER)
    assert r.choices[0].message.content == "Yes."
    assert r.choices[0].message.model_extra["reasoning_content"] == "Let me see."
    chunks = list(
        server.openai().chat.completions.create(model="llama", messages=USER, stream=True)
    )
    reasoning = [c.choices[0].delta.model_extra.get("reasoning_content") for c in chunks]
    assert "Let me see." in reasoning


def test_sdk_usage_estimated_when_ollama_gives_no_counts(server, fake):
    fake.behaviour.extra = {"no_counts": True}
    raw = server.openai().chat.completions.with_raw_response.create(model="llama", messages=USER)
    assert raw.headers.get("x-inferbridge-usage-estimated") == "true"
    assert raw.parse().usage.completion_tokens > 0


def test_sdk_n_is_fanned_out(server, fake):
    r = server.openai().chat.completions.create(model="llama", messages=USER, n=2)
    assert [c.message.content for c in r.choices] == ["one two three"] * 2
    assert len(fake.requests) == 2


def test_sdk_unknown_upstream_model_is_the_deployments_failure(fresh):
    """A model the Ollama server has not pulled is the entry's fault, not the client's."""
    with pytest.raises(openai.InternalServerError) as exc:
        fresh.openai().chat.completions.create(model="missing", messages=USER)
    assert 'model "nope" not found' in exc.value.message
    assert exc.value.status_code == 502 and exc.value.code == "deployment_misconfigured"


@pytest.mark.parametrize(
    "status,error",
    [
        (400, openai.BadRequestError),
        (503, openai.InternalServerError),
        (500, openai.InternalServerError),
    ],
)
def test_sdk_upstream_http_errors(fresh, fake, status, error):
    fake.behaviour.status = status
    fake.behaviour.error_body = {"error": f"ollama says {status}"}
    with pytest.raises(error) as exc:
        fresh.openai().chat.completions.create(model="llama", messages=USER)
    assert exc.value.status_code == {400: 400, 503: 503, 500: 502}[status]
    assert f"ollama says {status}" in exc.value.message


def test_sdk_mid_stream_error_line(fresh, fake):
    fake.behaviour.extra = {"reply": "a b c d", "error_after": 2, "error_message": "CUDA OOM"}
    fake.behaviour.delay_between_chunks = 0.05
    stream = fresh.openai().chat.completions.create(model="llama", messages=USER, stream=True)
    got = []
    with pytest.raises(openai.APIError, match="CUDA OOM"):
        for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
    assert "".join(got) == "a b"


def test_sdk_error_line_before_any_text_is_http_error(fresh, fake):
    fake.behaviour.extra = {"error_after": 0, "error_message": "model crashed"}
    with pytest.raises(openai.InternalServerError, match="model crashed"):
        list(fresh.openai().chat.completions.create(model="llama", messages=USER, stream=True))


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_sdk_dropped_connection_raises(fresh, fake, kind):
    fake.behaviour.extra = {"reply": "a b c d e f"}
    fake.behaviour.drop_after_chunks = 2
    fake.behaviour.delay_between_chunks = 0.02
    client = fresh.openai()
    with pytest.raises(openai.APIError, match=r"closed the connection|before the answer"):
        if kind == "chat":
            list(client.chat.completions.create(model="llama", messages=USER, stream=True))
        else:
            list(client.completions.create(model="llama", prompt="p", stream=True))


def test_sdk_stream_ending_without_done_line_raises(fresh, fake):
    fake.behaviour.extra = {"no_done": True}
    stream = fresh.openai().chat.completions.create(model="llama", messages=USER, stream=True)
    with pytest.raises(openai.APIError, match="before the answer was complete"):
        list(stream)


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_sdk_stream_split_at_awkward_bytes(server, fake, kind):
    reply = "héllo wörld 日本語 <tag> & done"
    fake.behaviour.extra = {"reply": reply}
    fake.behaviour.split_every = 3
    client = server.openai()
    if kind == "chat":
        chunks = list(
            client.chat.completions.create(
                model="llama", messages=USER, stream=True, stream_options={"include_usage": True}
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].usage.completion_tokens == len(tokens_of(reply))
    else:
        chunks = list(client.completions.create(model="llama", prompt="p", stream=True))
        text = "".join(c.choices[0].text for c in chunks)
    assert text == reply


async def test_adapter_yields_text_received_before_an_error_line(fake):
    fake.behaviour.extra = {"reply": "a b c", "error_after": 2, "error_message": "boom"}
    b = backend(url=fake.url, upstream_model="llama3.2")
    await b.start()
    got: list[str] = []
    try:
        request = build_request("chat", {"model": "m", "messages": USER, "stream": True})
        with pytest.raises(UpstreamError, match="boom"):
            async for batch in b.stream(b.prepare(request)):
                got.extend(e.text for e in batch if isinstance(e, TextDelta))
    finally:
        await b.close()
    assert "".join(got) == "a b"


# -- readiness ------------------------------------------------------------------------------
async def test_list_models_and_health(fake):
    b = backend(url=fake.url)
    await b.start()
    try:
        assert await b.list_models() == ["llama3.2:latest", "qwen3:8b"]
        await b.health()
        assert fake.requests[-1].path == "/api/tags"
        fake.behaviour.status = 500
        with pytest.raises(UpstreamError):
            await b.health()
    finally:
        await b.close()


async def test_health_raises_when_ollama_is_down():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = backend(url=f"http://127.0.0.1:{port}", connect_timeout=2)
    await b.start()
    try:
        with pytest.raises(UpstreamError, match="unreachable"):
            await b.health()
    finally:
        await b.close()
