"""`/v1/responses` passed through to an upstream's own Responses API (`responses_api: native`):
the fake OpenAI server's `/v1/responses` checked against the official SDK first, then the SDK
-> inferbridge -> that fake, whole and streamed, with function calls, the store and
`previous_response_id`, errors, retries and fallbacks; and the event parser on its own."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from inferbridge.backends.azure import AzureBackend, AzureSettings
from inferbridge.backends.responses_events import ResponsesStreamParser, response_object_events
from inferbridge.decoders import ServerSentEvent
from inferbridge.errors import UpstreamError
from inferbridge.events import Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage
from inferbridge.request import InferenceRequest
from tests.fakes.openai_compat import FakeOpenAI
from tests.server import InferbridgeServer

EVENT = TypeAdapter(ResponseStreamEvent)
KEY = "sk-test"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
CALL = {"id": "call_abc", "name": "get_weather", "arguments": '{"city": "Paris"}'}


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def broken() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _reset(upstream: FakeOpenAI, broken: FakeOpenAI) -> None:
    for fake in (upstream, broken):
        fake.reset()
        fake.reply, fake.finish_reason = ["Hello", " from", " upstream"], "stop"
        fake.tool_calls = fake.error_event_after = fake.reasoning = None
        fake.send_usage = True
    broken.behaviour.status = 503


@pytest.fixture(scope="module")
def srv(upstream: FakeOpenAI, broken: FakeOpenAI) -> Iterator[InferbridgeServer]:
    native = {
        "backend": "openai",
        "url": upstream.url + "/v1",
        "upstream_model": "upstream-model",
        "api_key": "sk-upstream",
        "responses_api": "native",
        "timeout": 5,
    }
    models = [
        {"name": "native", **native},
        {
            "name": "native-defaults",
            **native,
            "params": {
                "max_tokens": 20,
                "temperature": 0.1,
                "reasoning_effort": "low",
                "seed": 3,
                "top_k": 5,
            },
        },
        {"name": "flaky", **native, "url": broken.url + "/v1"},
        {k: v for k, v in native.items() if k != "responses_api"} | {"name": "translated"},
    ]
    config = {
        "auth": {"api_keys": [KEY]},
        "router": {"retry_backoff": 0.01, "models": {"flaky": {"retries": 1}}},
        "models": models,
    }
    config["router"]["models"]["flaky"]["fallbacks"] = ["translated"]
    with InferbridgeServer(config, api_key=KEY) as server:
        yield server


def sent(fake: FakeOpenAI) -> dict[str, Any]:
    rec = fake.requests[-1]
    assert (rec.method, rec.path) == ("POST", "/v1/responses")
    return rec.json


def events_of(text: str) -> list[dict[str, Any]]:
    """Typed SSE events, each checked against its `event:` line and the SDK's types."""
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        name, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        EVENT.validate_python(event)
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def raw_stream(srv: InferbridgeServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    resp = httpx.post(
        srv.base_url + "/responses",
        json={**body, "stream": True},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=20,
    )
    assert resp.status_code == 200, resp.text
    return events_of(resp.text)


# -- the fake, checked against the official SDK ----------------------------------------------------
def test_the_fake_speaks_openai_responses(upstream):
    upstream.reasoning = "Thinking it over."
    upstream.tool_calls = [CALL]
    client = openai.OpenAI(base_url=upstream.url + "/v1", api_key="sk-x", max_retries=0)
    r = client.responses.create(model="upstream-model", input="hi", tools=[WEATHER])
    Response.model_validate(r.model_dump())
    assert [i.type for i in r.output] == ["reasoning", "message", "function_call"]
    assert r.output_text == "Hello from upstream" and r.usage.total_tokens == 10

    with client.responses.stream(model="upstream-model", input="hi", tools=[WEATHER]) as s:
        kinds = [e.type for e in s]
        final = s.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert final.output[2].arguments == CALL["arguments"]
    resp = httpx.post(
        upstream.url + "/v1/responses",
        json={"model": "upstream-model", "input": "hi", "stream": True},
    )
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.text.startswith('event: response.created\ndata: {"type":"response.created"')
    events_of(resp.text)


def test_the_fake_stores_nothing(upstream):
    client = openai.OpenAI(base_url=upstream.url + "/v1", api_key="sk-x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="upstream-model", input="hi", previous_response_id="resp_1")
    assert info.value.param == "previous_response_id"


# -- text ------------------------------------------------------------------------------------------
def test_create_goes_to_the_upstreams_responses_api(srv, upstream):
    items = [
        {"role": "developer", "content": "Be terse."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
    ]
    r = srv.openai().responses.create(
        model="native",
        input=items,
        instructions="Answer in French.",
        max_output_tokens=50,
        metadata={"ticket": "42"},
        text={"format": {"type": "text"}, "verbosity": "low"},
    )
    assert r.output_text == "Hello from upstream" and r.status == "completed"
    assert r.model == "native" and r.id.startswith("resp_")
    assert (r.usage.input_tokens, r.usage.output_tokens) == (7, 3)  # the upstream's counts
    body = sent(upstream)
    assert body["input"] == items  # the client's items, as they came
    assert body["model"] == "upstream-model" and body["store"] is False
    assert body["instructions"] == "Answer in French." and body["max_output_tokens"] == 50
    assert body["metadata"] == {"ticket": "42"} and body["text"]["verbosity"] == "low"
    assert body["stream"] is False and "previous_response_id" not in body
    assert upstream.requests[-1].headers["Authorization"] == "Bearer sk-upstream"
    assert len(upstream.requests) == 1  # no chat completion besides


def test_a_string_input_stays_a_string(srv, upstream):
    srv.openai().responses.create(model="native", input="Hello there")
    assert sent(upstream)["input"] == "Hello there"


def test_stream(srv, upstream):
    client = srv.openai()
    with client.responses.stream(model="native", input="Say hello") as stream:
        events = list(stream)
        final = stream.get_final_response()
    body = sent(upstream)
    assert body["stream"] is True and body["input"] == "Say hello"
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text == "Hello from upstream"
    assert final.usage.input_tokens == 7 and final.model == "native"


def test_stream_split_at_every_byte_boundary(srv, upstream):
    upstream.behaviour.split_every = 7
    events = raw_stream(srv, {"model": "native", "input": "hi"})
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "Hello from upstream"
    Response.model_validate(events[-1]["response"])


def test_reasoning_summaries_become_a_reasoning_item(srv, upstream):
    upstream.reasoning = "Let me think."
    r = srv.openai().responses.create(model="native", input="hi")
    assert [i.type for i in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "Let me think."
    events = raw_stream(srv, {"model": "native", "input": "hi"})
    deltas = [e["delta"] for e in events if e["type"] == "response.reasoning_text.delta"]
    assert "".join(deltas) == "Let me think."


def test_incomplete(srv, upstream):
    upstream.finish_reason = "length"
    r = srv.openai().responses.create(model="native", input="hi", max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    events = raw_stream(srv, {"model": "native", "input": "hi", "max_output_tokens": 3})
    assert events[-1]["type"] == "response.incomplete"


def test_logprobs_are_asked_for_and_relayed(srv, upstream):
    r = srv.openai().responses.create(model="native", input="hi", top_logprobs=2)
    assert sent(upstream)["include"] == ["message.output_text.logprobs"]
    logprobs = r.output[0].content[0].logprobs
    assert [t.token for t in logprobs] == ["Hello", " from", " upstream"]
    assert [a.token for a in logprobs[0].top_logprobs] == ["Hello", "alt"]
    events = raw_stream(srv, {"model": "native", "input": "hi", "top_logprobs": 1})
    streamed = [
        t["token"]
        for e in events
        if e["type"] == "response.output_text.delta"
        for t in e["logprobs"]
    ]
    assert streamed == ["Hello", " from", " upstream"]


def test_the_entrys_params_in_the_responses_apis_names(srv, upstream):
    srv.openai().responses.create(model="native-defaults", input="hi", temperature=0.7)
    body = sent(upstream)
    assert body["max_output_tokens"] == 20 and body["reasoning"] == {"effort": "low"}
    assert body["temperature"] == 0.7  # the client's value wins
    assert body["top_k"] == 5  # not an OpenAI parameter: as it is
    assert "seed" not in body and "max_tokens" not in body  # chat-only: left out


# -- function calls, the store, previous_response_id -----------------------------------------------
def test_function_call_round_trip_with_previous_response_id(srv, upstream):
    upstream.reply, upstream.tool_calls = [], [CALL]
    client = srv.openai()
    r1 = client.responses.create(
        model="native", input="Weather in Paris?", tools=[WEATHER], tool_choice="required"
    )
    body = sent(upstream)
    assert body["tools"] == [WEATHER] and body["tool_choice"] == "required"  # flat, as sent
    (call,) = r1.output
    assert call.type == "function_call" and call.id.startswith("fc_")
    assert (call.call_id, call.name, call.arguments) == (
        "call_abc",
        "get_weather",
        CALL["arguments"],
    )
    assert r1.status == "completed"

    upstream.reply, upstream.tool_calls = ["It is sunny."], None
    output = {"type": "function_call_output", "call_id": "call_abc", "output": "sunny, 21C"}
    r2 = client.responses.create(
        model="native", input=[output], previous_response_id=r1.id, tools=[WEATHER]
    )
    assert r2.output_text == "It is sunny." and r2.previous_response_id == r1.id
    body = sent(upstream)
    assert "previous_response_id" not in body and body["store"] is False
    # the stored conversation, spelled out: the first input, the call, then the new input
    assert body["input"] == [
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "Weather in Paris?"}],
        },
        call.model_dump(exclude_none=True),
        output,
    ]
    assert client.responses.retrieve(r2.id).output_text == "It is sunny."


def test_streamed_function_calls(srv, upstream):
    upstream.reply = ["Let me check."]
    upstream.tool_calls = [CALL, {"id": "call_def", "name": "get_time", "arguments": "{}"}]
    events = raw_stream(srv, {"model": "native", "input": "Weather?", "tools": [WEATHER]})
    final = events[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["message", "function_call", "function_call"]
    assert final["output"][1]["arguments"] == CALL["arguments"]
    assert final["output"][2]["call_id"] == "call_def"
    args = "".join(
        e["delta"]
        for e in events
        if e["type"] == "response.function_call_arguments.delta" and e["output_index"] == 1
    )
    assert args == CALL["arguments"]

    with srv.openai().responses.stream(model="native", input="Weather?", tools=[WEATHER]) as s:
        final = s.get_final_response()
    assert [i.type for i in final.output] == ["message", "function_call", "function_call"]
    assert sent(upstream)["tools"] == [WEATHER]


def test_reasoning_items_of_the_conversation_are_left_out(srv, upstream):
    upstream.reasoning = "Hmm."
    client = srv.openai()
    r1 = client.responses.create(model="native", input="first")
    assert r1.output[0].type == "reasoning"
    r2 = client.responses.create(model="native", input="second", previous_response_id=r1.id)
    assert r2.status == "completed"  # the fake refuses reasoning items it cannot look up
    assert [i.get("type") for i in sent(upstream)["input"]] == ["message", "message", "message"]


def test_store_false_and_retrieve(srv, upstream):
    client = srv.openai()
    r = client.responses.create(model="native", input="keep me")
    assert client.responses.retrieve(r.id).output_text == "Hello from upstream"
    forgotten = client.responses.create(model="native", input="forget me", store=False)
    assert forgotten.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(forgotten.id)
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


# -- errors, retries, fallbacks --------------------------------------------------------------------
def test_an_upstream_refusal_is_relayed(srv, upstream):
    with pytest.raises(openai.BadRequestError) as info:
        srv.openai().responses.create(model="native", input="hi", extra_body={"seed": 1})
    assert "Unknown parameter: 'seed'" in info.value.message  # OpenAI's own 400


def test_an_error_event_mid_stream_is_response_failed(srv, upstream):
    upstream.error_event_after = 1
    events = list(srv.openai().responses.create(model="native", input="hi", stream=True))
    assert events[-1].type == "response.failed"
    assert "engine died" in events[-1].response.error.message
    assert any(e.type == "response.output_text.delta" for e in events)


def test_a_stream_cut_short_is_response_failed(srv, upstream):
    upstream.behaviour.drop_after_chunks = 5
    events = list(srv.openai().responses.create(model="native", input="hi", stream=True))
    assert events[-1].type == "response.failed"


def test_retries_and_fallbacks_apply(srv, upstream, broken):
    r = srv.openai().responses.with_raw_response.create(model="flaky", input="hi")
    assert r.headers["x-inferbridge-model"] == "translated"
    assert r.parse().output_text == "Hello from upstream"
    # two attempts at the flaky model's /v1/responses, then the fallback's chat path
    assert [(q.method, q.path) for q in broken.requests] == [("POST", "/v1/responses")] * 2
    assert upstream.requests[-1].path == "/v1/chat/completions"
    assert upstream.requests[-1].json["messages"] == [{"role": "user", "content": "hi"}]


def test_chat_requests_keep_the_chat_endpoint(srv, upstream):
    r = srv.openai().chat.completions.create(
        model="native", messages=[{"role": "user", "content": "hi"}]
    )
    assert r.choices[0].message.content == "Hello from upstream"
    assert upstream.requests[-1].path == "/v1/chat/completions"


def test_without_the_setting_responses_are_translated(srv, upstream):
    r = srv.openai().responses.create(model="translated", input="hi")
    assert r.output_text == "Hello from upstream"
    assert upstream.requests[-1].path == "/v1/chat/completions"


# -- the parser on its own -------------------------------------------------------------------------
def parse(*events: dict[str, Any]) -> list[Any]:
    parser = ResponsesStreamParser("up", lambda data: None)
    out: list[Any] = []
    for event in events:
        batch: list[Any] = []
        ended = parser.take(ServerSentEvent(data=json.dumps(event).encode()), batch)
        out += [*batch, "end"] if ended else batch
    return out


def test_done_events_fill_in_what_no_delta_carried():
    item = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": ""}
    out = parse(
        {"type": "response.output_item.added", "output_index": 0, "item": item},
        {"type": "response.function_call_arguments.delta", "output_index": 0, "delta": '{"a"'},
        {
            "type": "response.function_call_arguments.done",
            "output_index": 0,
            "arguments": '{"a": 1}',
        },
        {
            "type": "response.output_item.done",
            "output_index": 0,
            "item": {**item, "arguments": '{"a": 1}'},
        },
        {"type": "response.output_text.done", "output_index": 1, "content_index": 0, "text": "ok"},
        {
            "type": "response.output_item.done",
            "output_index": 1,
            "item": {"type": "message", "content": [{"type": "output_text", "text": "ok"}]},
        },
        {"type": "response.completed", "response": {"status": "completed", "usage": None}},
    )
    assert [e if isinstance(e, str) else type(e).__name__ for e in out] == [
        "ToolCallDelta",
        "ToolCallDelta",
        "ToolCallDelta",
        "TextDelta",
        "Finish",
        "end",
    ]
    assert (out[0].id, out[0].name) == ("c1", "f")
    assert out[1].arguments + out[2].arguments == '{"a": 1}'
    assert out[3].text == "ok" and out[4].reason == "tool_calls"


def test_failed_and_error_events_raise():
    with pytest.raises(UpstreamError, match="overloaded"):
        parse({"type": "error", "code": "server_error", "message": "overloaded", "param": None})
    failed = {"status": "failed", "error": {"code": "rate_limit_exceeded", "message": "slow down"}}
    with pytest.raises(UpstreamError) as info:
        parse({"type": "response.failed", "response": failed})
    assert info.value.status == 429 and info.value.retryable


def test_a_whole_response_object():
    data = {
        "object": "response",
        "status": "incomplete",
        "incomplete_details": {"reason": "max_output_tokens"},
        "output": [
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "hm"}]},
            {
                "type": "message",
                "content": [
                    {
                        "type": "output_text",
                        "text": "a",
                        "logprobs": [{"token": "a", "logprob": -1}],
                    },
                    {"type": "refusal", "refusal": "no"},
                ],
            },
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        ],
        "usage": {
            "input_tokens": 4,
            "output_tokens": 2,
            "input_tokens_details": {"cached_tokens": 1},
            "output_tokens_details": {"reasoning_tokens": 1},
        },
    }
    out = response_object_events(data, "up")
    assert [type(e) for e in out] == [
        ReasoningDelta,
        TextDelta,
        TextDelta,
        ToolCallDelta,
        ToolCallDelta,
        Finish,
        Usage,
    ]
    assert out[1].logprobs == {"content": [{"token": "a", "logprob": -1}]}
    assert out[2].text == "no" and out[4].arguments == "{}"
    assert out[5].reason == "length"
    assert out[6].details == {
        "prompt_tokens_details": {"cached_tokens": 1},
        "completion_tokens_details": {"reasoning_tokens": 1},
    }
    with pytest.raises(UpstreamError, match="boom"):
        response_object_events({"status": "failed", "error": {"message": "boom"}}, "up")


def test_azure_paths():
    request = InferenceRequest("chat", "m", {}, responses_body={"model": "m", "input": "hi"})
    classic = AzureBackend(
        AzureSettings(
            name="m",
            backend="azure",
            url="https://r.openai.azure.com",
            deployment="dep",
            api_version="2025-04-01-preview",
            responses_api="native",
        )
    )
    assert classic.responses_endpoint() == (
        "https://r.openai.azure.com/openai/responses",
        {"api-version": "2025-04-01-preview"},
    )
    assert classic.responses_upstream_body(request)["model"] == "dep"
    v1 = AzureBackend(
        AzureSettings(name="m", backend="azure", url="https://r.openai.azure.com", api_version="v1")
    )
    assert v1.responses_endpoint() == ("/responses", None)
    assert v1.base_url() == "https://r.openai.azure.com/openai/v1"
