"""The `tgi` backend: parameter translation, error mapping, and the official openai SDK
through inferbridge to a fake TGI speaking the native protocol byte for byte.

The fake is checked with Hugging Face's own `text-generation` client separately
(tests/clients/tgi_client_check.py: that client needs huggingface-hub<1.0)."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from inferbridge.api.protocol import build_request
from inferbridge.backends import registry
from inferbridge.backends.tgi import TGIBackend, event_error, tgi_error
from inferbridge.backends.tgi_params import (
    JSON_OBJECT_REGEX,
    TGIInfo,
    stops_for_tgi,
    translate_params,
)
from inferbridge.config import load_config
from inferbridge.errors import (
    InvalidRequest,
    UnsupportedParameter,
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from tests.fakes.openai_compat import FakeOpenAI
from tests.fakes.tgi import FakeTGI, tok
from tests.server import InferbridgeServer

USER = [{"role": "user", "content": "Say hello"}]
LABEL = "backend 'tgi' (model m at http://tgi)"


# -- helpers ------------------------------------------------------------------------------
def backend(**entry: Any) -> TGIBackend:
    entry.setdefault("url", "http://tgi")
    cfg = load_config(data={"models": [{"name": "m", "backend": "tgi", **entry}]})
    b = registry.create(cfg.models[0])
    assert isinstance(b, TGIBackend)
    return b


def params(kind: str = "chat", info: TGIInfo | None = None, **body: Any) -> dict[str, Any]:
    body.setdefault("model", "m")
    if kind == "chat":
        body.setdefault("messages", USER)
    else:
        body.setdefault("prompt", "Once upon")
    request = build_request(kind, body)  # type: ignore[arg-type]
    backend(prompt_template="chatml").prepare(request)
    return translate_params(request, info or TGIInfo())


# -- parameter translation ------------------------------------------------------------------
def test_nothing_is_invented():
    assert params() == {}
    assert params("completion") == {}


def test_max_tokens_becomes_max_new_tokens():
    assert params(max_tokens=7) == {"max_new_tokens": 7}
    assert params(max_tokens=7, max_completion_tokens=9) == {"max_new_tokens": 9}


def test_temperature_zero_is_greedy_not_a_422():
    assert params(temperature=0) == {"do_sample": False}
    assert params(temperature=0.0, top_p=0.5, top_k=40, typical_p=0.5) == {"do_sample": False}


@pytest.mark.parametrize("t", [0.3, 1.0, 2])
def test_positive_temperature_samples(t):
    # TGI decodes greedily at 1.0 unless do_sample is set: OpenAI's 1.0 means sampling.
    assert params(temperature=t) == {"temperature": t, "do_sample": True}


def test_top_p():
    assert params(top_p=1.0) == {}  # TGI rejects 1.0; it means "no nucleus filtering"
    assert params(top_p=1) == {}
    assert params(top_p=0.9) == {"top_p": 0.9}
    assert params(top_p=0) == {"do_sample": False}  # only the top token survives


def test_top_k_and_typical_p():
    assert params(top_k=40) == {"top_k": 40}
    assert params(top_k=0) == {} and params(top_k=-1) == {}
    assert params(typical_p=0.9) == {"typical_p": 0.9}
    assert params(typical_p=1.0) == {}


@pytest.mark.parametrize(
    "field,value",
    [
        ("top_k", -5),
        ("top_k", 2.5),
        ("top_k", "40"),
        ("typical_p", 0),
        ("repetition_penalty", 0),
        ("repetition_penalty", True),
        ("truncate", 0),
        ("do_sample", "yes"),
        ("watermark", 1),
        ("adapter_id", 3),
        ("grammar", {"type": "cfg", "value": "x"}),
    ],
)
def test_bad_extras_are_400_naming_the_field(field, value):
    with pytest.raises(InvalidRequest) as exc:
        params(**{field: value})
    assert exc.value.param == field and exc.value.status == 400


def test_penalties_seed_and_extras():
    assert params(frequency_penalty=0.5, repetition_penalty=1.2) == {
        "frequency_penalty": 0.5,
        "repetition_penalty": 1.2,
    }
    assert params(frequency_penalty=0) == {}
    assert params(seed=5) == {"seed": 5}
    assert params(seed=-1) == {}  # "random", which is TGI's default
    assert params(seed=2**63 - 1) == {"seed": 2**63 - 1}  # the schema bounds seeds to 64 bits
    assert params(watermark=True, do_sample=True, adapter_id="lora-a") == {
        "watermark": True,
        "do_sample": True,
        "adapter_id": "lora-a",
    }


def test_truncate_is_clamped_to_max_input_tokens():
    assert params(truncate=100) == {"truncate": 100}
    assert params(info=TGIInfo(4, 50), truncate=100) == {"truncate": 50}


def test_response_format_becomes_a_grammar():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert params(response_format=fmt) == {"grammar": {"type": "json", "value": schema}}
    assert params(response_format={"type": "json_object"}) == {
        "grammar": {"type": "regex", "value": JSON_OBJECT_REGEX}
    }
    assert params(response_format={"type": "text"}) == {}
    grammar = {"type": "regex", "value": "[0-9]+"}
    assert params(grammar=grammar) == {"grammar": grammar}
    with pytest.raises(InvalidRequest, match="not both"):
        params(grammar=grammar, response_format={"type": "json_object"})


def test_json_object_regex_accepts_objects_only():
    rx = re.compile(JSON_OBJECT_REGEX)
    for ok in ["{}", '{"a": 1}', '{"a": [1, -2.5e3, "x\\"y"], "b": {"c": null}}']:
        assert rx.fullmatch(ok), ok
    for bad in ["[]", "1", '{"a":}', '{"a": 1,}', "{'a': 1}"]:
        assert not rx.fullmatch(bad), bad


def test_logprobs_become_top_n_tokens():
    assert params(logprobs=True) == {}  # token logprobs come with details: true
    assert params(logprobs=True, top_logprobs=3) == {"top_n_tokens": 3}
    assert params("completion", logprobs=2) == {"top_n_tokens": 2}
    with pytest.raises(InvalidRequest, match="requires 'logprobs'"):
        params(top_logprobs=2)


@pytest.mark.parametrize(
    "field,value",
    [
        ("presence_penalty", 0.5),
        ("logit_bias", {"1": 2}),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("min_p", 0.1),
        ("decoder_input_details", True),
    ],
)
def test_unsupported_params_are_400_or_dropped(field, value):
    with pytest.raises(UnsupportedParameter) as exc:
        params(**{field: value})
    assert exc.value.param == field
    request = build_request("chat", {"model": "m", "messages": USER, field: value})
    backend(drop_unsupported_params=True).prepare(request)
    assert translate_params(request, TGIInfo()) == {}


def test_stops_sent_to_tgi_client_first_eos_last():
    stops = ["<|im_end|>", "</s>", "A", "B"]  # template's first (merge_stops), EOS "</s>"
    sent = ["A", "B", "<|im_end|>", "</s>"]
    assert stops_for_tgi(stops, ["A", "B"], "</s>", 4) == (sent, [])
    # over the limit: the EOS is left out first, and TGI stops on it by itself
    assert stops_for_tgi(stops, ["A", "B"], "</s>", 3) == (sent[:3], [])
    assert stops_for_tgi(stops, ["A", "B"], "</s>", 2) == (sent[:2], ["<|im_end|>"])
    assert stops_for_tgi(stops, ["A", "B"], "</s>", 0) == ([], ["A", "B", "<|im_end|>"])
    assert stops_for_tgi([], [], None, 4) == ([], [])


def test_stops_sent_to_tgi_are_the_covering_set():
    # human_bot's defaults plus 4 client stops: 8 strings, covered by 4
    template = ["\n<human>:", "\n<bot>:", "<human>:", "<bot>:"]
    client = ["\nUser:", "User:", "<bot>: ", "END"]
    stops = [*template, *client]  # merge_stops order
    assert stops_for_tgi(stops, client, None, 4) == (["User:", "END", "<human>:", "<bot>:"], [])
    # still too many after covering: the first `limit` are sent, the rest cut here
    client = ["A1", "B2", "C3", "D4"]
    sent, unsent = stops_for_tgi([*template, *client], client, None, 4)
    assert (sent, unsent) == (client, ["<human>:", "<bot>:"])
    # a client stop covered by a template stop (and duplicates) are not sent twice
    stops = ["<|im_end|>", "<|endoftext|>", "<|im_end|>\n", "Z"]
    assert stops_for_tgi(stops, ["<|im_end|>\n", "Z", "Z"], "", 4) == (
        ["Z", "<|im_end|>", "<|endoftext|>"],
        [],
    )
    # a short client stop can cover the template's: "x" is in "<|endoftext|>"
    assert stops_for_tgi([*stops, "x"], ["x"], "", 4) == (["x", "<|im_end|>", "Z"], [])


def test_info_parsing_is_defensive():
    assert TGIInfo.parse({"max_stop_sequences": 6, "max_input_tokens": 100}) == TGIInfo(6, 100)
    assert TGIInfo.parse({"max_input_length": 80}) == TGIInfo(4, 80)  # older field name
    assert TGIInfo.parse(["garbage"]) == TGIInfo(4, None)
    assert TGIInfo.parse({"max_stop_sequences": "x"}) == TGIInfo(4, None)


# -- error mapping --------------------------------------------------------------------------
def _body(message: str, kind: str) -> bytes:
    return f'{{"error":"{message}","error_type":"{kind}"}}'.encode()


def test_error_mapper():
    err = tgi_error(LABEL, 422, _body("Input validation error: `top_k` bad", "validation"))
    assert isinstance(err, UpstreamRejected) and err.status == 400
    assert err.message.startswith("Input validation error: `top_k` bad") and LABEL in err.message
    ctx = _body("Input validation error: `inputs` tokens + `max_new_tokens` must be <= 10", "v")
    assert tgi_error(LABEL, 422, ctx).code == "context_length_exceeded"
    assert tgi_error(LABEL, 422, b"Failed to deserialize the JSON body").status == 400
    gen = tgi_error(LABEL, 424, _body("Request failed during generation: OOM", "generation"))
    assert gen.status == 502 and "OOM" in gen.message and LABEL in gen.message
    busy = tgi_error(LABEL, 429, _body("Model is overloaded", "overloaded"))
    assert busy.status == 429 and busy.retryable
    assert isinstance(tgi_error(LABEL, 503, _body("unhealthy", "healthcheck")), UpstreamUnavailable)
    assert (
        tgi_error(LABEL, 500, _body("Incomplete generation", "incomplete_generation")).status == 502
    )
    assert tgi_error(LABEL, 401, b"").status == 502  # bare 401 from --api-key


@pytest.mark.parametrize(
    "kind,status",
    [
        ("validation", 400),
        ("overloaded", 429),
        ("generation", 502),
        ("incomplete_generation_stream", 502),
        ("something_new", 502),
    ],
)
def test_error_events(kind, status):
    err = event_error(LABEL, {"error": "boom", "error_type": kind})
    assert err.status == status and "boom" in err.message and LABEL in err.message


# -- the openai SDK through inferbridge -----------------------------------------------------
@pytest.fixture(scope="module")
def fake() -> Iterator[FakeTGI]:
    with FakeTGI() as server:
        yield server


@pytest.fixture(autouse=True)
def _reset(request: pytest.FixtureRequest) -> None:
    if "fake" in request.fixturenames:
        request.getfixturevalue("fake").reset()


@pytest.fixture(scope="module")
def server(fake) -> Iterator[InferbridgeServer]:
    models = [
        {"name": "chat", "backend": "tgi", "url": fake.url, "prompt_template": "chatml"},
        {"name": "llama3", "backend": "tgi", "url": fake.url, "prompt_template": "llama3"},
        {"name": "human_bot", "backend": "tgi", "url": fake.url, "prompt_template": "human_bot"},
        {"name": "raw", "backend": "tgi", "url": fake.url, "api_key": "tgi-key"},
    ]
    with InferbridgeServer({"models": models}) as srv:
        yield srv


def _sent(fake: FakeTGI) -> tuple[str, dict[str, Any]]:
    post = [r for r in fake.requests if r.method == "POST"][-1]
    return post.path, post.json


def _chat_stream(server: InferbridgeServer, model: str = "chat", **kw: Any) -> list[Any]:
    return list(
        server.openai().chat.completions.create(
            model=model, messages=USER, stream=True, stream_options={"include_usage": True}, **kw
        )
    )


def _text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _finishes(chunks: list[Any]) -> list[str]:
    return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


def test_sdk_chat(server, fake):
    r = server.openai().chat.completions.create(model="chat", messages=USER)
    assert r.choices[0].message.content == "Hello world!"
    assert r.choices[0].finish_reason == "stop"
    path, body = _sent(fake)
    prompt = "<|im_start|>user\nSay hello<|im_end|>\n<|im_start|>assistant\n"
    assert path == "/generate"
    assert body == {
        "inputs": prompt,
        "parameters": {
            "details": True,
            "return_full_text": False,
            "stop": ["<|im_end|>", "<|endoftext|>"],
        },
    }
    # x-prompt-tokens header (fake: words + BOS) and details.generated_tokens (with EOS).
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt.split()) + 1, 4)


def test_sdk_chat_stream_with_usage(server, fake):
    fake.prompt_tokens = 17
    chunks = _chat_stream(server)
    assert _sent(fake)[0] == "/generate_stream"
    assert _text(chunks) == "Hello world!"
    assert _finishes(chunks) == ["stop"]
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (17, 4)
    assert "</s>" not in _text(chunks)


def test_sdk_chat_strips_the_bos_tgi_adds_itself(server, fake):
    server.openai().chat.completions.create(model="llama3", messages=USER)
    inputs = _sent(fake)[1]["inputs"]
    assert inputs.startswith("<|start_header_id|>user") and "<|begin_of_text|>" not in inputs


@pytest.mark.parametrize("stream", [False, True])
def test_sdk_completions_prompt_as_given(server, fake, stream):
    client = server.openai()
    r = client.completions.create(model="raw", prompt="<s>[INST] hi [/INST]", stream=stream)
    text = "".join(c.choices[0].text for c in r) if stream else r.choices[0].text
    assert text == "Hello world!"
    path, body = _sent(fake)
    assert path == ("/generate_stream" if stream else "/generate")
    assert body == {
        "inputs": "<s>[INST] hi [/INST]",
        "parameters": {"details": True, "return_full_text": False},
    }
    post = [q for q in fake.requests if q.method == "POST"][-1]
    assert post.headers["Authorization"] == "Bearer tgi-key"


def test_sdk_chat_without_template_uses_the_models_own(server, fake):
    # no prompt_template: TGI applies the model's template (/chat_tokenize); more in
    # tests/test_server_templates.py
    server.openai().chat.completions.create(model="raw", messages=USER)
    assert _sent(fake)[1]["inputs"] == "[INST] Say hello [/INST]"  # without TGI's own BOS


def test_sdk_sampling_values_tgi_would_reject_are_accepted(server, fake):
    for stream in (False, True):
        r = server.openai().chat.completions.create(
            model="chat", messages=USER, temperature=0, top_p=1.0, seed=-1, stream=stream
        )
        if stream:
            assert _text(list(r)) == "Hello world!"
        else:
            assert r.choices[0].message.content == "Hello world!"
        params = _sent(fake)[1]["parameters"]
        assert params["do_sample"] is False
        assert not {"temperature", "top_p", "seed"} & set(params)


@pytest.mark.parametrize("stream", [False, True])
def test_sdk_finish_length(server, fake, stream):
    r = server.openai().chat.completions.create(
        model="chat", messages=USER, max_tokens=2, stream=stream
    )
    if stream:
        chunks = list(r)
        assert _text(chunks) == "Hello world" and _finishes(chunks) == ["length"]
    else:
        assert r.choices[0].message.content == "Hello world"
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2
    assert _sent(fake)[1]["parameters"]["max_new_tokens"] == 2


@pytest.mark.parametrize("stream", [False, True])
def test_sdk_stop_sent_to_tgi_and_cut(server, fake, stream):
    r = server.openai().completions.create(model="raw", prompt="p", stop=" world", stream=stream)
    text = "".join(c.choices[0].text for c in r) if stream else r.choices[0].text
    # TGI keeps the stop string in its text and says "stop_sequence": both are normalized.
    assert text == "Hello"
    assert _sent(fake)[1]["parameters"]["stop"] == [" world"]


@pytest.mark.parametrize("stream", [False, True])
def test_sdk_more_stops_than_tgi_accepts_are_cut_here(server, fake, stream):
    fake.set_reply("Hello", " big", " world", "!")
    stops = ["a1", "b2", "c3", "d4", " world"]  # the 5th is over TGI's limit of 4
    r = server.openai().chat.completions.create(
        model="chat", messages=USER, stop=stops[:4], stream=stream, max_tokens=20
    )
    if stream:
        list(r)
    params = _sent(fake)[1]["parameters"]
    assert params["stop"] == ["a1", "b2", "c3", "d4"]  # the client's first, template's dropped
    r = server.openai().chat.completions.create(
        model="chat", messages=USER, stop=stops, stream=stream, max_tokens=20
    )
    assert _sent(fake)[1]["parameters"]["stop"] == stops[:4]
    if stream:
        chunks = list(r)
        assert _text(chunks) == "Hello big" and _finishes(chunks) == ["stop"]
    else:
        assert r.choices[0].message.content == "Hello big"
        assert r.choices[0].finish_reason == "stop"


def _answer(r: Any, stream: bool) -> tuple[str, str | None, Any]:
    """(text, finish reason, usage) of a chat answer, streamed (with usage) or not."""
    if not stream:
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    chunks = list(r)
    finishes = _finishes(chunks)
    return _text(chunks), finishes[-1] if finishes else None, chunks[-1].usage


def _estimate(text: str) -> int:
    return -(-len(text) // 4)  # inferbridge.usage's rule: a token per 4 characters


@pytest.mark.parametrize("stream", [False, True])
def test_sdk_template_and_client_stops_are_sent_as_their_covering_set(server, fake, stream):
    # human_bot's 4 default stops plus 4 of the client's: 8 strings, covered by 4 of them
    # ("<bot>:" covers "\n<bot>:" and "<bot>: ", "User:" covers "\nUser:"...)
    fake.set_reply("Hello", " there", "\n<bot>:", " I", " am", " the", " user", ".")
    r = server.openai().chat.completions.create(
        model="human_bot",
        messages=USER,
        stop=["\nUser:", "User:", "<bot>: ", "END"],
        stream=stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    )
    text, reason, usage = _answer(r, stream)
    # TGI halted at "<bot>:"; the cut is at the (covered) "\n<bot>:", which starts earlier
    assert (text, reason) == ("Hello there", "stop")
    path, body = _sent(fake)
    assert path == ("/generate_stream" if stream else "/generate")  # all fit: no need to
    stops = body["parameters"]["stop"]
    assert len(stops) <= fake.info["max_stop_sequences"]
    assert stops == ["User:", "END", "<human>:", "<bot>:"]  # the client's first
    assert usage.completion_tokens == 3  # TGI's count: it stopped there


@pytest.mark.parametrize("stream", [False, True])
def test_sdk_stops_over_the_limit_are_cut_here_and_end_the_generation(server, fake, stream):
    # human_bot's covering set (<human>:, <bot>:) and 4 client stops: 6 for TGI's 4
    fake.set_reply("Hello", "\n<bot>:", *[" and so on"] * 30)
    fake.behaviour.delay_between_chunks = 0.1  # TGI would generate for 3 s more
    client_stops = ["A1", "B2", "C3", "D4"]
    started = time.monotonic()
    raw = server.openai().chat.completions.with_raw_response.create(
        model="human_bot",
        messages=USER,
        stop=client_stops,
        stream=stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    )
    text, reason, usage = _answer(raw.parse(), stream)
    elapsed = time.monotonic() - started
    assert (text, reason) == ("Hello", "stop")
    path, body = _sent(fake)
    assert body["parameters"]["stop"] == client_stops  # at most max_stop_sequences (4)
    # even for a non-streamed answer TGI is asked for a stream: only that can be stopped...
    assert path == "/generate_stream"
    # ...and it was: closed at the cut, not read on to TGI's end (nor drained)
    deadline = time.monotonic() + 2
    while fake.closed_streams < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.closed_streams == 1
    assert elapsed < 1.0, elapsed  # reading on after the cut (a drain) would take 1 s more
    # usage: the two tokens read (one event each); the prompt side TGI never sent, estimated
    assert usage.completion_tokens == 2
    assert usage.prompt_tokens == _estimate(body["inputs"])
    if not stream:
        assert raw.headers["x-inferbridge-usage-estimated"] == "true"


def test_sdk_special_token_named_as_stop_ends_the_stream(server, fake):
    # The template's stops did not fit in TGI's 4, and <|im_end|> is not TGI's EOS here.
    fake.set_reply("Hello", tok("<|im_end|>", special=True), " garbage", " more")
    chunks = _chat_stream(server, stop=["w1", "w2", "w3", "w4"])
    assert _text(chunks) == "Hello" and _finishes(chunks) == ["stop"]


def test_sdk_stream_usage_without_input_length_is_tgi_s_count_where_it_gives_one(server, fake):
    # a TGI whose final stream details carry no input_length (older versions)
    fake.stream_input_length = False
    fake.set_reply("Supercalifragilistic", "expialidocious", " indeed")  # 41 characters
    chunks = _chat_stream(server)
    usage = chunks[-1].usage
    assert usage.completion_tokens == 4  # details.generated_tokens (EOS included), not 11
    assert usage.prompt_tokens == _estimate(_sent(fake)[1]["inputs"])


def test_sdk_usage_without_the_prompt_header_is_partly_estimated(server, fake):
    fake.set_reply("Supercalifragilistic", "expialidocious", " indeed")
    fake.prompt_header = False
    raw = server.openai().chat.completions.with_raw_response.create(
        model="chat", messages=USER, max_tokens=2
    )
    usage = raw.parse().usage
    assert usage.completion_tokens == 2  # details.generated_tokens, not the text's 9
    assert usage.prompt_tokens == _estimate(_sent(fake)[1]["inputs"])
    assert raw.headers["x-inferbridge-usage-estimated"] == "true"
    fake.prompt_header = True
    raw = server.openai().chat.completions.with_raw_response.create(
        model="chat", messages=USER, max_tokens=2
    )
    assert raw.parse().usage.completion_tokens == 2
    assert "x-inferbridge-usage-estimated" not in raw.headers


@pytest.mark.parametrize("stream", [False, True])
def test_sdk_special_tokens_are_not_text(server, fake, stream):
    fake.set_reply("Hel", tok("<|special|>", special=True), "lo")
    r = server.openai().chat.completions.create(model="chat", messages=USER, stream=stream)
    text = _text(list(r)) if stream else r.choices[0].message.content
    assert text == "Hello"


def test_sdk_logprobs(server, fake):
    client = server.openai()
    r = client.chat.completions.create(model="chat", messages=USER, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert [t.token for t in content] == ["Hello", " world", "!"]  # EOS is not text
    assert content[0].logprob == -0.25 and content[0].bytes == list(b"Hello")
    assert [a.token for a in content[1].top_logprobs] == [" world", "alt1"]
    assert _sent(fake)[1]["parameters"]["top_n_tokens"] == 2
    chunks = list(
        client.chat.completions.create(
            model="chat", messages=USER, logprobs=True, stream=True, stop=["!"]
        )
    )
    tokens = [
        t.token
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert tokens == ["Hello", " world"]  # the cut "!" is not reported
    c = client.completions.create(model="raw", prompt="p", logprobs=1, max_tokens=2)
    lp = c.choices[0].logprobs
    assert lp.tokens == ["Hello", " world"] and lp.text_offset == [0, 5]
    assert lp.top_logprobs == [{"Hello": -0.25}, {" world": -0.25}]


def test_sdk_json_mode_sends_a_grammar(server, fake):
    fake.set_reply('{"a"', ": 1}")
    r = server.openai().chat.completions.create(
        model="chat", messages=USER, response_format={"type": "json_object"}
    )
    assert r.choices[0].message.content == '{"a": 1}'
    assert _sent(fake)[1]["parameters"]["grammar"]["type"] == "regex"


def test_sdk_max_tokens_zero_generates_nothing(server, fake):
    r = server.openai().completions.create(model="raw", prompt="p", max_tokens=0)
    assert r.choices[0].text == "" and r.choices[0].finish_reason == "length"
    assert fake.generations == []


def test_sdk_empty_prompt_is_400(server, fake):
    with pytest.raises(openai.BadRequestError, match="empty prompt"):
        server.openai().completions.create(model="raw", prompt="")
    assert fake.generations == []


# -- errors through the SDK ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "status,kind,error,code",
    [
        (422, "validation", openai.BadRequestError, 400),
        (424, "generation", openai.InternalServerError, 502),
        (429, "overloaded", openai.RateLimitError, 429),
        (503, "healthcheck", openai.InternalServerError, 503),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_sdk_tgi_http_errors(server, fake, status, kind, error, code, stream):
    fake.behaviour.status = status
    fake.behaviour.error_body = {"error": f"tgi says {status}", "error_type": kind}
    with pytest.raises(error) as exc:
        r = server.openai().chat.completions.create(model="chat", messages=USER, stream=stream)
        list(r) if stream else None
    assert exc.value.status_code == code
    assert f"tgi says {status}" in exc.value.message


@pytest.mark.parametrize("stream", [False, True])
def test_sdk_tgi_validation_is_400(server, fake, stream):
    fake.info["max_total_tokens"] = 10  # a real validation failure inside the fake
    with pytest.raises(openai.BadRequestError, match="must be <= 10") as exc:
        r = server.openai().chat.completions.create(
            model="chat", messages=USER, max_tokens=50, stream=stream
        )
        list(r) if stream else None
    assert exc.value.code == "context_length_exceeded"


@pytest.mark.parametrize(
    "kind,error",
    [("overloaded", openai.RateLimitError), ("generation", openai.InternalServerError)],
)
def test_sdk_error_event_before_any_token_is_an_http_error(server, fake, kind, error):
    fake.error_event = (0, kind, "Model is overloaded" if kind == "overloaded" else "CUDA OOM")
    with pytest.raises(error):
        _chat_stream(server)


def test_sdk_error_event_mid_stream(server, fake):
    fake.set_reply("a", " b", " c", " d")
    fake.error_event = (2, "generation", "Request failed during generation: CUDA OOM")
    fake.behaviour.delay_between_chunks = 0.02
    got = []
    stream = server.openai().chat.completions.create(model="chat", messages=USER, stream=True)
    with pytest.raises(openai.APIError, match="CUDA OOM"):
        for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
    assert "".join(got) == "a b"


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_sdk_dropped_connection_raises(server, fake, kind):
    fake.set_reply("a", " b", " c", " d", " e", " f")
    fake.behaviour.drop_after_chunks = 2
    fake.behaviour.delay_between_chunks = 0.02
    client = server.openai()
    with pytest.raises(
        openai.APIError, match=r"closed the connection|before the answer was complete"
    ):
        if kind == "chat":
            list(client.chat.completions.create(model="chat", messages=USER, stream=True))
        else:
            list(client.completions.create(model="raw", prompt="p", stream=True))


def test_sdk_stream_without_final_event_raises(server, fake):
    fake.omit_final = True
    with pytest.raises(openai.APIError, match="before the answer was complete"):
        _chat_stream(server)


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_sdk_stream_split_at_awkward_bytes(server, fake, kind):
    fake.set_reply("héllo", " wörld", " 日本語", " <tag>", tok("<|x|>", special=True), " & ✓")
    fake.behaviour.split_every = 3
    client = server.openai()
    if kind == "chat":
        chunks = _chat_stream(server)
        text = _text(chunks)
        assert chunks[-1].usage.completion_tokens == 7
    else:
        chunks = list(client.completions.create(model="raw", prompt="p", stream=True))
        text = "".join(c.choices[0].text for c in chunks)
    assert text == "héllo wörld 日本語 <tag> & ✓"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stream", [False, True])
def test_sdk_tgi_down_is_502_naming_the_backend(serve, stream):
    url = f"http://127.0.0.1:{_free_port()}"
    srv = serve({"models": [{"name": "t", "backend": "tgi", "url": url, "connect_timeout": 2}]})
    with pytest.raises(openai.InternalServerError) as exc:
        r = srv.openai().completions.create(model="t", prompt="p", stream=stream)
        list(r) if stream else None
    assert exc.value.status_code == 502
    assert "backend 'tgi' (t[0])" in exc.value.message and "unreachable" in exc.value.message


# -- /info ------------------------------------------------------------------------------------
def test_info_is_read_once_per_deployment(serve):
    with FakeTGI(max_stop_sequences=2) as fake:
        srv = serve({"models": [{"name": "t", "backend": "tgi", "url": fake.url}]})
        client = srv.openai()
        for _ in range(3):
            client.completions.create(model="t", prompt="p", stop=["x", "y", "z"])
        assert [r.path for r in fake.requests].count("/info") == 1
        assert fake.generations[-1]["parameters"]["stop"] == ["x", "y"]


def test_info_unavailable_falls_back_to_four_and_retries_later(serve):
    with FakeTGI(max_stop_sequences=6) as fake:
        fake.info_status = 404
        srv = serve({"models": [{"name": "t", "backend": "tgi", "url": fake.url}]})
        client = srv.openai()
        stops = ["s1", "s2", "s3", "s4", "s5"]
        client.completions.create(model="t", prompt="p", stop=stops)
        client.completions.create(model="t", prompt="p", stop=stops)
        assert [r.path for r in fake.requests].count("/info") == 1  # not on every request
        assert fake.generations[-1]["parameters"]["stop"] == stops[:4]


async def test_info_is_refreshed_after_a_failure():
    with FakeTGI(max_stop_sequences=2) as fake:
        b = backend(url=fake.url)
        await b.start()
        try:
            assert await b.info() == TGIInfo(2, 1024)
            fake.info["max_stop_sequences"] = 5
            assert (await b.info()).max_stop_sequences == 2  # cached
            fake.behaviour.status = 500
            request = build_request("completion", {"model": "m", "prompt": "p"})
            with pytest.raises(UpstreamError):
                async for _ in b.stream(b.prepare(request)):
                    pass
            fake.behaviour.status = 200
            assert (await b.info()).max_stop_sequences == 5  # read again
            await b.health()
            assert fake.requests[-1].path == "/health"
        finally:
            await b.close()


# -- TGI's Messages API (/v1) goes through the openai-compatible adapter ------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_tgi_messages_api_via_openai_compatible(serve, stream):
    with FakeOpenAI() as fake:
        fake.served_model = "tgi"  # any other name would be taken as a LoRA adapter_id
        fake.finish_reason = "stop_sequence"  # TGI /v1 keeps it as is
        entry = {"name": "tgi-messages", "backend": "openai-compatible"}
        entry.update(url=fake.url + "/v1", upstream_model="tgi")
        srv = serve({"models": [entry]})
        r = srv.openai().chat.completions.create(
            model="tgi-messages", messages=USER, stop=["x"], stream=stream
        )
        if stream:
            chunks = list(r)
            assert _text(chunks) == "Hello from upstream" and _finishes(chunks) == ["stop"]
        else:
            assert r.choices[0].finish_reason == "stop" and r.model == "tgi-messages"
        assert fake.requests[-1].json["model"] == "tgi"
        # TGI's /v1 answers 422 to top_p 1.0 and to an OpenAI logit_bias map
        srv.openai().chat.completions.create(model="tgi-messages", messages=USER, top_p=1.0)
        assert "top_p" not in fake.requests[-1].json
        with pytest.raises(openai.BadRequestError) as info:
            srv.openai().chat.completions.create(
                model="tgi-messages", messages=USER, logit_bias={"1": 2}
            )
        assert info.value.param == "logit_bias"
