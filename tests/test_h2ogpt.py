"""The h2oGPT backend against a real Gradio app speaking h2oGPT's `/submit_nochat_api`.

The fake (tests/fakes/h2ogpt_app.py) is checked with the official gradio_client first; then
every test goes through a real inferbridge server with the official openai SDK.
"""

from __future__ import annotations

import ast
import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from gradio_client import Client

from inferbridge.backends.h2ogpt import H2OGPTBackend, H2OGPTSettings, chat_fields, parse_output
from inferbridge.errors import InvalidRequest, UpstreamError, UpstreamUnavailable
from tests.fakes.h2ogpt_app import INVALID_KEY_MSG, FakeH2OGPT
from tests.server import InferbridgeServer

MSG = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeH2OGPT]:
    with FakeH2OGPT() as app:
        yield app


@pytest.fixture(scope="module")
def srv(fake: FakeH2OGPT) -> Iterator[InferbridgeServer]:
    entry = {"backend": "h2ogpt", "url": fake.url, "auth": "alice:wonder"}
    models = [
        {
            **entry,
            "name": "h2o",
            "api_key": "good-key",
            "prompt_type": "human_bot",
            "langchain_mode": "LLM",
            "visible_models": "fake/h2ogpt",
        },
        {**entry, "name": "h2o-badkey", "api_key": "wrong-key"},
        {"backend": "h2ogpt", "url": fake.url, "name": "h2o-nologin", "api_key": "good-key"},
        {**entry, "name": "h2o-quick", "api_key": "good-key", "timeout": 0.5},
    ]
    # no retries or cooldowns: each test sees exactly one upstream attempt
    router = {"retries": 0, "allowed_fails": 1000}
    with InferbridgeServer({"models": models, "router": router}) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh(fake: FakeH2OGPT) -> None:
    fake.reset()


def wait_for(cond: Any, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


# -- the fake, checked with the official client ------------------------------------------------
def test_fake_speaks_h2ogpt_to_the_official_gradio_client(fake: FakeH2OGPT) -> None:
    client = Client(fake.url, auth=("alice", "wonder"), verbose=False, download_files=False)
    try:
        job = client.submit(
            str({"instruction_nochat": "Hi", "stream_output": True, "h2ogpt_key": "good-key"}),
            api_name="/submit_nochat_api",
        )
        final = ast.literal_eval(job.result(timeout=10))
        outputs = [ast.literal_eval(o) for o in job.outputs()]
    finally:
        client.close()
    assert final["response"] == "You said: Hi"
    assert final["save_dict"]["extra_dict"]["ntokens"] == 3
    assert [o["response"] for o in outputs] == ["You ", "You said", "You said: Hi"]
    assert outputs[0]["save_dict"] == {}  # intermediate outputs are blanked
    assert fake.received[0].username == "alice"


# -- chat and completions -----------------------------------------------------------------------
def test_chat_non_stream_payload_and_usage(srv: InferbridgeServer, fake: FakeH2OGPT) -> None:
    raw = srv.openai().chat.completions.with_raw_response.create(model="h2o", messages=MSG)
    r = raw.parse()
    assert r.choices[0].message.content == "You said: Hi"
    assert r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (1, 3)  # from save_dict
    assert raw.headers.get("x-inferbridge-usage-estimated") is None
    got = fake.received[-1]
    assert got.username == "alice"
    assert got.kwargs == {
        "instruction_nochat": "Hi",
        "stream_output": False,
        "h2ogpt_key": "good-key",
        "prompt_type": "human_bot",
        "langchain_mode": "LLM",
        "visible_models": "fake/h2ogpt",
    }


def test_chat_stream_emits_only_new_suffixes(srv: InferbridgeServer, fake: FakeH2OGPT) -> None:
    fake.reply, fake.step = "The quick brown fox jumps", 3
    chunks = list(
        srv.openai().chat.completions.create(
            model="h2o", messages=MSG, stream=True, stream_options={"include_usage": True}
        )
    )
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert "".join(pieces) == "The quick brown fox jumps"
    assert len(pieces) > 3 and pieces[0] == "The"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens == 1
    assert fake.received[-1].kwargs["stream_output"] is True


def test_history_and_system_prompt_reach_h2ogpt(srv: InferbridgeServer, fake: FakeH2OGPT) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "Name a color."}]},
    ]
    r = srv.openai().chat.completions.create(model="h2o", messages=messages)
    assert r.choices[0].message.content == "You said: Name a color."
    kwargs = fake.received[-1].kwargs
    assert kwargs["instruction_nochat"] == "Name a color."
    assert kwargs["system_prompt"] == "You are terse."
    assert kwargs["chat_conversation"] == [("Hi", "Hello!")]
    # prompt side counted by the fake: system + history + instruction words
    assert r.usage.prompt_tokens == 8


def test_params_and_extras_pass_through(srv: InferbridgeServer, fake: FakeH2OGPT) -> None:
    srv.openai().chat.completions.create(
        model="h2o",
        messages=MSG,
        max_tokens=50,
        temperature=0.5,
        top_p=0.9,
        seed=3,
        extra_body={
            "langchain_mode": "UserData",
            "top_k": 5,
            "repetition_penalty": 1.1,
            "text_context_list": ["a doc"],
            "langchain_action": "Query",
        },
    )
    kwargs = fake.received[-1].kwargs
    assert kwargs["langchain_mode"] == "UserData"  # the client's extra wins over the entry
    assert kwargs["max_new_tokens"] == 50 and kwargs["temperature"] == 0.5
    assert kwargs["top_p"] == 0.9 and kwargs["seed"] == 3 and kwargs["do_sample"] is True
    assert kwargs["top_k"] == 5 and kwargs["repetition_penalty"] == 1.1
    assert kwargs["text_context_list"] == ["a doc"] and kwargs["langchain_action"] == "Query"
    srv.openai().chat.completions.create(model="h2o", messages=MSG, temperature=0)
    assert fake.received[-1].kwargs["do_sample"] is False


def test_unsupported_parameter_is_a_400(srv: InferbridgeServer) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        srv.openai().chat.completions.create(model="h2o", messages=MSG, presence_penalty=1.0)
    assert "presence_penalty" in str(err.value)


@pytest.mark.parametrize("stream", [False, True])
def test_completions_send_the_prompt_plain(
    srv: InferbridgeServer, fake: FakeH2OGPT, stream: bool
) -> None:
    client = srv.openai()
    if stream:
        text = "".join(
            c.choices[0].text
            for c in client.completions.create(model="h2o", prompt="Once upon", stream=True)
            if c.choices
        )
    else:
        r = client.completions.create(model="h2o", prompt="Once upon")
        text = r.choices[0].text
        assert r.usage.completion_tokens == 4
    assert text == "You said: Once upon"
    kwargs = fake.received[-1].kwargs
    assert kwargs["instruction_nochat"] == "Once upon"
    assert kwargs["prompt_type"] == "plain" and kwargs["system_prompt"] == ""
    assert "chat_conversation" not in kwargs


def test_usage_estimated_without_save_dict_counts(srv: InferbridgeServer, fake: FakeH2OGPT) -> None:
    fake.report_usage = False
    raw = srv.openai().chat.completions.with_raw_response.create(model="h2o", messages=MSG)
    assert raw.headers.get("x-inferbridge-usage-estimated") == "true"
    assert raw.parse().usage.completion_tokens > 0


def test_finish_length_when_max_new_tokens_reached(srv: InferbridgeServer) -> None:
    r = srv.openai().chat.completions.create(model="h2o", messages=MSG, max_tokens=2)
    assert r.choices[0].message.content == "You said:"
    assert r.choices[0].finish_reason == "length"


def test_stop_string_cuts_and_cancels_the_job(srv: InferbridgeServer, fake: FakeH2OGPT) -> None:
    stream = srv.openai().chat.completions.create(
        model="h2o", messages=[{"role": "user", "content": "slow stop"}], stop=["w5"], stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "w0 w1 w2 w3 w4 "
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert wait_for(lambda: "slow stop" in fake.cancelled)


# -- errors ---------------------------------------------------------------------------------------
def test_invalid_configured_key_is_a_502_naming_the_backend(srv: InferbridgeServer) -> None:
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as err:
            srv.openai().chat.completions.create(model="h2o-badkey", messages=MSG, stream=stream)
        assert err.value.status_code == 502
        message = str(err.value)
        assert "h2ogpt" in message and "h2ogpt_key" in message and "Invalid Access Key" in message


def test_invalid_client_key_is_a_400(srv: InferbridgeServer, fake: FakeH2OGPT) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        srv.openai().chat.completions.create(
            model="h2o", messages=MSG, extra_body={"h2ogpt_key": "nope"}
        )
    assert err.value.body["param"] == "h2ogpt_key"
    assert fake.received[-1].kwargs["h2ogpt_key"] == "nope"
    # a valid key from the client replaces a wrong one in the entry
    r = srv.openai().chat.completions.create(
        model="h2o-badkey", messages=MSG, extra_body={"h2ogpt_key": "client-key"}
    )
    assert r.choices[0].message.content == "You said: Hi"
    assert INVALID_KEY_MSG not in r.choices[0].message.content


def test_upstream_exception_is_a_502(srv: InferbridgeServer) -> None:
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as err:
            srv.openai().chat.completions.create(
                model="h2o", messages=[{"role": "user", "content": "fail now"}], stream=stream
            )
        assert "CUDA out of memory" in str(err.value)


def test_job_failing_mid_stream_is_an_error_event(srv: InferbridgeServer) -> None:
    stream = srv.openai().chat.completions.create(
        model="h2o", messages=[{"role": "user", "content": "crash soon"}], stream=True
    )
    got = []
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            got.append(chunk)
    assert "GPU fell off the bus" in str(err.value)
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "partial"


def test_conversation_must_end_with_user(srv: InferbridgeServer) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        srv.openai().chat.completions.create(
            model="h2o", messages=[*MSG, {"role": "assistant", "content": "Hel"}]
        )
    assert err.value.body["param"] == "messages"


def test_login_from_the_user_field(srv: InferbridgeServer, fake: FakeH2OGPT) -> None:
    r = srv.openai().chat.completions.create(model="h2o", messages=MSG, user="bob:builder")
    assert r.choices[0].message.content == "You said: Hi"
    assert fake.received[-1].username == "bob"
    assert "user" not in fake.received[-1].kwargs
    with pytest.raises(openai.BadRequestError) as err:
        srv.openai().chat.completions.create(model="h2o", messages=MSG, user="bob:wrong")
    assert err.value.body["param"] == "user" and "bob" in str(err.value)


def test_missing_login_is_a_502(srv: InferbridgeServer) -> None:
    with pytest.raises(openai.InternalServerError) as err:
        srv.openai().chat.completions.create(model="h2o-nologin", messages=MSG)
    assert "requires a login" in str(err.value) and "h2o-nologin" in str(err.value)


def test_job_past_the_timeout_is_a_504_and_cancelled(
    srv: InferbridgeServer, fake: FakeH2OGPT
) -> None:
    with pytest.raises(openai.APIStatusError) as err:  # stop: streamed upstream, not here
        srv.openai().chat.completions.create(
            model="h2o-quick", messages=[{"role": "user", "content": "slow timeout"}], stop=["!"]
        )
    assert err.value.status_code == 504
    assert wait_for(lambda: "slow timeout" in fake.cancelled)


def test_server_side_cancel_is_an_error_not_an_empty_answer(
    srv: InferbridgeServer, fake: FakeH2OGPT
) -> None:
    prompt = [{"role": "user", "content": "slow cancelled"}]
    stream = srv.openai().chat.completions.create(model="h2o", messages=prompt, stream=True)
    got = []
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            got.append(chunk)
            if len(got) == 3:
                assert fake.cancel_all() == 1
    assert "without an answer" in str(err.value)

    result: dict[str, Any] = {}

    def call() -> None:
        try:
            srv.openai().chat.completions.create(model="h2o", messages=prompt)
        except openai.APIStatusError as exc:
            result["error"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    assert wait_for(lambda: fake.active == 1)
    fake.cancel_all()
    thread.join(10)
    assert result["error"].status_code == 502


# -- concurrency and disconnects ----------------------------------------------------------------
def test_concurrent_burst_runs_in_parallel_and_loop_stays_responsive(
    srv: InferbridgeServer, fake: FakeH2OGPT
) -> None:
    client = srv.async_openai()

    async def one(i: int) -> str:
        stream = await client.chat.completions.create(
            model="h2o", messages=[{"role": "user", "content": f"n{i}"}], stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def health() -> list[float]:
        await asyncio.sleep(0.3)
        times = []
        async with httpx.AsyncClient(base_url=srv.url) as http:
            for _ in range(3):
                start = time.monotonic()
                assert (await http.get("/health")).status_code == 200
                times.append(time.monotonic() - start)
                await asyncio.sleep(0.1)
        return times

    async def scenario() -> tuple[float, list[str], float, list[float]]:
        await asyncio.gather(*(one(i) for i in range(8)))  # the pool grows to 8 clients
        fake.reply, fake.step, fake.delay = "alpha beta gamma delta epsilon zeta", 3, 0.08
        start = time.monotonic()
        await one(99)
        single = time.monotonic() - start  # ~1 s: 12 outputs, 80 ms apart
        start = time.monotonic()
        *texts, health_times = await asyncio.gather(*(one(i) for i in range(8)), health())
        return single, texts, time.monotonic() - start, health_times

    single, texts, elapsed, health_times = asyncio.run(scenario())
    assert texts == [fake.reply] * 8
    assert elapsed < 8 * single / 2, (elapsed, single)  # serial would take 8 * single
    assert fake.max_active >= 6
    # a blocking call on the event loop would stall /health for a whole job (~1 s)
    assert max(health_times) < 0.8, health_times


def test_client_disconnect_cancels_only_its_own_job(
    srv: InferbridgeServer, fake: FakeH2OGPT
) -> None:
    other: dict[str, str] = {}

    def neighbour() -> None:  # runs on the same deployment meanwhile; must not be hurt
        stream = srv.openai().chat.completions.create(
            model="h2o",
            messages=[{"role": "user", "content": "slow neighbour"}],
            stream=True,
            max_tokens=30,
        )
        other["text"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    thread = threading.Thread(target=neighbour)
    thread.start()
    stream = srv.openai().chat.completions.create(
        model="h2o", messages=[{"role": "user", "content": "slow leaver"}], stream=True
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert wait_for(lambda: "slow leaver" in fake.cancelled)
    thread.join(10)
    assert other["text"] == " ".join(f"w{i}" for i in range(30))
    assert "slow neighbour" in fake.finished


# -- units: message conversion and output parsing ---------------------------------------------
def test_chat_fields_merge_fold_and_reject() -> None:
    fields = chat_fields(
        [
            {"role": "system", "content": "S1"},
            {"role": "assistant", "content": "Welcome"},
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": ""},
            {"role": "assistant", "content": "c"},
            {"role": "tool", "content": "42"},
            {"role": "user", "content": "and?"},
        ]
    )
    assert fields == {
        "instruction_nochat": "# Tool result:\n42\n\nand?",
        "system_prompt": "S1",
        "chat_conversation": [("", "Welcome"), ("a\n\nb", "c")],
    }
    with pytest.raises(InvalidRequest):
        chat_fields(
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                }
            ]
        )
    with pytest.raises(InvalidRequest):
        chat_fields([{"role": "system", "content": "only a system prompt"}])


def test_parse_output_is_a_literal_parser_not_eval() -> None:
    assert parse_output("{'response': 'x', 'ok': True, 'n': None}") == {
        "response": "x",
        "ok": True,
        "n": None,
    }
    assert parse_output('{"response": "x", "ok": true}') == {"response": "x", "ok": True}
    with pytest.raises(ValueError):
        parse_output("__import__('os').getcwd()")
    with pytest.raises(ValueError):
        parse_output("['not', 'a', 'dict']")


def test_gradio_queue_full_is_a_503_and_app_errors_keep_the_message() -> None:
    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError

    backend = H2OGPTBackend(H2OGPTSettings(name="m", backend="h2ogpt", url="http://h:7860"))
    with pytest.raises(UpstreamUnavailable) as busy:
        backend._job_failed(QueueError("Queue is full! Please try again."))
    assert busy.value.status == 503 and "h2ogpt" in busy.value.message
    with pytest.raises(UpstreamError, match=r"backend 'h2ogpt' \(m\).*boom"):
        backend._job_failed(AppError("boom"))
