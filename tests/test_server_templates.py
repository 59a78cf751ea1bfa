"""Chat templates from the server: TGI and llama.cpp entries without `prompt_template`.

TGI renders each chat with the model's own template (`POST /chat_tokenize`, the BOS its
tokenizer adds read once from `POST /tokenize`); llama.cpp's template is read once from
`GET /props` and rendered here, or, when it is not Jinja (a built-in name), rendered by
llama-server (`POST /apply-template`). A configured template wins. A server that answers
but has no template stops start-up naming the entry; one that cannot be asked is asked on
the first chat request, which fails with a 502 naming the deployment if it still cannot. A
deployment without a template fails chats with a retryable 502, so a model's other
deployments answer.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from inferbridge.backends.llamacpp import LlamaCppBackend
from inferbridge.backends.tgi import TGIBackend
from inferbridge.config import load_config
from inferbridge.errors import DeploymentMisconfigured
from inferbridge.gateway import Gateway
from inferbridge.probe import probe_entry
from tests.fakes.llamacpp import FakeLlamaCpp
from tests.fakes.tgi import FakeTGI

USER = [{"role": "user", "content": "Say hello"}]


def config(*entries: dict[str, Any], **top: Any) -> Any:
    return load_config(data={"models": list(entries), **top}, environ={})


def paths(fake: Any, path: str) -> list[Any]:
    return [r for r in fake.requests if r.path == path]


def free_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def tgi() -> Iterator[FakeTGI]:
    with FakeTGI() as fake:
        yield fake


@pytest.fixture(scope="module")
def llama() -> Iterator[FakeLlamaCpp]:
    with FakeLlamaCpp() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _reset(request: pytest.FixtureRequest) -> None:
    for name in ("tgi", "llama"):
        if name in request.fixturenames:
            request.getfixturevalue(name).reset()


# -- TGI: the model's template through /chat_tokenize -----------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_tgi_chat_uses_the_servers_template(serve, tgi, stream):
    srv = serve({"models": [{"name": "t", "backend": "tgi", "url": tgi.url}]})
    r = srv.openai().chat.completions.create(model="t", messages=USER, stream=stream)
    text = (
        "".join(c.choices[0].delta.content or "" for c in r)
        if stream
        else r.choices[0].message.content
    )
    assert text == "Hello world!"
    # TGI rendered "<s>[INST] Say hello [/INST]"; /generate adds the BOS itself
    assert tgi.generations[-1]["inputs"] == "[INST] Say hello [/INST]"
    asked = paths(tgi, "/chat_tokenize")[-1].json
    assert asked == {"model": "tgi", "messages": USER}  # "tgi": no LoRA adapter_id


def test_tgi_multi_turn_system_parts_and_continuation(serve, tgi):
    tgi.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    client = serve({"models": [{"name": "t", "backend": "tgi", "url": tgi.url}]}).openai()
    messages = [
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hel"},
    ]
    client.chat.completions.create(model="t", messages=messages)
    sent = paths(tgi, "/chat_tokenize")[-1].json["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant"]
    assert sent[1]["content"] == "Hi" and sent[2]["content"].startswith("Hel[[inferbridge-")
    # a trailing assistant message is continued: the prompt ends inside its turn
    assert tgi.generations[-1]["inputs"] == "<|system|>Be terse.</s><|user|>Hi</s><|assistant|>Hel"


def test_tgi_bos_is_kept_when_the_tokenizer_adds_none(serve, tgi):
    tgi.adds_bos = False
    client = serve({"models": [{"name": "t", "backend": "tgi", "url": tgi.url}]}).openai()
    client.chat.completions.create(model="t", messages=USER)
    assert tgi.generations[-1]["inputs"] == "<s>[INST] Say hello [/INST]"


def test_tgi_prefix_token_is_read_once_and_cached(serve, tgi):
    client = serve({"models": [{"name": "t", "backend": "tgi", "url": tgi.url}]}).openai()
    for _ in range(3):
        client.chat.completions.create(model="t", messages=USER)
    assert len(paths(tgi, "/tokenize")) == 1  # at start-up, then cached
    assert len(paths(tgi, "/chat_tokenize")) == 4  # the start-up check, then one per chat
    assert len(tgi.generations) == 3


def test_tgi_template_refusing_the_chat_is_a_400(serve, tgi):
    client = serve({"models": [{"name": "t", "backend": "tgi", "url": tgi.url}]}).openai()
    messages = [{"role": "system", "content": "Be terse."}, *USER]
    with pytest.raises(openai.BadRequestError, match="Only user and assistant roles"):
        client.chat.completions.create(model="t", messages=messages)
    assert tgi.generations == []


def test_tgi_configured_template_wins(serve, tgi):
    entry = {"name": "t", "backend": "tgi", "url": tgi.url, "prompt_template": "chatml"}
    client = serve({"models": [entry]}).openai()
    client.chat.completions.create(model="t", messages=USER)
    assert tgi.generations[-1]["inputs"].startswith("<|im_start|>user\nSay hello<|im_end|>")
    assert paths(tgi, "/chat_tokenize") == [] and paths(tgi, "/tokenize") == []


def test_tgi_completions_are_untouched(serve, tgi):
    client = serve({"models": [{"name": "t", "backend": "tgi", "url": tgi.url}]}).openai()
    client.completions.create(model="t", prompt="<s>raw")
    assert tgi.generations[-1]["inputs"] == "<s>raw"


# -- start-up -------------------------------------------------------------------------------
@pytest.mark.parametrize("why", ["no template", "no route"])
async def test_tgi_without_a_template_is_refused_at_start_up(tgi, why):
    if why == "no template":
        tgi.chat_template = None
    else:
        tgi.chat_tokenize_route = False
    gateway = Gateway(config({"name": "mistral", "backend": "tgi", "url": tgi.url}))
    try:
        with pytest.raises(DeploymentMisconfigured) as exc:
            await gateway.start()
    finally:
        await gateway.close()
    message = exc.value.message
    assert "backend 'tgi' (mistral[0])" in message and "no chat template" in message
    assert "prompt_template" in message
    assert ("TGI reports none" if why == "no template" else "404") in message


async def test_use_server_template_false_skips_the_check(tgi):
    tgi.chat_template = None
    entry = {"name": "m", "backend": "tgi", "url": tgi.url, "use_server_template": False}
    gateway = Gateway(config(entry))
    await gateway.start()  # completions only: no question asked
    await gateway.close()
    assert paths(tgi, "/chat_tokenize") == []


@pytest.mark.parametrize("backend", ["tgi", "llamacpp"])
def test_server_down_at_start_up_fails_the_chat_with_a_502(serve, backend):
    srv = serve({"models": [{"name": "m", "backend": backend, "url": free_url()}]})  # starts
    with pytest.raises(openai.InternalServerError) as exc:
        srv.openai().chat.completions.create(model="m", messages=USER)
    assert exc.value.status_code == 502 and f"backend '{backend}' (m[0])" in exc.value.message


def test_tgi_down_at_start_up_is_asked_at_the_first_chat(serve, tgi):
    tgi.behaviour.status = 503  # still loading
    srv = serve({"models": [{"name": "t", "backend": "tgi", "url": tgi.url}]})
    tgi.behaviour.status = 200
    srv.openai().chat.completions.create(model="t", messages=USER)
    assert tgi.generations[-1]["inputs"] == "[INST] Say hello [/INST]"
    # up without a template later: a 502 naming the deployment, not the client's 400
    tgi.chat_template = None
    with pytest.raises(openai.InternalServerError, match=r"backend 'tgi' \(t\[0\]\)") as exc:
        srv.openai().chat.completions.create(model="t", messages=USER)
    assert exc.value.status_code == 502 and "no chat template" in exc.value.message
    assert exc.value.code == "deployment_misconfigured"


# -- llama.cpp: /props rendered here, or /apply-template ------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_llamacpp_props_template_read_once(serve, llama, stream):
    llama.chat_template = "{{ bos_token }}<u>{{ messages[0]['content'] }}</u>{{ eos_token }}"
    client = serve({"models": [{"name": "l", "backend": "llamacpp", "url": llama.url}]}).openai()
    for _ in range(2):
        r = client.chat.completions.create(model="l", messages=USER, stream=stream)
        list(r) if stream else None
    assert len(paths(llama, "/props")) == 1  # at start-up, then cached
    body = paths(llama, "/completion")[-1].json
    assert body["prompt"] == "<u>Say hello</u></s>" and body["stop"] == ["</s>"]
    assert paths(llama, "/apply-template") == []


def test_llamacpp_builtin_template_name_is_rendered_by_the_server(serve, llama):
    llama.chat_template = "llama3"  # llama-server --chat-template llama3 (not Jinja)
    llama.eos_token = "<|eot_id|>"
    client = serve({"models": [{"name": "l", "backend": "llamacpp", "url": llama.url}]}).openai()
    for _ in range(2):
        client.chat.completions.create(model="l", messages=USER, stop=["x"])
    assert len(paths(llama, "/props")) == 1
    assert len(paths(llama, "/apply-template")) == 3  # the start-up check, then one per chat
    body = paths(llama, "/completion")[-1].json
    assert body["prompt"] == (
        "<|start_header_id|>user<|end_header_id|>\n\nSay hello<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert body["stop"] == ["<|eot_id|>", "x"]
    # continuation: llama-server appends the trailing assistant text
    messages = [*USER, {"role": "assistant", "content": "Hel"}]
    client.chat.completions.create(model="l", messages=messages)
    assert (
        paths(llama, "/completion")[-1]
        .json["prompt"]
        .endswith("<|start_header_id|>assistant<|end_header_id|>\n\nHel")
    )


@pytest.mark.parametrize("template", [None, "llama3"])
async def test_llamacpp_without_a_usable_template_is_refused_at_start_up(llama, template):
    llama.chat_template = template
    llama.apply_template_route = False  # a build from before /apply-template
    gateway = Gateway(config({"name": "llama", "backend": "llamacpp", "url": llama.url}))
    try:
        with pytest.raises(DeploymentMisconfigured) as exc:
            await gateway.start()
    finally:
        await gateway.close()
    message = exc.value.message
    assert "backend 'llamacpp' (llama[0])" in message and "prompt_template" in message
    assert "no POST /apply-template" in message


async def test_llamacpp_embeddings_entry_needs_no_template(llama):
    llama.chat_template = None
    llama.apply_template_route = False
    entry = {"name": "e", "backend": "llamacpp", "url": llama.url, "mode": "embeddings"}
    gateway = Gateway(config(entry))
    await gateway.start()
    await gateway.close()
    assert paths(llama, "/props") == []


def test_llamacpp_configured_template_wins(serve, llama):
    entry = {"name": "l", "backend": "llamacpp", "url": llama.url, "prompt_template": "zephyr"}
    serve({"models": [entry]}).openai().chat.completions.create(model="l", messages=USER)
    assert (
        paths(llama, "/completion")[-1].json["prompt"] == "<|user|>\nSay hello</s>\n<|assistant|>\n"
    )
    assert paths(llama, "/props") == [] and paths(llama, "/apply-template") == []


# -- a misconfigured deployment is retried elsewhere -----------------------------------------
def test_misconfigured_deployment_is_retried_on_the_others(serve, llama):
    with FakeTGI() as bad, FakeTGI() as good:
        bad.behaviour.status = 503  # down at start-up: asked again on the first chat
        models = [
            {"name": "m", "backend": "tgi", "url": bad.url, "weight": 100},
            {"name": "m", "backend": "tgi", "url": good.url},
            # never asks its server: no template configured and use_server_template off
            {"name": "m", "backend": "llamacpp", "url": llama.url, "weight": 100,
             "use_server_template": False},
        ]  # fmt: skip
        client = serve({"models": models}).openai()
        bad.behaviour.status = 200
        bad.chat_template = None  # up, but the model has no template
        for stream in [False, True] * 6:
            r = client.chat.completions.create(model="m", messages=USER, stream=stream)
            text = (
                "".join(c.choices[0].delta.content or "" for c in r)
                if stream
                else (r.choices[0].message.content)
            )
            assert text == "Hello world!"
        assert len(good.generations) == 12
        assert bad.generations == [] and paths(llama, "/completion") == []
        assert paths(bad, "/chat_tokenize")  # tried, and refused for its configuration


# -- inferbridge check --probe ----------------------------------------------------------------
async def test_probe_reports_the_template(tgi, llama):
    cfg = config(
        {"name": "t", "backend": "tgi", "url": tgi.url},
        {"name": "c", "backend": "tgi", "url": tgi.url, "prompt_template": "chatml"},
        {"name": "l", "backend": "llamacpp", "url": llama.url},
        {"name": "n", "backend": "llamacpp", "url": llama.url, "use_server_template": False},
    )
    lines = [await probe_entry(cfg, i) for i in range(4)]
    assert lines[0] == (True, "t[0] (tgi): ok (template from server)")
    assert lines[1] == (True, "c[0] (tgi): ok (template chatml)")
    assert lines[2] == (True, "l[0] (llamacpp): ok (template from server)")
    assert lines[3][0] and "none: set prompt_template" in lines[3][1]
    tgi.chat_template = None
    ok, line = await probe_entry(cfg, 0)
    assert not ok and "no chat template" in line and "prompt_template" in line


def test_backends_expose_the_setting():
    for cls in (TGIBackend, LlamaCppBackend):
        assert cls.Settings.model_fields["use_server_template"].default is True
