"""The llama.cpp backend: parameter translation, and openai SDK -> inferbridge -> fake server."""

from __future__ import annotations

import socket

import openai
import pytest

from inferbridge.backends.llamacpp import (
    LlamaCppBackend,
    LlamaCppSettings,
    _ResultReader,
    finish_reason,
    llamacpp_error,
    usage_of,
)
from inferbridge.errors import InvalidRequest, UpstreamError, UpstreamRejected, UpstreamUnavailable
from inferbridge.events import Finish, TextDelta, Usage
from inferbridge.request import InferenceRequest
from tests.fakes.llamacpp import FakeLlamaCpp, error_body

MESSAGES = [{"role": "user", "content": "Say hello"}]


def backend(**entry) -> LlamaCppBackend:
    return LlamaCppBackend(
        LlamaCppSettings(name="llama", backend="llamacpp", url="http://127.0.0.1:1", **entry)
    )


def completion(params=None, extras=None, stream=False, prompt="Hi") -> InferenceRequest:
    return InferenceRequest(
        kind="completion",
        model="llama",
        params=params or {},
        extras=extras or {},
        prompt=prompt,
        stream=stream,
    )


# -- parameter translation -------------------------------------------------------------------
def test_payload_sends_only_what_the_client_set():
    body = backend().payload(completion(), "Hi", [])
    assert body == {"prompt": "Hi", "stream": False, "cache_prompt": True}


def test_payload_maps_openai_params():
    req = completion(
        {
            "max_tokens": 7,
            "temperature": 0.0,
            "top_p": 0.9,
            "seed": 3,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "logit_bias": {"42": -100, "7": 2.5},
            "stop": ["END"],
        },
        stream=True,
    )
    body = backend().payload(req, "Hi", ["END"])
    assert body["n_predict"] == 7 and "max_tokens" not in body
    assert body["temperature"] == 0.0 and body["top_p"] == 0.9 and body["seed"] == 3
    assert body["presence_penalty"] == 0.5 and body["frequency_penalty"] == -0.5
    assert body["logit_bias"] == [[42, -100], [7, 2.5]]
    assert body["stop"] == ["END"] and body["stream"] is True


def test_bad_logit_bias_key_is_a_400():
    with pytest.raises(InvalidRequest) as exc:
        backend().payload(completion({"logit_bias": {"hello": 1}}), "Hi", [])
    assert exc.value.param == "logit_bias"


def test_native_extras_are_forwarded_and_repetition_penalty_renamed():
    extras = {
        "top_k": 0,
        "min_p": 0.0,
        "typical_p": 0.9,
        "mirostat": 2,
        "mirostat_tau": 4.0,
        "repetition_penalty": 1.2,
        "grammar": 'root ::= "x"',
    }
    body = backend().payload(completion(extras=extras), "Hi", [])
    assert body["top_k"] == 0 and body["min_p"] == 0.0 and body["typical_p"] == 0.9
    assert body["mirostat"] == 2 and body["mirostat_tau"] == 4.0
    assert body["repeat_penalty"] == 1.2 and "repetition_penalty" not in body
    assert body["grammar"] == 'root ::= "x"'


def test_slot_and_cache_prompt_settings():
    body = backend(slot_id=1, cache_prompt=False).payload(completion(), "Hi", [])
    assert body["id_slot"] == 1 and body["slot_id"] == 1  # new and pre-2024-03 spellings
    assert body["cache_prompt"] is False


@pytest.mark.parametrize(
    ("fmt", "schema"),
    [
        ({"type": "json_object"}, {"type": "object"}),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array"}}},
            {"type": "array"},
        ),
    ],
)
def test_response_format_becomes_json_schema(fmt, schema):
    body = backend().payload(completion({"response_format": fmt}), "Hi", [])
    assert body["json_schema"] == schema


def test_logprobs_become_n_probs():
    chat = InferenceRequest(
        kind="chat", model="llama", messages=MESSAGES, params={"logprobs": True, "top_logprobs": 3}
    )
    assert backend().payload(chat, "x", [])["n_probs"] == 3
    chat.params = {"logprobs": True}
    assert backend().payload(chat, "x", [])["n_probs"] == 1
    assert backend().payload(completion({"logprobs": 2}), "x", [])["n_probs"] == 2


def test_unsupported_params_are_rejected_naming_them():
    req = InferenceRequest(
        kind="chat", model="llama", messages=MESSAGES, params={"tools": [{"type": "function"}]}
    )
    with pytest.raises(InvalidRequest, match="'tools'"):
        backend().prepare(req)


# -- results -> events -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("result", "reason"),
    [
        ({"stop_type": "eos"}, "stop"),
        ({"stop_type": "word", "stopping_word": "END"}, "stop"),
        ({"stop_type": "limit"}, "length"),
        ({"stop_type": "none", "truncated": True}, "length"),
        ({"stopped_eos": True, "stopped_word": False, "stopped_limit": False}, "stop"),
        ({"stopped_eos": False, "stopped_word": True, "stopped_limit": False}, "stop"),
        ({"stopped_eos": False, "stopped_word": True, "stopped_limit": True}, "length"),  # PR 7198
        ({"stopped_eos": False, "stopped_word": False, "stopped_limit": False}, "length"),
        ({}, "stop"),
        ({"truncated": True}, "length"),
    ],
)
def test_finish_reason_both_dialects(result, reason):
    assert finish_reason(result) == reason


def test_usage_from_counts_or_timings():
    u = usage_of(
        {
            "tokens_evaluated": 12,
            "tokens_predicted": 3,
            "timings": {"prompt_n": 2, "cache_n": 10, "predicted_n": 3},
        }
    )
    assert (u.prompt_tokens, u.completion_tokens) == (12, 3)
    assert u.details == {"prompt_tokens_details": {"cached_tokens": 10}}
    u = usage_of({"timings": {"prompt_n": 5, "predicted_n": 4}})
    assert (u.prompt_tokens, u.completion_tokens) == (5, 4)
    assert usage_of({"content": "x"}) is None


def test_reader_handles_crlf_comments_and_done():
    reader = _ResultReader("L", chat=True, top_logprobs=None)
    lines = [
        b": ping",
        b'data: {"content":"a","stop":false}\r',
        b'data: {"content":"","stop":true,"stop_type":"limit",'
        b'"tokens_evaluated":2,"tokens_predicted":1}',
    ]
    events: list = []
    assert [reader.line(line, events) for line in lines] == [False, False, True]
    assert [type(e) for e in events] == [TextDelta, Finish, Usage]
    assert events[0].text == "a" and events[1].reason == "length" and reader.done


@pytest.mark.parametrize(
    "line",
    [
        b'error: {"code":500,"message":"boom","type":"server_error"}',
        b'data: {"error":{"code":500,"message":"boom","type":"server_error"}}',
    ],
)
def test_reader_raises_on_error_lines(line):
    with pytest.raises(UpstreamError, match="boom") as exc:
        _ResultReader("backend 'llamacpp'", chat=False, top_logprobs=None).line(line, [])
    assert exc.value.status == 502 and "llamacpp" in exc.value.message


def test_error_mapper():
    ctx = llamacpp_error(
        "L",
        400,
        error_body(400, "too long", "exceed_context_size_error", n_prompt_tokens=9000, n_ctx=4096),
    )
    assert isinstance(ctx, UpstreamRejected) and ctx.status == 400
    assert ctx.code == "context_length_exceeded" and "9000" in ctx.message
    old = llamacpp_error(
        "L",
        400,
        error_body(400, "the request exceeds the available context size. try increasing it"),
    )
    assert old.code == "context_length_exceeded"
    bad = llamacpp_error("L", 400, error_body(400, "Failed to parse grammar"))
    assert bad.status == 400 and bad.code is None and "Failed to parse grammar" in bad.message
    assert isinstance(
        llamacpp_error("L", 503, error_body(503, "Loading model")), UpstreamUnavailable
    )
    assert llamacpp_error("L", 404, error_body(404, "File Not Found")).status == 502
    assert llamacpp_error("L", 500, error_body(500, "crash")).status == 502


# -- end to end: openai SDK -> inferbridge -> fake llama-server ------------------------------
@pytest.fixture(scope="module")
def upstream():
    with FakeLlamaCpp() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _reset(upstream):
    upstream.reset()
    yield


@pytest.fixture
def proxy(serve, upstream):
    """A fresh inferbridge per test, so no router state (cooldowns) leaks between tests."""
    entry = {"backend": "llamacpp", "url": upstream.url, "timeout": 5}
    models = [
        {"name": "llama", "prompt_template": "chatml", **entry},
        {"name": "llama-props", **entry},
        {"name": "llama-notemplate", "use_server_template": False, **entry},
    ]
    return serve({"models": models})


def completion_calls(upstream):
    return [r for r in upstream.requests if r.path == "/completion"]


def test_chat_non_stream(proxy, upstream):
    r = proxy.openai().chat.completions.create(model="llama", messages=MESSAGES)
    assert r.choices[0].message.content == "Hello, world! Bye."
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 7  # fake: words + BOS
    body = completion_calls(upstream)[-1].json
    assert body["prompt"] == "<|im_start|>user\nSay hello<|im_end|>\n<|im_start|>assistant\n"
    assert body["stream"] is False and body["cache_prompt"] is True
    assert body["stop"] == ["<|im_end|>", "<|endoftext|>"]  # template stops, a JSON list
    assert "n_predict" not in body and "temperature" not in body and "top_k" not in body


def test_chat_stream_with_usage(proxy):
    chunks = list(
        proxy.openai().chat.completions.create(
            model="llama", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello, world! Bye."
    assert [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7


def test_completions_non_stream_and_stream(proxy, upstream):
    client = proxy.openai()
    r = client.completions.create(model="llama", prompt="Once upon a time")
    assert r.choices[0].text == "Hello, world! Bye." and r.usage.prompt_tokens == 5
    assert completion_calls(upstream)[-1].json["prompt"] == "Once upon a time"
    chunks = list(client.completions.create(model="llama", prompt="Once", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "Hello, world! Bye."
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_token_id_prompt_is_relayed(proxy, upstream):
    r = proxy.openai().completions.create(model="llama", prompt=[1, 2, 3], max_tokens=1)
    assert completion_calls(upstream)[-1].json["prompt"] == [1, 2, 3]
    assert r.usage.prompt_tokens == 3


@pytest.mark.parametrize("dialect", ["stop_type", "booleans"])
@pytest.mark.parametrize("stream", [False, True])
def test_finish_reasons_eos_word_limit(proxy, upstream, dialect, stream):
    upstream.dialect = dialect
    client = proxy.openai()

    def run(**kw):
        if not stream:
            r = client.completions.create(model="llama", prompt="x", **kw)
            return r.choices[0].text, r.choices[0].finish_reason
        chunks = list(client.completions.create(model="llama", prompt="x", stream=True, **kw))
        return (
            "".join(c.choices[0].text for c in chunks),
            next(c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason),
        )

    assert run() == ("Hello, world! Bye.", "stop")  # eos
    assert run(stop="ld!") == ("Hello, wor", "stop")  # word: stop string left out
    assert completion_calls(upstream)[-1].json["stop"] == ["ld!"]
    assert run(max_tokens=2) == ("Hello,", "length")  # limit
    assert completion_calls(upstream)[-1].json["n_predict"] == 2


def test_sampling_params_reach_the_server(proxy, upstream):
    proxy.openai().chat.completions.create(
        model="llama",
        messages=MESSAGES,
        temperature=0.2,
        top_p=0.5,
        seed=9,
        max_completion_tokens=5,
        stop=["a", "b"],
        extra_body={"top_k": 0, "min_p": 0, "repetition_penalty": 1.1},
    )
    body = completion_calls(upstream)[-1].json
    assert (body["temperature"], body["top_p"], body["seed"], body["n_predict"]) == (0.2, 0.5, 9, 5)
    assert body["stop"] == ["<|im_end|>", "<|endoftext|>", "a", "b"]
    assert body["top_k"] == 0 and body["min_p"] == 0 and body["repeat_penalty"] == 1.1


def test_chat_logprobs(proxy):
    r = proxy.openai().chat.completions.create(
        model="llama", messages=MESSAGES, logprobs=True, top_logprobs=2, max_tokens=2
    )
    content = r.choices[0].logprobs.content
    assert [t.token for t in content] == ["Hello", ","]
    assert [len(t.top_logprobs) for t in content] == [2, 2]
    assert content[0].bytes == list(b"Hello")


def test_server_template_is_read_once_from_props(serve, upstream):
    upstream.chat_template = "{{ bos_token }}[{{ messages[0]['content'] }}]{{ eos_token }}"
    entry = {"name": "llama-props", "backend": "llamacpp", "url": upstream.url, "timeout": 5}
    client = serve({"models": [entry]}).openai()  # reads /props at start-up
    for _ in range(2):
        client.chat.completions.create(model="llama-props", messages=MESSAGES)
    assert [r.path for r in upstream.requests].count("/props") == 1
    body = completion_calls(upstream)[-1].json
    assert body["prompt"] == "[Say hello]</s>"  # leading BOS stripped: the server adds it
    assert body["stop"] == ["</s>"]


def test_without_any_template_chat_is_a_502(proxy):
    # the deployment's configuration, not the client's fault: retried elsewhere when the
    # model has other deployments (tests/test_server_templates.py)
    with pytest.raises(openai.InternalServerError, match="no chat template") as exc:
        proxy.openai().chat.completions.create(model="llama-notemplate", messages=MESSAGES)
    assert exc.value.status_code == 502 and "llama-notemplate[0]" in exc.value.message


def test_loading_server_is_a_503(proxy, upstream, serve):
    upstream.loading = True
    with pytest.raises(openai.InternalServerError) as exc:
        proxy.openai().completions.create(model="llama", prompt="x")
    assert exc.value.status_code == 503
    fresh = serve({"models": [{"name": "p", "backend": "llamacpp", "url": upstream.url}]})
    with pytest.raises(openai.InternalServerError) as exc:  # /props while loading
        fresh.openai().chat.completions.create(model="p", messages=MESSAGES)
    assert exc.value.status_code == 503


async def test_health_reads_health_endpoint(upstream):
    b = LlamaCppBackend(LlamaCppSettings(name="l", backend="llamacpp", url=upstream.url))
    await b.start()
    try:
        await b.health()  # ready: returns
        upstream.loading = True
        with pytest.raises(UpstreamUnavailable, match="Loading model"):
            await b.health()
    finally:
        await b.close()


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_400_is_bad_request(proxy, upstream, stream):
    upstream.behaviour.status = 400
    upstream.behaviour.error_body = {
        "error": {
            "code": 400,
            "message": "Failed to parse grammar",
            "type": "invalid_request_error",
        }
    }
    with pytest.raises(openai.BadRequestError, match="Failed to parse grammar"):
        r = proxy.openai().completions.create(model="llama", prompt="x", stream=stream)
        list(r) if stream else None


def test_context_exceeded_is_400_context_length_exceeded(proxy, upstream):
    upstream.n_ctx = 2
    with pytest.raises(openai.BadRequestError) as exc:
        proxy.openai().chat.completions.create(model="llama", messages=MESSAGES)
    assert exc.value.code == "context_length_exceeded"


def test_drop_mid_stream_raises_in_the_sdk(proxy, upstream):
    upstream.behaviour.drop_after_chunks = 2
    stream = proxy.openai().chat.completions.create(model="llama", messages=MESSAGES, stream=True)
    got = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            got.append(chunk)
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "Hello,"


@pytest.mark.parametrize("style", ["data", "legacy"])
def test_error_event_mid_stream_raises_in_the_sdk(proxy, upstream, style):
    upstream.stream_error = style
    upstream.behaviour.delay_between_chunks = 0.05  # the error comes after the first bytes
    stream = proxy.openai().completions.create(model="llama", prompt="x", stream=True)
    with pytest.raises(openai.APIError, match="fake generation failure"):
        list(stream)


def test_refused_connection_is_502_naming_the_backend(serve):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = serve(
        {
            "models": [
                {
                    "name": "gone",
                    "backend": "llamacpp",
                    "prompt_template": "chatml",
                    "url": f"http://127.0.0.1:{port}",
                }
            ]
        }
    )
    with pytest.raises(openai.InternalServerError) as exc:
        srv.openai().chat.completions.create(model="gone", messages=MESSAGES)
    assert exc.value.status_code == 502
    assert "backend 'llamacpp' (gone[0])" in str(exc.value)
    assert str(port) not in str(exc.value)  # internal addresses are not shown to clients


@pytest.mark.parametrize("dialect", ["stop_type", "booleans"])
def test_stream_split_at_awkward_boundaries(proxy, upstream, dialect):
    upstream.dialect = dialect
    upstream.tokens = ["Grüße", " 🦙", " ok"]
    upstream.behaviour.split_every = 3
    chunks = list(
        proxy.openai().chat.completions.create(
            model="llama", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Grüße 🦙 ok"
    assert chunks[-1].usage.completion_tokens == 3
