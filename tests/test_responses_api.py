"""`/v1/responses` (OpenAI's Responses API) through a real server, with the official SDK:
text, streams, tools, `previous_response_id`, the response store, errors, and the native
TGI path. Every object and event is also validated strictly against the SDK's types (the
SDK itself builds them without validation)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from inferbridge.api.responses_api.render import ResponsesRenderer, response_shell
from inferbridge.api.responses_api.store import MemoryResponseStore, StoredResponse
from inferbridge.errors import UpstreamError
from inferbridge.events import Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage
from inferbridge.request import InferenceRequest
from tests.fakes.openai_compat import FakeOpenAI
from tests.fakes.tgi import FakeTGI
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
    },
    "strict": True,
}


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def tgi() -> Iterator[FakeTGI]:
    with FakeTGI() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _reset(request: pytest.FixtureRequest) -> None:
    for name in ("upstream", "tgi"):
        if name in request.fixturenames:
            request.getfixturevalue(name).reset()
    if "upstream" in request.fixturenames:
        fake = request.getfixturevalue("upstream")
        fake.reply, fake.finish_reason = ["Hello", " from", " upstream"], "stop"
        fake.tool_calls = fake.error_event_after = None


@pytest.fixture(scope="module")
def srv(upstream: FakeOpenAI, tgi: FakeTGI) -> Iterator[InferbridgeServer]:
    models = [
        {"name": "echo", "backend": "echo"},
        {"name": "slow-echo", "backend": "echo", "delay": 0.05},
        {
            "name": "vllm",
            "backend": "vllm",
            "url": upstream.url + "/v1",
            "upstream_model": "upstream-model",
            "timeout": 5,
        },
        {"name": "tgi", "backend": "tgi", "url": tgi.url, "prompt_template": "chatml"},
    ]
    config = {"auth": {"api_keys": [KEY, "sk-other"]}, "models": models}
    with InferbridgeServer(config, api_key=KEY) as server:
        yield server


def post(srv: InferbridgeServer, body: Any, key: str = KEY, path: str = "/v1/responses"):
    return httpx.post(
        srv.url + path, json=body, headers={"authorization": f"Bearer {key}"}, timeout=20
    )


def raw_events(srv: InferbridgeServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The SSE events of a streamed response, each checked against the SDK's types and
    against its `event:` line."""
    resp = post(srv, {**body, "stream": True})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in resp.text.split("\n\n"):
        if not block:
            continue
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        event = json.loads(data[len("data: ") :])
        assert event["type"] == name[len("event: ") :]
        EVENT.validate_python(event)
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert "[DONE]" not in resp.text
    return events


def upstream_messages(fake: FakeOpenAI) -> list[dict[str, Any]]:
    return fake.requests[-1].json["messages"]


# -- text ------------------------------------------------------------------------------------------
def test_create_text(srv):
    r = srv.openai().responses.create(model="echo", input="Hello there")
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.status == "completed" and r.output_text == "Hello there"
    assert r.model == "echo"
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert item.id.startswith("msg_")
    assert item.content[0].type == "output_text" and item.content[0].annotations == []
    assert r.usage.output_tokens == 2 and r.usage.total_tokens == r.usage.input_tokens + 2
    assert r.store is True and r.tool_choice == "auto" and r.tools == []


def test_the_raw_object_is_a_valid_response(srv):
    body = {
        "model": "echo",
        "input": "Hello there",
        "instructions": "Be brief.",
        "temperature": 0.5,
        "top_p": 0.9,
        "metadata": {"ticket": "42"},
        "user": "u1",
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "text": {"format": {"type": "json_object"}},
    }
    resp = post(srv, body)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    r = Response.model_validate(data)  # strict: every required field, every type
    assert r.instructions == "Be brief." and r.temperature == 0.5 and r.top_p == 0.9
    assert r.metadata == {"ticket": "42"} and r.user == "u1"
    assert data["tools"] == [WEATHER]
    assert data["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert data["text"]["format"] == {"type": "json_object"}
    assert data["completed_at"] >= data["created_at"]
    assert data["usage"]["input_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 0}
    assert resp.headers["x-inferbridge-model"] == "echo"


def test_instructions_are_a_system_message(srv, upstream):
    r = srv.openai().responses.create(
        model="vllm", input="Say hello", instructions="Answer in French.", max_output_tokens=50
    )
    assert r.output_text == "Hello from upstream"
    assert (r.usage.input_tokens, r.usage.output_tokens) == (7, 3)
    sent = upstream.requests[-1].json
    assert sent["messages"] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Say hello"},
    ]
    assert sent["model"] == "upstream-model" and sent["max_tokens"] == 50
    for field in ("input", "instructions", "store", "max_output_tokens", "metadata", "text"):
        assert field not in sent


def test_max_output_tokens_is_incomplete(srv):
    r = srv.openai().responses.create(model="echo", input="one two three four", max_output_tokens=2)
    assert r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == "one two" and r.output[0].status == "incomplete"
    assert r.completed_at is None


def test_message_items_and_content_parts(srv, upstream):
    srv.openai().responses.create(
        model="vllm",
        input=[
            {"role": "developer", "content": "Be terse."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]},
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
                ],
            },
        ],
    )
    assert upstream_messages(upstream) == [
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
    ]


def test_text_format_and_sampling_reach_the_upstream(srv, upstream):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    srv.openai().responses.create(
        model="vllm",
        input="JSON please",
        temperature=0.2,
        top_p=0.5,
        text={"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}},
        extra_body={"top_k": 40, "seed": 7},
    )
    sent = upstream.requests[-1].json
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "thing", "schema": schema, "strict": True},
    }
    assert (sent["temperature"], sent["top_p"], sent["top_k"], sent["seed"]) == (0.2, 0.5, 40, 7)


def test_served_at_the_root_too(srv):
    resp = post(srv, {"model": "echo", "input": "hi"}, path="/responses")
    assert resp.status_code == 200 and resp.json()["output"][0]["content"][0]["text"] == "hi"


# -- streams ---------------------------------------------------------------------------------------
def test_stream_with_the_sdk_helper(srv):
    client = srv.openai()
    with client.responses.stream(model="echo", input="one two three") as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "one two three" == final.output_text
    assert final.status == "completed" and final.usage.output_tokens == 3
    assert events[0].response.id == final.id and events[0].response.status == "in_progress"


def test_stream_with_create(srv):
    events = list(srv.openai().responses.create(model="echo", input="a b c", stream=True))
    assert events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text == "a b c"


def test_raw_stream_events_are_valid_sdk_events(srv):
    events = raw_events(srv, {"model": "echo", "input": "a b c"})
    done = events[-1]
    assert done["type"] == "response.completed"
    Response.model_validate(done["response"])
    item = events[2]["item"]
    assert item["status"] == "in_progress" and item["content"] == []
    assert {e["item_id"] for e in events if "item_id" in e} == {item["id"]}


def test_stream_incomplete(srv):
    events = raw_events(srv, {"model": "echo", "input": "a b c d", "max_output_tokens": 2})
    assert events[-1]["type"] == "response.incomplete"
    response = events[-1]["response"]
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["status"] == "incomplete"
    assert response["output"][0]["content"][0]["text"] == "a b"


def test_stream_is_not_buffered(srv):
    words = " ".join(f"w{i}" for i in range(12))  # 12 tokens, 0.05 s apart: 0.6 s in all
    started = time.perf_counter()
    first = None
    body = {"model": "slow-echo", "input": words, "stream": True}
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", srv.base_url + "/responses", json=body, headers=headers, timeout=20
    ) as resp:
        for line in resp.iter_lines():
            if first is None and line == "event: response.output_text.delta":
                first = time.perf_counter() - started
    total = time.perf_counter() - started
    assert first is not None and total >= 0.55
    assert first < total / 2, (first, total)


def test_stream_failure_after_the_start_is_response_failed(srv, upstream):
    upstream.error_event_after = 1
    events = list(srv.openai().responses.create(model="vllm", input="hi", stream=True))
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed"
    assert "engine died" in events[-1].response.error.message
    assert any(e.type == "response.output_text.delta" for e in events)


def test_client_disconnect_closes_the_upstream_stream_and_stores_nothing(srv, upstream):
    upstream.behaviour.delay_between_chunks = 0.2
    upstream.reply = [f" t{i}" for i in range(50)]
    body = {"model": "vllm", "input": "hi", "stream": True}
    headers = {"authorization": f"Bearer {KEY}"}
    with (
        httpx.Client(timeout=10) as http,
        http.stream("POST", srv.base_url + "/responses", json=body, headers=headers) as resp,
    ):
        lines = resp.iter_lines()
        created = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        assert created["type"] == "response.created"
    deadline = time.monotonic() + 3
    while upstream.open_streams and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.open_streams == 0 and upstream.closed_streams == 1
    assert post_get(srv, created["response"]["id"]).status_code == 404


def test_error_before_the_start_is_an_http_error(srv, upstream):
    upstream.behaviour.status = 500
    with pytest.raises(openai.InternalServerError):
        srv.openai().responses.create(model="vllm", input="hi", stream=True)


# -- tools -----------------------------------------------------------------------------------------
CALL = {"id": "call_abc", "name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_function_call_round_trip(srv, upstream):
    upstream.reply, upstream.finish_reason, upstream.tool_calls = [], "tool_calls", [CALL]
    client = srv.openai()
    question = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.responses.create(
        model="vllm", input=question, tools=[WEATHER], tool_choice="required"
    )
    sent = upstream.requests[-1].json
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": WEATHER["parameters"],
                "strict": True,
            },
        }
    ]
    assert sent["tool_choice"] == "required"
    assert r.status == "completed"
    (call,) = r.output
    assert call.type == "function_call" and call.id.startswith("fc_")
    assert (call.call_id, call.name) == ("call_abc", "get_weather")
    assert call.arguments == CALL["arguments"]
    assert call.status == "completed"

    upstream.reply, upstream.finish_reason, upstream.tool_calls = ["It is sunny."], "stop", None
    output = {"type": "function_call_output", "call_id": "call_abc", "output": "sunny, 21C"}
    r2 = client.responses.create(
        model="vllm", input=[*question, *[o.to_dict() for o in r.output], output], tools=[WEATHER]
    )
    assert r2.output_text == "It is sunny."
    assert upstream_messages(upstream) == [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": CALL["arguments"]},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": "sunny, 21C"},
    ]


def test_streamed_function_calls(srv, upstream):
    upstream.reply, upstream.finish_reason = ["Let me check."], "tool_calls"
    upstream.tool_calls = [CALL, {"id": "call_def", "name": "get_time", "arguments": "{}"}]
    events = raw_events(srv, {"model": "vllm", "input": "Weather?", "tools": [WEATHER]})
    kinds = [e["type"] for e in events]
    assert kinds.count("response.output_item.added") == 3
    assert kinds.count("response.function_call_arguments.done") == 2
    args = "".join(
        e["delta"]
        for e in events
        if e["type"] == "response.function_call_arguments.delta" and e["output_index"] == 1
    )
    assert args == CALL["arguments"]
    final = events[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["message", "function_call", "function_call"]
    assert final["output"][1]["arguments"] == CALL["arguments"]
    assert final["output"][2]["call_id"] == "call_def"
    # items are sent one after the other: each is done before the next is added
    opened = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    closed = [e["output_index"] for e in events if e["type"] == "response.output_item.done"]
    assert opened == closed == [0, 1, 2]
    assert kinds.index("response.output_item.done") < kinds.index("response.output_item.added", 3)

    # and the SDK's stream helper accumulates them
    with srv.openai().responses.stream(model="vllm", input="Weather?", tools=[WEATHER]) as s:
        final = s.get_final_response()
    assert [i.type for i in final.output] == ["message", "function_call", "function_call"]
    assert final.output[1].arguments == CALL["arguments"]


def test_allowed_tools_filter_the_tools(srv, upstream):
    other = {**WEATHER, "name": "get_time"}
    choice = {
        "type": "allowed_tools",
        "mode": "auto",
        "tools": [{"type": "function", "name": "get_time"}],
    }
    post(srv, {"model": "vllm", "input": "hi", "tools": [WEATHER, other], "tool_choice": choice})
    sent = upstream.requests[-1].json
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_time"]
    assert sent["tool_choice"] == "auto"


# -- previous_response_id and the store ------------------------------------------------------------
def test_previous_response_id_continues_the_conversation(srv, upstream):
    client = srv.openai()
    r1 = client.responses.create(model="vllm", input="Say hello", instructions="Be nice.")
    r2 = client.responses.create(model="vllm", input="Again", previous_response_id=r1.id)
    assert r2.previous_response_id == r1.id
    assert upstream_messages(upstream) == [
        {"role": "user", "content": "Say hello"},
        {"role": "assistant", "content": "Hello from upstream"},
        {"role": "user", "content": "Again"},
    ]  # the instructions are not carried over
    client.responses.create(model="vllm", input="Once more", previous_response_id=r2.id)
    assert [m["content"] for m in upstream_messages(upstream)] == [
        "Say hello",
        "Hello from upstream",
        "Again",
        "Hello from upstream",
        "Once more",
    ]


def test_previous_response_id_with_a_function_call_output(srv, upstream):
    upstream.reply, upstream.finish_reason, upstream.tool_calls = [], "tool_calls", [CALL]
    client = srv.openai()
    r1 = client.responses.create(model="vllm", input="Weather in Paris?", tools=[WEATHER])
    upstream.reply, upstream.finish_reason, upstream.tool_calls = ["Sunny."], "stop", None
    output = {"type": "function_call_output", "call_id": "call_abc", "output": "sunny"}
    r2 = client.responses.create(
        model="vllm", input=[output], previous_response_id=r1.id, tools=[WEATHER]
    )
    assert r2.output_text == "Sunny."
    assert [m["role"] for m in upstream_messages(upstream)] == ["user", "assistant", "tool"]


def test_previous_response_id_from_a_stream_with_echo(srv):
    client = srv.openai()
    with client.responses.stream(model="echo", input="first turn") as s:
        r1 = s.get_final_response()
    # the stored response is there as soon as the stream ended
    assert client.responses.retrieve(r1.id).output_text == "first turn"
    r2 = client.responses.create(model="echo", input="second turn", previous_response_id=r1.id)
    # echo counts the words of every message it was given: 2 + 2 + 2
    assert r2.usage.input_tokens == 6 and r2.output_text == "second turn"


def test_retrieve_and_delete(srv):
    client = srv.openai()
    r = client.responses.create(model="echo", input="keep me", metadata={"k": "v"})
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == "keep me" and got.metadata == {"k": "v"}
    assert Response.model_validate(post_get(srv, r.id).json()).id == r.id
    resp = httpx.delete(
        f"{srv.base_url}/responses/{r.id}", headers={"authorization": f"Bearer {KEY}"}
    )
    assert resp.status_code == 200
    assert resp.json() == {"id": r.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)


def post_get(srv: InferbridgeServer, response_id: str, key: str = KEY) -> httpx.Response:
    return httpx.get(
        f"{srv.base_url}/responses/{response_id}", headers={"authorization": f"Bearer {key}"}
    )


def test_unknown_ids_are_404(srv):
    client = srv.openai()
    with pytest.raises(openai.NotFoundError) as exc:
        client.responses.retrieve("resp_nope")
    assert exc.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as exc:
        client.responses.create(model="echo", input="hi", previous_response_id="resp_nope")
    assert exc.value.param == "previous_response_id"
    assert "resp_nope" in exc.value.message


def test_store_false_is_not_stored(srv):
    client = srv.openai()
    r = client.responses.create(model="echo", input="forget me", store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_stored_responses_belong_to_their_key(srv):
    r = srv.openai().responses.create(model="echo", input="mine")
    assert post_get(srv, r.id).status_code == 200
    assert post_get(srv, r.id, key="sk-other").status_code == 404
    resp = post(srv, {"model": "echo", "input": "x", "previous_response_id": r.id}, key="sk-other")
    assert resp.status_code == 404


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "hi"}, "model"),
        ({"model": "echo", "input": 5}, "input"),
        ({"model": "echo", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        (
            {"model": "echo", "input": [{"role": "user", "content": [{"type": "input_text"}]}]},
            "input[0].content[0].text",
        ),
        (
            {"model": "echo", "input": [{"type": "function_call_output", "output": "x"}]},
            "input[0].call_id",
        ),
        ({"model": "echo", "input": [{"type": "web_search_call", "id": "x"}]}, "input[0].type"),
        ({"model": "echo", "input": "x", "temperature": "hot"}, "temperature"),
        ({"model": "echo", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "echo", "input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"model": "echo", "input": "x", "tool_choice": "sometimes"}, "tool_choice"),
        ({"model": "echo", "input": "x", "tool_choice": "required"}, "tool_choice"),
        (
            {
                "model": "echo",
                "input": "x",
                "tools": [{"type": "function", "name": "a", "parameters": {}}],
                "tool_choice": {"type": "function", "name": "b"},
            },
            "tool_choice",
        ),
        (  # an output without its call (OpenAI names `input`, the message the call id)
            {
                "model": "echo",
                "input": [{"type": "function_call_output", "call_id": "c", "output": ""}],
            },
            "input",
        ),
        (
            {"model": "echo", "input": "x", "text": {"format": {"type": "json_schema"}}},
            "text.format.name",
        ),
        ({"model": "echo", "input": "x", "messages": []}, "messages"),
        ({"model": "echo", "input": "x", "max_tokens": 5}, "max_tokens"),
        ({"model": "echo", "input": "x", "seed": "one"}, "seed"),
        ({"model": "echo", "input": "x", "background": True}, "background"),
        ({"model": "echo"}, "input"),
        (
            {
                "model": "echo",
                "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}],
            },
            "input[0].content[0].image_url",
        ),
    ],
)
def test_bad_requests_are_400_naming_the_field(srv, body, param):
    resp = post(srv, body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    assert param.split(".")[0].split("[")[0] in error["message"]


def test_bad_request_with_the_sdk(srv):
    with pytest.raises(openai.BadRequestError) as exc:
        srv.openai().responses.create(
            model="echo", input=[{"type": "function_call_output", "output": "x"}]
        )
    assert exc.value.param == "input[0].call_id"


def test_unknown_model_is_404(srv):
    with pytest.raises(openai.NotFoundError) as exc:
        srv.openai().responses.create(model="nope", input="hi")
    assert exc.value.param == "model"


def test_openapi_documents_the_routes(srv):
    schema = httpx.get(srv.url + "/openapi.json").json()
    assert {"post"} <= set(schema["paths"]["/v1/responses"])
    assert {"get", "delete"} <= set(schema["paths"]["/v1/responses/{response_id}"])
    assert "/responses" not in schema["paths"]
    assert "ResponsesRequest" in schema["components"]["schemas"]


# -- a native backend: TGI with a chat template ----------------------------------------------------
def test_tgi(srv, tgi):
    client = srv.openai()
    r = client.responses.create(model="tgi", input="Say hello", instructions="Be brief.")
    assert r.output_text == "Hello world!" and r.status == "completed"
    body = tgi.generations[-1]
    assert body["inputs"] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hello<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert r.usage.input_tokens == len(body["inputs"].split()) + 1

    with client.responses.stream(model="tgi", input="Say hello", max_output_tokens=2) as s:
        events = list(s)
    assert tgi.requests[-1].path == "/generate_stream"
    assert tgi.generations[-1]["parameters"]["max_new_tokens"] == 2
    assert events[-1].type == "response.incomplete"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text == "Hello world"


def test_tgi_logprobs(srv, tgi):
    r = srv.openai().responses.create(model="tgi", input="Say hello", top_logprobs=2)
    assert tgi.generations[-1]["parameters"]["top_n_tokens"] == 2
    logprobs = r.output[0].content[0].logprobs
    assert [t.token for t in logprobs] == ["Hello", " world", "!"]
    assert logprobs[0].logprob == -0.25 and logprobs[0].bytes == list(b"Hello")
    assert [a.token for a in logprobs[1].top_logprobs] == [" world", "alt1"]

    events = raw_events(srv, {"model": "tgi", "input": "Say hello", "top_logprobs": 2})
    streamed = [
        t["token"]
        for e in events
        if e["type"] == "response.output_text.delta"
        for t in e["logprobs"]
    ]
    assert streamed == ["Hello", " world", "!"]
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert [t["token"] for t in done["logprobs"]] == streamed


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"reasoning": {"effort": "low"}}, "reasoning.effort"),
        ({"tools": [WEATHER]}, "tools"),
    ],
)
def test_what_a_backend_refuses_is_named_as_in_the_request(srv, body, param):
    resp = post(srv, {"model": "tgi", "input": "hi", **body})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and f"'{param}'" in error["message"]


def test_metrics_count_responses_requests(srv):
    srv.openai().responses.create(model="echo", input="count me")
    metrics = httpx.get(srv.url + "/metrics", headers={"authorization": f"Bearer {KEY}"}).text
    lines = [line for line in metrics.splitlines() if line.startswith("inferbridge_requests_total")]
    assert any('model="echo"' in line and 'status="200"' in line for line in lines), lines


# -- the store itself ------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(rid: str, owner: str = "", size: int = 10) -> StoredResponse:
    return StoredResponse(rid, owner, {"id": rid, "output": ["x" * size]}, [])


async def test_store_ttl():
    clock = Clock()
    store = MemoryResponseStore(ttl=10, clock=clock)
    await store.put(record("a"))
    clock.now += 9
    assert (await store.get("a", "")).response["id"] == "a"
    clock.now += 2
    assert await store.get("a", "") is None
    assert len(store) == 0 and store.bytes == 0


async def test_store_is_bounded_in_count_lru_first():
    store = MemoryResponseStore(max_items=2)
    await store.put(record("a"))
    await store.put(record("b"))
    await store.get("a", "")  # a is now the most recently used
    await store.put(record("c"))
    assert await store.get("b", "") is None
    assert await store.get("a", "") is not None and await store.get("c", "") is not None


async def test_store_is_bounded_in_bytes():
    store = MemoryResponseStore(max_bytes=200)
    await store.put(record("a", size=80))
    await store.put(record("b", size=80))
    assert await store.get("a", "") is None and await store.get("b", "") is not None
    assert store.bytes <= 200
    await store.put(record("big", size=500))  # larger than the whole store: not kept
    assert await store.get("big", "") is None and await store.get("b", "") is not None


async def test_store_owners_and_delete():
    store = MemoryResponseStore()
    await store.put(record("a", owner="k1"))
    assert await store.get("a", "k2") is None
    assert not await store.delete("a", "k2")
    assert await store.delete("a", "k1")
    assert not await store.delete("a", "k1")
    assert store.bytes == 0


async def test_store_can_be_off():
    store = MemoryResponseStore(max_items=0)
    await store.put(record("a"))
    assert await store.get("a", "") is None


# -- the renderer on its own --------------------------------------------------------------------
def render_stream(*batches: list[Any], fail: bool = False) -> list[dict[str, Any]]:
    request = InferenceRequest("chat", "m", {}, messages=[{"role": "user", "content": "hi"}])
    request.stream = True
    shell = response_shell({"model": "m"}, "resp_x", 0)
    render = ResponsesRenderer(request, 1, False, shell)
    first = render.encode(batches[0])
    data = render.opening() + first + b"".join(render.encode(b) for b in batches[1:])
    data += render.failure(UpstreamError("boom")) if fail else render.closing()
    events = []
    for block in data.decode().split("\n\n")[:-1]:
        event = json.loads(block.split("\ndata: ", 1)[1])
        EVENT.validate_python(event)
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert render.final == events[-1]["response"]
    return events


def test_reasoning_then_text_then_a_call():
    events = render_stream(
        [ReasoningDelta("Let me"), ReasoningDelta(" think.")],
        [TextDelta("Checking.")],
        [ToolCallDelta(0, id="call_1", name="f", arguments='{"a"')],
        [ToolCallDelta(0, arguments=": 1}"), Finish("tool_calls"), Usage(5, 7)],
    )
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed"
    assert [i["type"] for i in final["output"]] == ["reasoning", "message", "function_call"]
    assert final["output"][0]["content"] == [{"type": "reasoning_text", "text": "Let me think."}]
    assert final["output"][2]["arguments"] == '{"a": 1}'
    assert final["usage"]["output_tokens"] == 7
    kinds = [e["type"] for e in events]
    assert kinds.count("response.reasoning_text.delta") == 2
    assert "response.reasoning_text.done" in kinds
    Response.model_validate(final)


def test_content_filter_is_incomplete_and_no_output_is_an_empty_message():
    events = render_stream([Finish("content_filter")])
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.incomplete"
    assert final["incomplete_details"] == {"reason": "content_filter"}
    assert final["output"][0]["content"][0]["text"] == ""


def test_a_stream_without_a_finish_is_completed():
    events = render_stream([TextDelta("a")], [TextDelta("b")])
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "ab"


def test_a_failure_is_response_failed_with_what_was_made():
    events = render_stream([TextDelta("partial")], fail=True)
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.failed" and final["status"] == "failed"
    assert final["error"] == {"code": "server_error", "message": "boom"}
    assert final["output"][0]["status"] == "incomplete"
    assert final["output"][0]["content"][0]["text"] == "partial"
