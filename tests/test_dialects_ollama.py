"""The Responses API (`/v1/responses`) and Anthropic's Messages API (`/v1/messages`) through a
native backend, Ollama's `/api/chat` (the fake speaks it byte for byte): text, streams, the
token limit, reasoning, and tool calls both ways, with the official `openai` and `anthropic`
SDKs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.fakes.ollama import FakeOllama
from tests.server import InferbridgeServer

KEY = "sk-test"
EVENT = TypeAdapter(ResponseStreamEvent)
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
ANTHROPIC_WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": WEATHER["parameters"],
}
CALL = {"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}
ROUND_TRIP = [  # what Ollama gets for the second turn: the call, then its result
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {
        "role": "tool",
        "content": "sunny, 21C",
        "tool_call_id": "call_1",
        "tool_name": "get_weather",
    },
]
OLLAMA_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": WEATHER["parameters"],
    },
}


@pytest.fixture(scope="module")
def ollama() -> Iterator[FakeOllama]:
    with FakeOllama() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _reset(ollama: FakeOllama) -> None:
    ollama.reset()


@pytest.fixture(scope="module")
def srv(ollama: FakeOllama) -> Iterator[InferbridgeServer]:
    entry = {"backend": "ollama", "url": ollama.url, "upstream_model": "llama3.2", "timeout": 5}
    config = {"auth": {"api_keys": [KEY]}, "models": [{"name": "llama", **entry}]}
    with InferbridgeServer(config, api_key=KEY) as server:
        yield server


def chat_body(ollama: FakeOllama) -> dict[str, Any]:
    rec = [r for r in ollama.requests if r.path == "/api/chat"][-1]
    return rec.json


def claude(srv: InferbridgeServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.url, api_key=KEY, max_retries=0, timeout=20)


def raw_events(srv: InferbridgeServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    resp = httpx.post(
        srv.base_url + "/responses",
        json={**body, "stream": True},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=20,
    )
    assert resp.status_code == 200, resp.text
    events = []
    for block in resp.text.split("\n\n"):
        if block:
            name, data = block.split("\n")
            event = json.loads(data.removeprefix("data: "))
            assert name == f"event: {event['type']}"
            EVENT.validate_python(event)
            events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


# -- /v1/responses ---------------------------------------------------------------------------------
def test_responses_create(srv, ollama):
    r = srv.openai().responses.create(
        model="llama", input="hello there world", instructions="Be brief.", temperature=0.2
    )
    assert r.output_text == "hello there world" and r.status == "completed"
    assert r.model == "llama"
    body = chat_body(ollama)
    assert body["model"] == "llama3.2" and body["stream"] is False
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there world"},
    ]
    assert body["options"] == {"temperature": 0.2}
    assert r.usage.output_tokens == 3  # Ollama's eval_count
    assert r.usage.input_tokens == len(json.dumps(body["messages"]).split())  # prompt_eval_count


def test_responses_stream(srv, ollama):
    client = srv.openai()
    with client.responses.stream(model="llama", input="one two three four") as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert chat_body(ollama)["stream"] is True
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == ["one", " two", " three", " four"]  # one event per Ollama line
    assert final.output_text == "one two three four" and final.usage.output_tokens == 4


def test_responses_token_limit_is_incomplete(srv, ollama):
    r = srv.openai().responses.create(model="llama", input="a b c d", max_output_tokens=2)
    assert chat_body(ollama)["options"]["num_predict"] == 2
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == "a b"
    events = raw_events(srv, {"model": "llama", "input": "a b c d", "max_output_tokens": 2})
    assert events[-1]["type"] == "response.incomplete"


def test_responses_thinking_is_a_reasoning_item(srv, ollama):
    ollama.behaviour.extra["thinking"] = "Let me think."
    r = srv.openai().responses.create(model="llama", input="hi there")
    assert [i.type for i in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "Let me think." and r.output_text == "hi there"


def test_responses_function_call_round_trip(srv, ollama):
    ollama.behaviour.extra.update(reply="", tool_calls=[CALL])
    client = srv.openai()
    r1 = client.responses.create(model="llama", input="Weather in Paris?", tools=[WEATHER])
    assert chat_body(ollama)["tools"] == [OLLAMA_TOOL]
    (call,) = r1.output
    assert call.type == "function_call" and call.call_id == "call_1"
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert r1.status == "completed"

    ollama.behaviour.extra = {"reply": "Sunny in Paris."}
    output = {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21C"}
    r2 = client.responses.create(
        model="llama", input=[output], previous_response_id=r1.id, tools=[WEATHER]
    )
    assert r2.output_text == "Sunny in Paris."
    assert chat_body(ollama)["messages"] == ROUND_TRIP


def test_responses_streamed_function_call(srv, ollama):
    ollama.behaviour.extra.update(reply="Checking.", tool_calls=[CALL])
    events = raw_events(srv, {"model": "llama", "input": "Weather?", "tools": [WEATHER]})
    final = events[-1]["response"]
    Response.model_validate(final)
    assert [i["type"] for i in final["output"]] == ["message", "function_call"]
    assert final["output"][0]["content"][0]["text"] == "Checking."
    assert json.loads(final["output"][1]["arguments"]) == {"city": "Paris"}
    kinds = [e["type"] for e in events]
    assert "response.function_call_arguments.done" in kinds

    with srv.openai().responses.stream(model="llama", input="Weather?", tools=[WEATHER]) as s:
        final = s.get_final_response()
    assert [i.type for i in final.output] == ["message", "function_call"]
    assert final.output[1].call_id == "call_1"


# -- /v1/messages ----------------------------------------------------------------------------------
USER = [{"role": "user", "content": "hello there world"}]


def test_messages_create_and_stream(srv, ollama):
    c = claude(srv)
    m = c.messages.create(model="llama", max_tokens=100, system="Be brief.", messages=USER)
    assert [(b.type, b.text) for b in m.content] == [("text", "hello there world")]
    assert m.stop_reason == "end_turn" and m.model == "llama"
    body = chat_body(ollama)
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there world"},
    ]
    assert body["options"]["num_predict"] == 100
    assert m.usage.output_tokens == 3

    with c.messages.stream(model="llama", max_tokens=100, system="Be brief.", messages=USER) as s:
        kinds = [event.type for event in s]
        final = s.get_final_message()
    assert chat_body(ollama)["stream"] is True
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert final.content[0].text == "hello there world" and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 3


def test_messages_max_tokens(srv, ollama):
    c = claude(srv)
    m = c.messages.create(model="llama", max_tokens=2, messages=USER)
    assert m.stop_reason == "max_tokens" and m.content[0].text == "hello there"
    with c.messages.stream(model="llama", max_tokens=2, messages=USER) as s:
        final = s.get_final_message()
    assert final.stop_reason == "max_tokens" and final.content[0].text == "hello there"


def test_messages_tool_use_round_trip(srv, ollama):
    ollama.behaviour.extra.update(reply="", tool_calls=[CALL])
    c = claude(srv)
    question = {"role": "user", "content": "Weather in Paris?"}
    m = c.messages.create(
        model="llama", max_tokens=100, messages=[question], tools=[ANTHROPIC_WEATHER]
    )
    assert chat_body(ollama)["tools"] == [OLLAMA_TOOL]
    assert m.stop_reason == "tool_use"
    (use,) = m.content
    assert use.type == "tool_use" and (use.id, use.name) == ("call_1", "get_weather")
    assert use.input == {"city": "Paris"}

    with c.messages.stream(
        model="llama", max_tokens=100, messages=[question], tools=[ANTHROPIC_WEATHER]
    ) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[0].input == {"city": "Paris"}

    ollama.behaviour.extra = {"reply": "Sunny."}
    result = {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny, 21C"}
    m2 = c.messages.create(
        model="llama",
        max_tokens=100,
        tools=[ANTHROPIC_WEATHER],
        messages=[
            question,
            {"role": "assistant", "content": [use.model_dump(exclude_none=True)]},
            {"role": "user", "content": [result]},
        ],
    )
    assert m2.content[0].text == "Sunny." and m2.stop_reason == "end_turn"
    assert chat_body(ollama)["messages"] == ROUND_TRIP
