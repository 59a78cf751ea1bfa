"""The replicate backend: the fake checked with the official replicate client, then the openai
SDK through inferbridge to the fake (SSE streaming, polling, input names, cancel, failures)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import replicate
from replicate.exceptions import ModelError, ReplicateError

from inferbridge.config import ConfigError, load_config
from tests.fakes.replicate import LLAMA2, LLAMA2_VERSION, LLAMA3, LLAMA3_VERSION, FakeReplicate
from tests.server import InferbridgeServer

USER = [{"role": "user", "content": "Say hello"}]
TRICKY = ["Héllo", " wörld", ",", "\n\n", "  indented", " 🎉", " end"]  # spaces, UTF-8, newlines


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeReplicate]:
    with FakeReplicate(token="r8_test") as server:
        yield server  # type: ignore[misc]


@pytest.fixture(autouse=True)
def _clean(fake: FakeReplicate) -> None:
    fake.reset()


def _config(fake: FakeReplicate) -> dict[str, Any]:
    base = {
        "backend": "replicate",
        "url": fake.url + "/v1",
        "api_key": "r8_test",
        "poll_interval": 0.01,
    }
    llama2_map = {
        "max_tokens": "max_new_tokens",
        "presence_penalty": None,
        "frequency_penalty": None,
        "min_tokens": "min_new_tokens",
    }
    models = [
        {**base, "name": "llama3", "model": LLAMA3, "prompt_template": "llama3",
         "input": {"prompt_template": "{prompt}"}},
        {**base, "name": LLAMA3},  # the name is the model, rendered server-side
        {**base, "name": "llama2", "version": f"{LLAMA2}:{LLAMA2_VERSION}",
         "prompt_template": "llama2", "input_map": llama2_map},
        {**base, "name": "llama3-messages", "model": LLAMA3, "messages_input": True},
        {**base, "name": "deployed", "deployment": "acme/prod-llm", "wait": False},
        {**base, "name": "badtoken", "model": LLAMA3, "api_key": "r8_wrong"},
        {**base, "name": "nope", "model": "meta/nope"},
        {**base, "name": "badinput", "model": LLAMA3, "input": {"foo": 1}},
    ]  # fmt: skip
    return {"models": models}


@pytest.fixture(scope="module")
def srv(fake: FakeReplicate) -> Iterator[InferbridgeServer]:
    with InferbridgeServer(_config(fake)) as server:
        yield server


@pytest.fixture
def fresh(fake: FakeReplicate, serve: Any) -> InferbridgeServer:
    """A server of its own for tests that make deployments fail (a shared one would
    put them in cooldown for the tests after)."""
    return serve(_config(fake))


def _creates(fake: FakeReplicate) -> list[Any]:
    return [r for r in fake.requests if r.method == "POST" and r.path.endswith("/predictions")]


def _wait_for(predicate: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.02)


# -- the fake, checked with the official client -----------------------------------------------
def test_fake_speaks_replicate_to_the_official_client(fake: FakeReplicate) -> None:
    client = replicate.Client(api_token="r8_test", base_url=fake.url)
    client.poll_interval = 0.01
    fake.reply = TRICKY
    assert "".join(client.run(LLAMA3, input={"prompt": "hi"})) == "".join(TRICKY)
    assert fake.requests[-1].headers["Prefer"] == "wait"
    events = list(client.stream(LLAMA3, input={"prompt": "hi", "max_tokens": 3}))
    assert "".join(str(e) for e in events) == "".join(TRICKY[:3])
    assert events[-1].event.value == "done"
    stream_req = fake.requests[-1]
    assert stream_req.path.startswith("/stream/v1/predictions/")
    assert stream_req.headers["Accept"] == "text/event-stream"

    p = client.predictions.create(version=LLAMA2_VERSION, input={"prompt": "hi"})
    assert p.status == "starting" and p.urls["get"].endswith(p.id)
    p.wait()
    assert p.status == "succeeded" and "".join(p.output) == "".join(TRICKY)
    assert p.metrics["output_token_count"] == len(TRICKY)
    q = client.predictions.create(version=LLAMA2_VERSION, input={"prompt": "hi"})
    assert client.predictions.cancel(q.id).status == "canceled"
    assert client.predictions.get(q.id).status == "canceled"
    assert fake.cancelled == [q.id]

    with pytest.raises(ReplicateError) as exc:
        client.run(LLAMA2, input={"prompt": "hi", "max_tokens": 5})
    assert exc.value.status == 422 and "max_tokens" in exc.value.detail
    with pytest.raises(ReplicateError) as exc:
        client.run("meta/missing", input={})
    assert exc.value.status == 404
    with pytest.raises(ReplicateError) as exc:
        replicate.Client(api_token="bad", base_url=fake.url).run(LLAMA3, input={})
    assert exc.value.status == 401
    fake.fail_with = "CUDA out of memory"
    with pytest.raises(ModelError):
        client.run(LLAMA3, input={"prompt": "hi"})
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        list(client.stream(LLAMA3, input={"prompt": "hi"}))


# -- through inferbridge ------------------------------------------------------------------------
def test_chat_stream_over_sse_split_awkwardly(srv: InferbridgeServer, fake: FakeReplicate) -> None:
    fake.reply = TRICKY
    fake.behaviour.split_every = 3  # cuts UTF-8 characters and SSE lines
    chunks = list(
        srv.openai().chat.completions.create(
            model="llama3", messages=USER, stream=True, stream_options={"include_usage": True},
            temperature=0.5,
        )
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(TRICKY)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    prompt = (
        "<|start_header_id|>user<|end_header_id|>\n\nSay hello<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert chunks[-1].usage.prompt_tokens == len(prompt.split())  # metrics, not an estimate
    assert chunks[-1].usage.completion_tokens == len(TRICKY)
    create = _creates(fake)[-1]
    assert create.path == f"/v1/models/{LLAMA3}/predictions"
    assert create.headers["Authorization"] == "Bearer r8_test"
    assert "Prefer" not in create.headers
    sent = create.json
    assert sent["stream"] is True
    assert sent["input"] == {
        "prompt": prompt,
        "prompt_template": "{prompt}",
        "temperature": 0.5,
        "stop_sequences": "<|eot_id|>,<|end_of_text|>",
    }
    assert fake.cancelled == []  # it finished: nothing to cancel


def test_chat_non_stream_prefer_wait(srv: InferbridgeServer, fake: FakeReplicate) -> None:
    r = srv.openai().chat.completions.create(model="llama3", messages=USER, max_tokens=3)
    assert r.choices[0].message.content == "Hello world,"
    assert r.choices[0].finish_reason == "length"  # metrics.output_token_count == max_tokens
    assert r.usage.completion_tokens == 3
    create = _creates(fake)[-1]
    assert create.headers["Prefer"] == "wait"
    assert "stream" not in create.json and create.json["input"]["max_tokens"] == 3
    assert [r.method for r in fake.requests] == ["POST"]  # finished within the wait


def test_completions_stream_and_not(srv: InferbridgeServer, fake: FakeReplicate) -> None:
    client = srv.openai()
    r = client.completions.create(model="llama3", prompt="Once upon", max_tokens=2, seed=4)
    assert r.choices[0].text == "Hello world"
    assert r.choices[0].finish_reason == "length"
    assert _creates(fake)[-1].json["input"] == {
        "prompt": "Once upon",
        "prompt_template": "{prompt}",
        "max_tokens": 2,
        "seed": 4,
    }
    chunks = list(client.completions.create(model="llama3", prompt="Once", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "Hello world, how are you?"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "stop_sequences" not in _creates(fake)[-1].json["input"]


def test_input_names_mapped_by_entry(srv: InferbridgeServer, fake: FakeReplicate) -> None:
    client = srv.openai()
    r = client.chat.completions.create(
        model="llama2", messages=USER, max_tokens=4, stop=["?"], extra_body={"top_k": 40,
        "min_tokens": 2})  # fmt: skip
    assert r.choices[0].message.content == "Hello world, how"
    create = _creates(fake)[-1]
    assert create.path == "/v1/predictions"
    assert create.json["version"] == LLAMA2_VERSION
    inp = create.json["input"]
    assert inp["prompt"] == "[INST] Say hello [/INST]"  # no BOS: the model adds its own
    assert (inp["max_new_tokens"], inp["min_new_tokens"], inp["top_k"]) == (4, 2, 40)
    assert inp["stop_sequences"] == "</s>,[INST],?" and "max_tokens" not in inp
    with pytest.raises(openai.BadRequestError, match="presence_penalty") as exc:
        client.chat.completions.create(model="llama2", messages=USER, presence_penalty=0.5)
    assert exc.value.param == "presence_penalty"
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.chat.completions.create(model="llama2", messages=USER, logit_bias={"1": 2})


def test_single_turn_chat_uses_the_models_own_template(
    srv: InferbridgeServer, fake: FakeReplicate
) -> None:
    client = srv.openai()
    messages = [{"role": "system", "content": "Be terse."}, *USER]
    r = client.chat.completions.create(model=LLAMA3, messages=messages)
    assert r.model == LLAMA3 and r.choices[0].message.content == "Hello world, how are you?"
    assert _creates(fake)[-1].json["input"] == {"prompt": "Say hello",
                                                "system_prompt": "Be terse."}  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="prompt_template") as exc:
        client.chat.completions.create(
            model=LLAMA3,
            messages=[
                *USER,
                {"role": "assistant", "content": "Hi"},
                {"role": "user", "content": "Again"},
            ],
        )
    assert exc.value.param == "messages"


def test_messages_input(srv: InferbridgeServer, fake: FakeReplicate) -> None:
    messages = [{"role": "system", "content": "Be terse."}, *USER]
    srv.openai().chat.completions.create(model="llama3-messages", messages=messages)
    assert _creates(fake)[-1].json["input"] == {"messages": messages}


def test_stop_cut_proxy_side_cancels(srv: InferbridgeServer, fake: FakeReplicate) -> None:
    fake.behaviour.delay_between_chunks = 0.02
    chunks = list(srv.openai().chat.completions.create(
        model="llama3", messages=USER, stream=True, stop=["ld, h"]))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello wor"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert _creates(fake)[-1].json["input"]["stop_sequences"] == "<|eot_id|>,<|end_of_text|>"
    _wait_for(lambda: len(fake.cancelled) == 1)


def test_cancel_on_client_disconnect(fresh: InferbridgeServer, fake: FakeReplicate) -> None:
    fake.reply = [f" t{i}" for i in range(40)]
    fake.behaviour.delay_between_chunks = 0.1
    stream = fresh.openai(timeout=5).chat.completions.create(
        model="llama3", messages=USER, stream=True)  # fmt: skip
    for chunk in stream:
        if chunk.choices[0].delta.content:
            break
    stream.close()  # the client goes away mid-answer
    _wait_for(lambda: len(fake.cancelled) == 1)
    pid = fake.cancelled[0]
    assert fake.predictions[pid]["status"] == "canceled"
    assert fake.requests[-1].path == f"/v1/predictions/{pid}/cancel"


def test_failed_prediction(fresh: InferbridgeServer, fake: FakeReplicate) -> None:
    fake.fail_with = "CUDA out of memory"
    fake.behaviour.delay_between_chunks = 0.05
    got = []
    with pytest.raises(openai.APIError, match="CUDA out of memory") as exc:
        for chunk in fresh.openai().chat.completions.create(
            model="llama3", messages=USER, stream=True
        ):
            got.append(chunk.choices[0].delta.content)
    assert not isinstance(exc.value, openai.APIStatusError)  # raised inside the SDK stream
    assert "".join(got) == "Hello world"
    with pytest.raises(openai.InternalServerError, match="failed: CUDA out of memory"):
        fresh.openai().completions.create(model="llama3", prompt="x")


def test_polling_fallback(srv: InferbridgeServer, fake: FakeReplicate) -> None:
    fake.polls_to_finish = 3
    r = srv.openai().chat.completions.create(model="deployed", messages=USER)
    assert r.choices[0].message.content == "Hello world, how are you?"
    assert r.usage.completion_tokens == 7
    assert _creates(fake)[-1].path == "/v1/deployments/acme/prod-llm/predictions"
    assert "Prefer" not in _creates(fake)[-1].headers
    assert [q.method for q in fake.requests].count("GET") == 3
    # a streaming request to a model without urls.stream: polled, relayed as it grows
    fake.reset()
    fake.streaming = False
    fake.polls_to_finish = 4
    chunks = list(srv.openai().completions.create(model="deployed", prompt="x", stream=True))
    pieces = [c.choices[0].text for c in chunks if c.choices[0].text]
    assert "".join(pieces) == "Hello world, how are you?" and len(pieces) > 1
    assert fake.cancelled == []


def test_stream_done_canceled_and_dropped(fresh: InferbridgeServer, fake: FakeReplicate) -> None:
    fake.done_reason = "canceled"
    with pytest.raises(openai.APIError, match="was canceled"):
        list(fresh.openai().chat.completions.create(model="llama3", messages=USER, stream=True))
    fake.reset()
    fake.behaviour.drop_after_chunks = 4
    fake.behaviour.delay_between_chunks = 0.05
    with pytest.raises(openai.APIError, match=r"closed the connection|before the prediction"):
        list(fresh.openai().chat.completions.create(model="llama3", messages=USER, stream=True))
    _wait_for(lambda: len(fake.cancelled) == 1)  # the unfinished prediction is cancelled


def test_upstream_errors(fresh: InferbridgeServer, fake: FakeReplicate) -> None:
    client = fresh.openai()
    with pytest.raises(openai.InternalServerError, match="valid authentication token"):
        client.chat.completions.create(model="badtoken", messages=USER)
    with pytest.raises(openai.InternalServerError, match="could not be found") as gone:
        client.chat.completions.create(model="nope", messages=USER)  # the entry's model
    assert gone.value.status_code == 502 and gone.value.code == "deployment_misconfigured"
    with pytest.raises(openai.BadRequestError, match="Additional property foo"):
        client.chat.completions.create(model="badinput", messages=USER)
    fake.behaviour.status = 429
    fake.behaviour.error_body = {"title": "Too Many Requests", "status": 429,
                                 "detail": "Request was throttled. Your rate limit resets in "
                                 "~30s."}  # fmt: skip
    with pytest.raises(openai.RateLimitError, match="throttled"):
        client.chat.completions.create(model="llama3", messages=USER, stream=True)


def test_n_fans_out_to_predictions(srv: InferbridgeServer, fake: FakeReplicate) -> None:
    r = srv.openai().completions.create(model="llama3", prompt="x", n=2, max_tokens=1)
    assert [c.text for c in r.choices] == ["Hello", "Hello"]
    assert len(_creates(fake)) == 2


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "a/b", "model": "x/y", "version": "abc"}, "one of model, version"),
        ({"name": "plain"}, "set model"),
        ({"name": "a/b", "deployment": "nodash"}, "owner/name"),
        ({"name": "a/b", "input_map": {"logit_bias": "bias"}}, "cannot translate"),
        ({"name": "a/b", "wait": 90}, "1..60"),
    ],
)
def test_config_validation(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(data={"models": [{"backend": "replicate", **entry}]})


def test_version_with_model_prefix_is_split() -> None:
    cfg = load_config(data={"models": [{"name": "x", "backend": "replicate",
                                        "version": f"{LLAMA3}:{LLAMA3_VERSION}"}]})  # fmt: skip
    assert cfg.models[0].version == LLAMA3_VERSION  # type: ignore[attr-defined]
