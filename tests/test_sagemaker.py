"""The SageMaker backend end to end: boto3 and the openai SDK against a fake SageMaker endpoint.

The fake speaks InvokeEndpoint / InvokeEndpointWithResponseStream byte for byte (AWS event
stream framing included); it is first checked with the real boto3 client, then driven through
inferbridge with the official openai SDK. No AWS account is involved: dummy credentials, and
the client's endpoint_url points at the fake.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import boto3
import botocore.exceptions
import openai
import pytest

from inferbridge.backends import registry
from inferbridge.backends.sagemaker import aws_error, container_error
from inferbridge.config import ConfigError, load_config
from inferbridge.errors import UpstreamError, UpstreamTimeout
from inferbridge.request import InferenceRequest
from tests.fakes.sagemaker import FakeSageMaker, payload_part
from tests.server import InferbridgeServer

MESSAGES = [{"role": "user", "content": "Say hello"}]
LLAMA3_PROMPT = (
    "<|start_header_id|>user<|end_header_id|>\n\nSay hello<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


@pytest.fixture(scope="module", autouse=True)
def aws_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION"):
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module")
def module_fake() -> Iterator[FakeSageMaker]:
    with FakeSageMaker() as fake:
        yield fake


@pytest.fixture
def fake(module_fake: FakeSageMaker) -> FakeSageMaker:
    module_fake.reset()
    return module_fake


def entry(fake: FakeSageMaker, name: str, **kw: object) -> dict[str, object]:
    return {
        "name": name,
        "backend": "sagemaker",
        "region": "us-east-1",
        "url": fake.url,
        "endpoint_name": "my-endpoint",
        "timeout": 5,
        **kw,
    }


def models(f: FakeSageMaker) -> list[dict[str, object]]:
    return [
        entry(
            f,
            "llama",
            prompt_template="llama3",
            custom_attributes="accept_eula=true",
            inference_component="ic-1",
            headers={"X-Test": "yes"},
        ),
        entry(f, "chat", payload="messages"),
        entry(f, "missing", endpoint_name="nope"),
        entry(f, "six-stops", max_stop_sequences=6),
    ]


@pytest.fixture(scope="module")
def proxy(module_fake: FakeSageMaker) -> Iterator[InferbridgeServer]:
    with InferbridgeServer({"models": models(module_fake)}) as server:
        yield server


@pytest.fixture
def client(proxy: InferbridgeServer) -> openai.OpenAI:
    return proxy.openai()


@pytest.fixture
def fresh(serve, fake) -> openai.OpenAI:
    """A server of its own, for tests that fail deployments (the router remembers failures)."""
    return serve({"models": models(fake)}).openai()


def runtime(fake: FakeSageMaker):  # the official client, pointed at the fake
    return boto3.client("sagemaker-runtime", region_name="us-east-1", endpoint_url=fake.url)


def tgi_body(**parameters: object) -> bytes:
    return json.dumps(
        {"inputs": "Hi", "parameters": {"details": True, **parameters}, "stream": True}
    ).encode()


# -- the fake, checked with boto3 --------------------------------------------------------------
def test_fake_frames_match_the_reference_vector():
    frame = payload_part(b'data:{"token":{"text":"Hi"}}\n\n')
    assert len(frame) == 135
    assert frame[:12].hex() == "000000870000005974535abb"
    assert frame[-4:].hex() == "44d21e65"


def test_boto3_passes_payload_parts_through_as_cut(fake):
    fake.part_size = 7
    fake.behaviour.split_every = 61  # and the binary framing itself arrives in 61-byte reads
    r = runtime(fake).invoke_endpoint_with_response_stream(
        EndpointName="my-endpoint", Body=tgi_body(), ContentType="application/json"
    )
    parts = [event["PayloadPart"]["Bytes"] for event in r["Body"]]
    assert parts[0] == b'data:{"' and all(len(p) <= 7 for p in parts)
    lines = b"".join(parts).split(b"\n\n")
    assert json.loads(lines[0][5:])["token"]["text"] == " Hello"
    assert json.loads(lines[-2][5:])["details"]["input_length"] == 7
    assert fake.requests[-1].path == "/endpoints/my-endpoint/invocations-response-stream"


def test_boto3_raises_modelled_stream_exceptions(fake):
    fake.stream_error = ("ModelStreamError", "model went away")
    r = runtime(fake).invoke_endpoint_with_response_stream(
        EndpointName="my-endpoint", Body=tgi_body()
    )
    events = iter(r["Body"])
    assert "PayloadPart" in next(events)
    with pytest.raises(botocore.exceptions.EventStreamError) as info:
        next(events)
    assert info.value.response["Error"] == {
        "Code": "ModelStreamError",
        "Message": "model went away",
    }
    assert aws_error("sm", info.value).status == 502


def test_boto3_sees_container_4xx_as_model_error(fake):
    with pytest.raises(botocore.exceptions.ClientError) as info:
        runtime(fake).invoke_endpoint(
            EndpointName="my-endpoint",
            Body=json.dumps({"inputs": "x", "parameters": {"max_new_tokens": 0}}),
        )
    response = info.value.response
    assert response["Error"]["Code"] == "ModelError"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert response["OriginalStatusCode"] == 422
    assert json.loads(response["OriginalMessage"])["error_type"] == "validation"
    err = aws_error("sm", info.value)
    assert err.status == 400 and "max_new_tokens" in err.message


# -- TGI payload through inferbridge -----------------------------------------------------------
def test_chat_non_stream(client, fake):
    r = client.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=50)
    assert r.choices[0].message.content == " Hello there, friend."
    assert r.choices[0].finish_reason == "stop"
    # generated_tokens from TGI details (EOS included); the prompt side is estimated
    assert r.usage.completion_tokens == 6
    assert r.usage.prompt_tokens == -(-len(LLAMA3_PROMPT) // 4)
    sent = fake.requests[-1]
    assert sent.path == "/endpoints/my-endpoint/invocations"
    assert sent.json == {
        "inputs": LLAMA3_PROMPT,
        "stream": False,
        "parameters": {
            "details": True,
            "return_full_text": False,
            "max_new_tokens": 50,
            "stop": ["<|eot_id|>", "<|end_of_text|>"],
        },
    }
    assert sent.headers["X-Amzn-SageMaker-Custom-Attributes"] == "accept_eula=true"
    assert sent.headers["X-Amzn-SageMaker-Inference-Component"] == "ic-1"
    assert sent.headers["X-Test"] == "yes"
    assert "/us-east-1/sagemaker/aws4_request" in sent.headers["Authorization"]


def test_chat_stream_split_everywhere(client, fake):
    fake.part_size = 5  # data: lines split across PayloadParts, mid-JSON
    fake.behaviour.split_every = 29  # and frames split across HTTP reads
    chunks = list(
        client.chat.completions.create(
            model="llama", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " Hello there, friend."  # the special EOS token's text is not emitted
    assert [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ] == ["stop"]
    assert chunks[-1].usage.prompt_tokens == 7 and chunks[-1].usage.completion_tokens == 6
    assert fake.requests[-1].json["stream"] is True
    assert fake.requests[-1].headers["X-Amzn-SageMaker-Accept"] == "text/event-stream"


def test_streams_that_complete_give_their_connection_back(client, fake):
    fake.tokens = [" a"]
    fake.behaviour.delay_between_chunks = 0.2  # the end of the body comes after the answer
    for _ in range(2):
        list(client.completions.create(model="llama", prompt="x", stream=True))
        time.sleep(0.4)  # the reader finishes the body in the background
    assert len(set(fake.peers)) == 1  # one pooled connection, not a TLS handshake per stream


def test_text_split_inside_utf8_characters(client, fake):
    fake.tokens = [" héllo", " wörld", " 🙂"]
    fake.part_size = 3  # PayloadParts end inside multi-byte characters
    chunks = list(client.completions.create(model="llama", prompt="x", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == " héllo wörld 🙂"


# Tokens whose text a character-based estimate (4 per token) gets wrong: 6 of them are 98
# characters, "25 tokens".
LONG_TOKENS = [" Incomprehensibilities", " notwithstanding", ",", " antidisestablishment"]
LONG_TOKENS += [" counterrevolutionaries", " overwhelmingly", " ok"]


@pytest.mark.parametrize("input_length", [True, False])
def test_stream_usage_is_the_container_s_count(client, fake, input_length):
    fake.tokens = LONG_TOKENS
    fake.stream_input_length = input_length  # False: a container without it (older TGI)
    chunks = list(
        client.chat.completions.create(
            model="llama",
            messages=MESSAGES,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(LONG_TOKENS[:6]) and chunks[-2].choices[0].finish_reason == "length"
    usage = chunks[-1].usage
    assert usage.completion_tokens == 6  # the final event's details.generated_tokens
    assert usage.completion_tokens != -(-len(text) // 4)
    # the final event's details.input_length, else estimated from the prompt sent
    assert usage.prompt_tokens == (7 if input_length else -(-len(LLAMA3_PROMPT) // 4))


def test_non_stream_usage_is_the_container_s_count(client, fake):
    fake.tokens = LONG_TOKENS
    raw = client.chat.completions.with_raw_response.create(
        model="llama", messages=MESSAGES, max_tokens=6
    )
    r = raw.parse()
    assert r.choices[0].message.content == "".join(LONG_TOKENS[:6])
    assert r.usage.completion_tokens == 6  # details.generated_tokens
    # TGI gives the prompt count in a header SageMaker drops: estimated, and said so
    assert r.usage.prompt_tokens == -(-len(LLAMA3_PROMPT) // 4)
    assert raw.headers["x-inferbridge-usage-estimated"] == "true"


@pytest.mark.parametrize("stream", [False, True])
def test_without_details_usage_is_estimated(client, fake, stream):
    fake.details = False
    raw = client.completions.with_raw_response.create(
        model="llama",
        prompt="Once upon",
        stream=stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    )
    if stream:
        chunks = list(raw.parse())
        usage, reason = chunks[-1].usage, chunks[-2].choices[0].finish_reason
    else:
        r = raw.parse()
        usage, reason = r.usage, r.choices[0].finish_reason
        assert raw.headers["x-inferbridge-usage-estimated"] == "true"
    assert reason == "stop"
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        3,
        6,
    )  # len(" Hello there, friend.") / 4


def test_completions_length_stream_and_not(client, fake):
    r = client.completions.create(model="llama", prompt="Once", max_tokens=2)
    assert r.choices[0].text == " Hello there" and r.choices[0].finish_reason == "length"
    assert fake.requests[-1].json["inputs"] == "Once"
    assert fake.requests[-1].json["parameters"]["max_new_tokens"] == 2
    chunks = list(
        client.completions.create(model="llama", prompt="Once", max_tokens=2, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == " Hello there"
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_is_cut_from_the_text(client, fake, stream):
    kw = {"model": "llama", "prompt": "Once", "stop": [","]}
    if stream:
        chunks = list(client.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].text for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        choice = client.completions.create(**kw).choices[0]
        text, reason = choice.text, choice.finish_reason
    assert text == " Hello there" and reason == "stop"  # TGI keeps "," in its text


def test_parameters_are_translated_for_tgi(client, fake):
    client.completions.create(
        model="llama",
        prompt="x",
        temperature=0,
        top_p=1.0,
        seed=-1,
        frequency_penalty=0.5,
        extra_body={"top_k": 5, "repetition_penalty": 1.1},
    )
    assert fake.requests[-1].json["parameters"] == {
        "details": True,
        "return_full_text": False,
        "do_sample": False,
        "frequency_penalty": 0.5,
        "repetition_penalty": 1.1,
    }
    client.completions.create(
        model="llama", prompt="x", temperature=0.7, top_p=0.9, seed=3, extra_body={"top_k": 0}
    )
    params = fake.requests[-1].json["parameters"]
    assert (params["temperature"], params["top_p"], params["seed"]) == (0.7, 0.9, 3)
    assert params["do_sample"] is True and "top_k" not in params


def test_more_stops_than_tgi_takes_are_enforced_by_the_proxy(client, fake):
    fake.tokens = [" Hello", " there", ",", *[" and so on"] * 20]
    fake.behaviour.delay_between_chunks = 0.1  # the container would go on for 2 s
    r = client.completions.create(model="llama", prompt="x", stop=["A", "B", "C", "D", ","])
    assert fake.requests[-1].json["parameters"]["stop"] == ["A", "B", "C", "D"]
    assert r.choices[0].text == " Hello there"  # "," was not sent: cut proxy-side
    assert r.choices[0].finish_reason == "stop"
    # streamed from the container even for this non-streamed answer, so that the cut can
    # end the call: the connection is shut at once, not read on to the container's end
    assert fake.requests[-1].path.endswith("/invocations-response-stream")
    deadline = time.monotonic() + 1
    while not fake.transports[-1].is_closing() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.transports[-1].is_closing()
    assert r.usage.completion_tokens == 3  # the token events read up to the cut
    r = client.chat.completions.create(model="llama", messages=MESSAGES, stop=["A", ","])
    assert fake.requests[-1].json["parameters"]["stop"] == [
        "A",
        ",",
        "<|eot_id|>",
        "<|end_of_text|>",
    ]  # the client's first, EOS last
    assert r.choices[0].message.content == " Hello there"


def test_max_tokens_zero_generates_nothing(client, fake):
    r = client.completions.create(model="llama", prompt="x", max_tokens=0)
    assert r.choices[0].text == "" and r.choices[0].finish_reason == "length"
    assert fake.requests == []


def test_unsupported_parameter_is_a_400(client, fake):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="llama", messages=MESSAGES, presence_penalty=1)
    assert "presence_penalty" in info.value.message
    assert fake.requests == []


# -- errors --------------------------------------------------------------------------------------
def test_container_validation_error_is_a_400(fresh, fake):
    # this entry lets 5 stops through; the container allows 4 and answers 422 (ModelError 424)
    with pytest.raises(openai.BadRequestError) as info:
        fresh.completions.create(model="six-stops", prompt="x", stop=list("ABCDE"))
    assert "`stop` supports up to 4 stop sequences" in info.value.message
    assert "sagemaker" in info.value.message


def test_container_5xx_is_a_502(fresh, fake):
    fake.container_error = (500, {"error": "CUDA out of memory", "error_type": "generation"})
    with pytest.raises(openai.InternalServerError) as info:
        fresh.completions.create(model="llama", prompt="x", stream=True)
    assert info.value.status_code == 502 and "CUDA out of memory" in info.value.message


def test_unknown_endpoint_names_the_configuration(fresh, fake):
    with pytest.raises(openai.InternalServerError) as info:
        fresh.completions.create(model="missing", prompt="x")
    assert info.value.status_code == 502
    assert "Endpoint nope of account" in info.value.message
    assert "endpoint_name" in info.value.message


@pytest.mark.parametrize(
    ("status", "code", "error", "expected"),
    [
        (400, "ThrottlingException", openai.RateLimitError, 429),
        (429, "ModelNotReadyException", openai.RateLimitError, 429),
        (503, "ServiceUnavailable", openai.InternalServerError, 503),
        (400, "ValidationError", openai.BadRequestError, 400),
        (403, "UnrecognizedClientException", openai.InternalServerError, 502),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_aws_errors_are_mapped(fresh, fake, status, code, error, expected, stream):
    fake.aws_error = (status, code, "aws says no")
    with pytest.raises(error) as info:
        fresh.completions.create(model="llama", prompt="x", stream=stream)
    assert info.value.status_code == expected and "aws says no" in info.value.message


def test_transport_and_container_errors_map_to_statuses():
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError, ReadTimeoutError

    assert aws_error("sm", ReadTimeoutError(endpoint_url="http://x")).status == 504
    unreachable = aws_error("sm", EndpointConnectionError(endpoint_url="http://x"))
    assert unreachable.status == 502 and "unreachable" in unreachable.message
    assert "credentials" in aws_error("sm", NoCredentialsError()).message
    tgi_event = {"error": "Input validation error: `top_k`", "error_type": "validation"}
    assert container_error("sm", tgi_event).status == 400
    assert (
        container_error("sm", {"error": "Model is overloaded", "error_type": "overloaded"}).status
        == 429
    )
    chat_event = {"error": {"message": "bad tools", "http_status_code": 422}}
    assert container_error("sm", chat_event).status == 400
    assert container_error("sm", {"error": "CUDA", "error_type": "generation"}).status == 502


def test_stream_exception_event_mid_stream_raises_in_the_sdk(fresh, fake):
    fake.stream_error = ("ModelStreamError", "model went away")
    fake.stream_error_after = 2
    stream = fresh.completions.create(model="llama", prompt="x", stream=True)
    with pytest.raises(openai.APIError) as info:
        for _ in stream:
            pass
    assert "model went away" in info.value.message


def test_stream_exception_before_the_first_token_is_an_http_error(fresh, fake):
    fake.stream_error = ("InternalStreamFailure", "try again")
    fake.stream_error_after = 0
    with pytest.raises(openai.InternalServerError) as info:
        fresh.completions.create(model="llama", prompt="x", stream=True)
    assert info.value.status_code == 502 and "InternalStreamFailure" in info.value.message


def test_container_error_event_mid_stream(fresh, fake):
    fake.container_stream_error = {
        "error": "Request failed during generation: boom",
        "error_type": "generation",
    }
    fake.behaviour.delay_between_chunks = 0.05  # the token arrives before the error
    stream = fresh.chat.completions.create(model="llama", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError) as info:
        for _ in stream:
            pass
    assert "boom" in info.value.message


def test_connection_dropped_mid_stream(fresh, fake):
    fake.behaviour.drop_after_chunks = 2
    stream = fresh.completions.create(model="llama", prompt="x", stream=True)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


@pytest.mark.parametrize("stream", [False, True])
async def test_total_timeout_ends_the_call(fake, stream):
    fake.behaviour.delay_first_byte = 1.5
    config = load_config(data={"models": [entry(fake, "m", timeout=0.3)]}).models[0]
    backend = registry.create(config)
    await backend.start()
    request = InferenceRequest("completion", "m", {}, prompt="x", stream=stream)
    started = time.monotonic()
    try:
        with pytest.raises(UpstreamTimeout, match="did not answer in time"):
            async for _ in backend.stream(request):
                pass
    finally:
        await backend.close()
    assert time.monotonic() - started < 1


def test_client_disconnect_stops_the_upstream_stream(fresh, fake):
    fake.behaviour.delay_between_chunks = 1.5  # the reader is blocked in a socket read...
    stream = fresh.completions.create(model="llama", prompt="x", stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 1  # ...and is woken up at once, closing the connection
    while not fake.transports[-1].is_closing() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.transports[-1].is_closing()


# -- Messages API payload ----------------------------------------------------------------------
def test_messages_payload_chat(client, fake):
    r = client.chat.completions.create(model="chat", messages=MESSAGES, top_p=1.0, temperature=0.5)
    assert r.choices[0].message.content == " Hello there, friend."
    assert r.usage.prompt_tokens == 7 and r.usage.completion_tokens == 6
    assert fake.requests[-1].json == {"messages": MESSAGES, "temperature": 0.5, "stream": False}
    chunks = list(
        client.chat.completions.create(
            model="chat",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=3,
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == " Hello there,"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.prompt_tokens == 7
    assert fake.requests[-1].json["stream_options"] == {"include_usage": True}


def test_messages_payload_completions(client, fake):
    fake.part_size = 3
    chunks = list(client.completions.create(model="chat", prompt="Once", stream=True, stop=[","]))
    assert "".join(c.choices[0].text for c in chunks) == " Hello there,"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert fake.requests[-1].json["prompt"] == "Once"


# -- configuration and translation ------------------------------------------------------------
def test_aws_profile_credentials_sign_the_requests(serve, fake, tmp_path, monkeypatch):
    credentials = tmp_path / "credentials"
    credentials.write_text(
        "[ib-test]\naws_access_key_id = AKIDPROFILE\naws_secret_access_key = s\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    srv = serve({"models": [entry(fake, "p", aws_profile="ib-test")]})
    srv.openai().completions.create(model="p", prompt="x")
    assert "Credential=AKIDPROFILE/" in fake.requests[-1].headers["Authorization"]


async def test_a_missing_region_fails_at_start_up(fake):
    config = load_config(data={"models": [entry(fake, "m", region=None)]}).models[0]
    backend = registry.create(config)
    with pytest.raises(UpstreamError, match=r"cannot create the SageMaker client.*region"):
        await backend.start()
    await backend.close()


def test_settings_validation():
    with pytest.raises(ConfigError, match="api_key is not used"):
        load_config(data={"models": [{"name": "m", "backend": "sagemaker", "api_key": "k"}]})
    with pytest.raises(ConfigError, match="not a valid SageMaker endpoint name"):
        load_config(data={"models": [{"name": "meta/llama3.1", "backend": "sagemaker"}]})
    cfg = load_config(
        data={
            "models": [
                {
                    "name": "m",
                    "backend": "sagemaker",
                    "upstream_model": "ep-1",
                    "region": "eu-west-1",
                }
            ]
        }
    )
    assert cfg.models[0].describe() == "backend 'sagemaker' (model m, endpoint ep-1 in eu-west-1)"
