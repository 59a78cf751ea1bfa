"""`POST /v1/embeddings`: real sockets, the official clients, every backend through its fake.

The echo backend is checked with the `openai` SDK (its default base64 path included) and
LangChain's `OpenAIEmbeddings`; OpenAI-compatible upstreams (vLLM-like), Azure, Ollama's
`/api/embed` and llama.cpp's `/embedding` through the fakes in tests/fakes/ (whose vectors
are `fake_vector`, so each vector says which input it belongs to); then batching, modes,
validation and routing.
"""

from __future__ import annotations

import base64
import math
import os
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest

from inferbridge.backends.echo import echo_vector
from inferbridge.backends.embedding import decode_base64, encode_base64
from inferbridge.config import load_config
from inferbridge.config_source import ConfigError
from tests.fakes.azure import FakeAzure
from tests.fakes.embeddings import fake_vector
from tests.fakes.llamacpp import FakeLlamaCpp
from tests.fakes.ollama import FakeOllama
from tests.fakes.openai_compat import FakeOpenAI
from tests.server import InferbridgeServer

TEXTS = ["the quick brown fox", "jumps over", "the lazy dog", "hello", "a b c d e f"]


def f32(vector: list[float]) -> list[float]:
    """`vector` rounded to float32, as base64 carries it."""
    return list(struct.unpack(f"<{len(vector)}f", struct.pack(f"<{len(vector)}f", *vector)))


def post(
    server: InferbridgeServer, body: dict[str, Any], path: str = "/embeddings"
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {server.api_key}"}
    return httpx.post(server.base_url + path, json=body, headers=headers, timeout=20)


def vectors(resp: httpx.Response) -> list[Any]:
    data = resp.json()["data"]
    assert [d["index"] for d in data] == list(range(len(data)))
    assert all(d["object"] == "embedding" for d in data)
    return [d["embedding"] for d in data]


# -- echo, through the official clients ---------------------------------------------------
@pytest.fixture(scope="module")
def server() -> Iterator[InferbridgeServer]:
    config = {
        "auth": {"api_keys": ["sk-test"]},
        "models": [
            {"name": "echo", "backend": "echo"},
            {"name": "chat-only", "backend": "echo", "mode": "chat"},
            {"name": "embed-only", "backend": "echo", "mode": "embeddings"},
        ],
    }
    with InferbridgeServer(config) as srv:
        yield srv


def test_sdk_default_is_base64_and_decodes(server: InferbridgeServer) -> None:
    # Without encoding_format the SDK asks for base64 and decodes it itself.
    result = server.openai().embeddings.create(model="echo", input="hello world")
    assert result.object == "list"
    assert result.model == "echo"
    assert len(result.data) == 1
    assert result.data[0].index == 0
    assert result.data[0].embedding == f32(echo_vector("hello world"))
    assert len(result.data[0].embedding) == 16
    assert result.usage.prompt_tokens == 2
    assert result.usage.total_tokens == 2


def test_sdk_float_list_input_in_order(server: InferbridgeServer) -> None:
    result = server.openai().embeddings.create(model="echo", input=TEXTS, encoding_format="float")
    assert [d.index for d in result.data] == list(range(len(TEXTS)))
    assert [d.embedding for d in result.data] == [echo_vector(t) for t in TEXTS]
    assert result.usage.prompt_tokens == sum(len(t.split()) for t in TEXTS)
    norm = math.sqrt(sum(v * v for v in result.data[0].embedding))
    assert norm == pytest.approx(1.0, abs=1e-5)


def test_sdk_token_ids(server: InferbridgeServer) -> None:
    client = server.openai()
    one = client.embeddings.create(model="echo", input=[101, 2023, 102], encoding_format="float")
    assert len(one.data) == 1
    assert one.data[0].embedding == echo_vector([101, 2023, 102])
    assert one.usage.prompt_tokens == 3
    many = client.embeddings.create(model="echo", input=[[1, 2], [3, 4, 5]])
    assert [d.embedding for d in many.data] == [
        f32(echo_vector([1, 2])),
        f32(echo_vector([3, 4, 5])),
    ]
    assert many.usage.prompt_tokens == 5


def test_sdk_dimensions(server: InferbridgeServer) -> None:
    client = server.openai()
    full = client.embeddings.create(model="echo", input="x y", encoding_format="float")
    short = client.embeddings.create(
        model="echo", input="x y", dimensions=4, encoding_format="float"
    )
    assert len(short.data[0].embedding) == 4
    # a renormalized prefix of the longer vector, as OpenAI's dimensions behaves
    prefix = full.data[0].embedding[:4]
    norm = math.sqrt(sum(v * v for v in prefix))
    assert short.data[0].embedding == pytest.approx([v / norm for v in prefix], abs=1e-6)
    big = client.embeddings.create(model="echo", input="x y", dimensions=64)
    assert len(big.data[0].embedding) == 64


def test_base64_on_the_wire(server: InferbridgeServer) -> None:
    resp = post(server, {"model": "echo", "input": ["a", "b"], "encoding_format": "base64"})
    assert resp.status_code == 200
    encoded = vectors(resp)
    assert all(isinstance(e, str) for e in encoded)
    raw = base64.b64decode(encoded[1])
    assert len(raw) == 16 * 4
    assert list(struct.unpack("<16f", raw)) == f32(echo_vector("b"))
    assert resp.json()["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    assert resp.headers["x-inferbridge-model"] == "echo"


def test_async_sdk(server: InferbridgeServer) -> None:
    import asyncio

    async def run() -> list[list[float]]:
        client = server.async_openai()
        result = await client.embeddings.create(model="echo", input=["p", "q"])
        await client.close()
        return [d.embedding for d in result.data]

    assert asyncio.run(run()) == [f32(echo_vector("p")), f32(echo_vector("q"))]


def test_langchain_openai_embeddings(server: InferbridgeServer) -> None:
    from langchain_openai import OpenAIEmbeddings

    embedder = OpenAIEmbeddings(
        model="echo",
        base_url=server.base_url,
        api_key=server.api_key,  # type: ignore[arg-type]
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    docs = embedder.embed_documents(["first doc", "second doc", "third"])
    assert len(docs) == 3
    assert docs[1] == pytest.approx(echo_vector("second doc"), abs=1e-6)
    query = embedder.embed_query("a question")
    assert query == pytest.approx(echo_vector("a question"), abs=1e-6)


def test_base64_round_trip() -> None:
    vector = [0.5, -1.25, 3.0e-8, 1.0e6]
    assert decode_base64("t", encode_base64(vector)) == f32(vector)


# -- modes ----------------------------------------------------------------------------------
def test_chat_only_model_refuses_embeddings(server: InferbridgeServer) -> None:
    resp = post(server, {"model": "chat-only", "input": "x"})
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["param"] == "model"
    assert "chat-only" in err["message"] and "embeddings" in err["message"]
    with pytest.raises(openai.BadRequestError):
        server.openai().embeddings.create(model="chat-only", input="x")


def test_embeddings_only_model_refuses_chat(server: InferbridgeServer) -> None:
    client = server.openai()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="embed-only", messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="embed-only", prompt="hi")
    assert client.embeddings.create(model="embed-only", input="x").data


def test_models_lists_every_mode(server: InferbridgeServer) -> None:
    ids = [m.id for m in server.openai().models.list()]
    assert ids == ["echo", "chat-only", "embed-only"]


# -- validation -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "echo"}, "input"),
        ({"input": "x"}, "model"),
        ({"model": "echo", "input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"model": "echo", "input": "x", "dimensions": 0}, "dimensions"),
        ({"model": "echo", "input": "x", "dimensions": "8"}, "dimensions"),
        ({"model": "echo", "input": []}, "input"),
        ({"model": "echo", "input": ""}, "input"),
        ({"model": "echo", "input": ["a", ""]}, "input[1]"),
        ({"model": "echo", "input": [[1], []]}, "input[1]"),
        ({"model": "echo", "input": [1, "a"]}, "input"),
        ({"model": "echo", "input": 5}, "input"),
        ({"model": "echo", "input": [-1]}, "input"),
        ({"model": "echo", "input": ["a", [1]]}, "input"),
        ({"model": "echo", "input": "x", "user": 3}, "user"),
        ({"model": "echo", "input": [1.5]}, "input"),
        ({"model": "echo", "input": [2**31]}, "input"),
        ({"model": "echo", "input": ["a"] * 2049}, "input"),
    ],
)
def test_bad_input_names_the_field(server: InferbridgeServer, body: dict, param: str) -> None:
    resp = post(server, body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    if param == "input" and body.get("input") and len(str(body["input"])) < 20:  # shapes
        assert "an array of token ids" in err["message"], err


def test_unknown_model_is_404(server: InferbridgeServer) -> None:
    resp = post(server, {"model": "nope", "input": "x"})
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "model_not_found"


def test_auth_applies(server: InferbridgeServer) -> None:
    resp = httpx.post(server.base_url + "/embeddings", json={"model": "echo", "input": "x"})
    assert resp.status_code == 401


def test_root_path_and_openapi(server: InferbridgeServer) -> None:
    resp = httpx.post(
        server.url + "/embeddings",
        json={"model": "echo", "input": "x"},
        headers={"Authorization": f"Bearer {server.api_key}"},
    )
    assert resp.status_code == 200
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/embeddings" in spec["paths"] and "/embeddings" not in spec["paths"]
    schema = spec["components"]["schemas"]["EmbeddingRequest"]
    assert set(schema["required"]) == {"model", "input"}
    assert {"encoding_format", "dimensions", "user"} <= set(schema["properties"])


def test_metrics_count_embedding_tokens(server: InferbridgeServer) -> None:
    post(server, {"model": "embed-only", "input": ["one two three"]})
    text = httpx.get(server.url + "/metrics").text
    line = next(
        x
        for x in text.splitlines()
        if x.startswith("inferbridge_tokens") and "embed-only" in x and "prompt" in x
    )
    assert float(line.rsplit(" ", 1)[1]) >= 3


def test_echo_ignores_unknown_fields_and_says_so(server: InferbridgeServer) -> None:
    resp = post(server, {"model": "echo", "input": "x", "input_type": "query"})
    assert resp.status_code == 200
    assert resp.headers["x-inferbridge-ignored-params"] == "input_type"


# -- config ---------------------------------------------------------------------------------
def test_mode_config_errors() -> None:
    """Found when the config is loaded (so `inferbridge check` reports them too)."""
    with pytest.raises(ConfigError, match="give them one mode"):
        load_config(
            data={
                "models": [
                    {"name": "m", "backend": "echo"},
                    {"name": "m", "backend": "echo", "mode": "chat"},
                ]
            }
        )
    with pytest.raises(ConfigError, match="cannot serve embeddings"):
        load_config(
            data={"models": [{"name": "t", "backend": "tgi", "url": "http://x", "mode": "both"}]}
        )
    with pytest.raises(ConfigError):
        load_config(data={"models": [{"name": "e", "backend": "echo", "mode": "vectors"}]})
    with pytest.raises(ConfigError):
        load_config(data={"models": [{"name": "e", "backend": "echo", "embedding_batch_size": 0}]})


# -- OpenAI-compatible upstreams (vLLM-like fake) ---------------------------------------------
@pytest.fixture(scope="module")
def vllm() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture
def upstream(vllm: FakeOpenAI) -> FakeOpenAI:
    vllm.reset()
    vllm.max_embedding_inputs = 2048
    vllm.reverse_embeddings = False
    vllm.embedding_usage = True
    return vllm


def vllm_entry(fake: FakeOpenAI, **kw: Any) -> dict[str, Any]:
    return {
        "name": "emb",
        "backend": "vllm",
        "url": fake.url + "/v1",
        "upstream_model": "upstream-model",
        "mode": "embeddings",
        "timeout": 5,
        **kw,
    }


def embedding_calls(fake: Any) -> list[Any]:
    return [r for r in fake.requests if r.path.endswith(("/embeddings", "/embed", "/embedding"))]


def test_vllm_float_and_base64(serve: Any, upstream: FakeOpenAI) -> None:
    srv = serve({"models": [vllm_entry(upstream)]})
    client = srv.openai()
    floats = client.embeddings.create(model="emb", input=TEXTS[:3], encoding_format="float")
    assert [d.embedding for d in floats.data] == [fake_vector(t) for t in TEXTS[:3]]
    assert floats.model == "emb"
    assert floats.usage.prompt_tokens == sum(len(t.split()) for t in TEXTS[:3])
    decoded = client.embeddings.create(model="emb", input="hello there")  # SDK: base64
    assert decoded.data[0].embedding == fake_vector("hello there")
    calls = embedding_calls(upstream)
    assert len(calls) == 2
    for call in calls:
        assert call.json["model"] == "upstream-model"
        assert "encoding_format" not in call.json  # floats upstream, base64 made here
    assert calls[0].json["input"] == TEXTS[:3]
    assert calls[1].json["input"] == ["hello there"]


def test_vllm_forwards_dimensions_user_and_extras(serve: Any, upstream: FakeOpenAI) -> None:
    srv = serve({"models": [vllm_entry(upstream)]})
    resp = post(
        srv,
        {
            "model": "emb",
            "input": [[7, 8, 9]],
            "dimensions": 4,
            "user": "u1",
            "truncate_prompt_tokens": 64,
        },
    )
    assert resp.status_code == 200
    assert vectors(resp) == [fake_vector([7, 8, 9], 4)]
    sent = embedding_calls(upstream)[0].json
    assert sent["input"] == [[7, 8, 9]]
    assert sent["dimensions"] == 4 and sent["user"] == "u1"
    assert sent["truncate_prompt_tokens"] == 64


def test_vllm_answer_out_of_order_is_put_in_order(serve: Any, upstream: FakeOpenAI) -> None:
    upstream.reverse_embeddings = True
    srv = serve({"models": [vllm_entry(upstream)]})
    resp = post(srv, {"model": "emb", "input": TEXTS})
    assert vectors(resp) == [fake_vector(t) for t in TEXTS]


def test_batching_splits_and_merges_in_order(serve: Any, upstream: FakeOpenAI) -> None:
    upstream.max_embedding_inputs = 2
    upstream.reverse_embeddings = True
    srv = serve({"models": [vllm_entry(upstream, embedding_batch_size=2)]})
    result = srv.openai().embeddings.create(model="emb", input=TEXTS)
    assert [d.index for d in result.data] == [0, 1, 2, 3, 4]
    assert [d.embedding for d in result.data] == [fake_vector(t) for t in TEXTS]
    calls = embedding_calls(upstream)
    assert [c.json["input"] for c in calls] == [TEXTS[0:2], TEXTS[2:4], TEXTS[4:]]
    assert result.usage.prompt_tokens == sum(len(t.split()) for t in TEXTS)


def test_batch_over_upstream_limit_is_relayed(serve: Any, upstream: FakeOpenAI) -> None:
    upstream.max_embedding_inputs = 2
    srv = serve({"models": [vllm_entry(upstream)]})  # default batch: 2048
    resp = post(srv, {"model": "emb", "input": TEXTS})
    assert resp.status_code == 400
    assert "between 1 and 2" in resp.json()["error"]["message"]


def test_upstream_without_usage_is_estimated(serve: Any, upstream: FakeOpenAI) -> None:
    upstream.embedding_usage = False
    srv = serve({"models": [vllm_entry(upstream)]})
    resp = post(srv, {"model": "emb", "input": ["abcdefgh", "abcd"]})  # 4 characters a token
    assert resp.status_code == 200
    assert resp.headers["x-inferbridge-usage-estimated"] == "true"
    assert resp.json()["usage"] == {"prompt_tokens": 2 + 1, "total_tokens": 3}
    tokens = post(srv, {"model": "emb", "input": [[1, 2, 3], [4]]})  # token ids count exactly
    assert tokens.json()["usage"]["prompt_tokens"] == 4


def test_vllm_entry_defaults_to_chat(serve: Any, upstream: FakeOpenAI) -> None:
    srv = serve({"models": [vllm_entry(upstream, mode=None)]})
    resp = post(srv, {"model": "emb", "input": "x"})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "model"
    assert not embedding_calls(upstream)


def test_retried_on_another_deployment(serve: Any, upstream: FakeOpenAI) -> None:
    with FakeOpenAI() as broken:
        broken.behaviour.status = 500
        srv = serve(
            {
                "router": {"strategy": "least-busy", "retries": 2},
                "models": [vllm_entry(broken), vllm_entry(upstream)],
            }
        )
        for _ in range(3):
            resp = post(srv, {"model": "emb", "input": ["a b"]})
            assert resp.status_code == 200
            assert vectors(resp) == [fake_vector("a b")]


def test_fallback_to_an_embeddings_model(serve: Any, upstream: FakeOpenAI) -> None:
    with FakeOpenAI() as broken:
        broken.behaviour.status = 503
        srv = serve(
            {
                "router": {
                    "retries": 0,
                    "models": {"emb": {"fallbacks": ["chat", "spare"]}},
                },
                "models": [
                    vllm_entry(broken),
                    {"name": "chat", "backend": "echo", "mode": "chat"},
                    {"name": "spare", "backend": "echo"},
                ],
            }
        )
        resp = post(srv, {"model": "emb", "input": "x"})
        assert resp.status_code == 200
        assert resp.headers["x-inferbridge-model"] == "spare"  # the chat-only one skipped
        assert vectors(resp) == [echo_vector("x")]


def test_entry_params_dimensions_default(serve: Any, upstream: FakeOpenAI) -> None:
    entry = vllm_entry(upstream, params={"dimensions": 3, "temperature": 0.2})
    srv = serve({"models": [entry]})
    resp = post(srv, {"model": "emb", "input": "x"})
    assert resp.status_code == 200
    assert len(vectors(resp)[0]) == 3
    sent = embedding_calls(upstream)[0].json
    assert sent["dimensions"] == 3 and "temperature" not in sent


# -- Azure ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def azure() -> Iterator[FakeAzure]:
    with FakeAzure(deployments=("emb-deploy",)) as fake:
        yield fake  # type: ignore[misc]


@pytest.mark.parametrize("api_version", ["2024-10-21", "v1"])
def test_azure(serve: Any, azure: FakeAzure, api_version: str) -> None:
    azure.reset()
    entry = {
        "name": "az-emb",
        "backend": "azure",
        "url": azure.url,
        "deployment": "emb-deploy",
        "api_version": api_version,
        "api_key": "azure-key",
        "mode": "embeddings",
        "timeout": 5,
    }
    srv = serve({"models": [entry]})
    result = srv.openai().embeddings.create(model="az-emb", input=["x y", "z"], dimensions=5)
    assert [d.embedding for d in result.data] == [fake_vector("x y", 5), fake_vector("z", 5)]
    assert result.usage.prompt_tokens == 3
    call = embedding_calls(azure)[0]
    if api_version == "v1":
        assert call.path == "/openai/v1/embeddings"
        assert call.json["model"] == "emb-deploy"
    else:
        assert call.path == "/openai/deployments/emb-deploy/embeddings"
        assert call.query["api-version"] == "2024-10-21"
        assert call.headers["api-key"] == "azure-key"


# -- Ollama native /api/embed -------------------------------------------------------------------
@pytest.fixture(scope="module")
def ollama_fake() -> Iterator[FakeOllama]:
    with FakeOllama(models=("nomic-embed-text:latest",)) as fake:
        yield fake  # type: ignore[misc]


def test_ollama_fake_matches_the_official_client(ollama_fake: FakeOllama) -> None:
    client = ollama.Client(host=ollama_fake.url)
    answer = client.embed(model="nomic-embed-text", input=["one two", "three"])
    assert answer.embeddings == [fake_vector("one two"), fake_vector("three")]
    assert answer.prompt_eval_count == 3
    single = client.embed(model="nomic-embed-text", input="solo", dimensions=4)
    assert single.embeddings == [fake_vector("solo", 4)]
    with pytest.raises(ollama.ResponseError):
        client.embed(model="missing-model", input="x")


def test_ollama_native(serve: Any, ollama_fake: FakeOllama) -> None:
    ollama_fake.reset()
    entry = {
        "name": "nomic",
        "backend": "ollama",
        "url": ollama_fake.url,
        "upstream_model": "nomic-embed-text",
        "mode": "embeddings",
        "embedding_batch_size": 2,
        "keep_alive": "10m",
        "num_ctx": 2048,
        "timeout": 5,
    }
    srv = serve({"models": [entry]})
    result = srv.openai().embeddings.create(model="nomic", input=TEXTS, dimensions=6)
    assert [d.embedding for d in result.data] == [fake_vector(t, 6) for t in TEXTS]
    assert result.usage.prompt_tokens == sum(len(t.split()) for t in TEXTS)
    calls = embedding_calls(ollama_fake)
    assert [c.path for c in calls] == ["/api/embed"] * 3
    first = calls[0].json
    assert first == {
        "model": "nomic-embed-text",
        "input": TEXTS[:2],
        "dimensions": 6,
        "options": {"num_ctx": 2048},
        "keep_alive": "10m",
    }
    resp = post(srv, {"model": "nomic", "input": "x", "truncate": False})
    assert resp.status_code == 200
    assert embedding_calls(ollama_fake)[-1].json["truncate"] is False
    refused = post(srv, {"model": "nomic", "input": [1, 2, 3]})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "input"
    unknown = post(srv, {"model": "nomic", "input": "x", "top_k": 3})
    assert unknown.status_code == 400
    assert unknown.json()["error"]["code"] == "unsupported_parameter"


# -- llama.cpp native /embedding ------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama() -> Iterator[FakeLlamaCpp]:
    with FakeLlamaCpp() as fake:
        yield fake  # type: ignore[misc]


def llama_server(serve: Any, fake: FakeLlamaCpp, **kw: Any) -> InferbridgeServer:
    fake.reset()
    entry = {
        "name": "bge",
        "backend": "llamacpp",
        "url": fake.url,
        "mode": "embeddings",
        "timeout": 5,
        **kw,
    }
    return serve({"router": {"retries": 0}, "models": [entry]})


def test_llamacpp_current_server(serve: Any, llama: FakeLlamaCpp) -> None:
    srv = llama_server(serve, llama)
    resp = post(srv, {"model": "bge", "input": TEXTS, "encoding_format": "base64"})
    assert resp.status_code == 200
    assert [decode_base64("t", v) for v in vectors(resp)] == [fake_vector(t) for t in TEXTS]
    assert resp.headers["x-inferbridge-usage-estimated"] == "true"  # the native API counts none
    assert resp.json()["usage"]["prompt_tokens"] > 0
    assert embedding_calls(llama)[0].json == {"content": TEXTS}
    one = post(srv, {"model": "bge", "input": [5, 6, 7], "embd_normalize": -1})
    assert vectors(one) == [fake_vector([5, 6, 7])]
    assert one.json()["usage"]["prompt_tokens"] == 3
    assert embedding_calls(llama)[-1].json == {"content": [5, 6, 7], "embd_normalize": -1}


def test_llamacpp_legacy_server_one_input_a_call(serve: Any, llama: FakeLlamaCpp) -> None:
    srv = llama_server(serve, llama, embedding_batch_size=1)
    llama.embedding_dialect = "legacy"
    resp = post(srv, {"model": "bge", "input": ["a", "b", "c"]})
    assert resp.status_code == 200
    assert vectors(resp) == [fake_vector(x) for x in "abc"]
    assert [c.json["content"] for c in embedding_calls(llama)] == ["a", "b", "c"]


def test_llamacpp_pooling_none_and_not_enabled(serve: Any, llama: FakeLlamaCpp) -> None:
    srv = llama_server(serve, llama)
    llama.embedding_dialect = "pooling_none"
    resp = post(srv, {"model": "bge", "input": "x"})
    assert resp.status_code == 502
    assert "--pooling" in resp.json()["error"]["message"]
    llama.embedding_dialect = "current"
    llama.embeddings_enabled = False
    resp = post(srv, {"model": "bge", "input": "x"})
    assert resp.status_code >= 500
    assert "--embeddings" in resp.json()["error"]["message"]


def test_llamacpp_refuses_dimensions(serve: Any, llama: FakeLlamaCpp) -> None:
    srv = llama_server(serve, llama)
    resp = post(srv, {"model": "bge", "input": "x", "dimensions": 8})
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["param"] == "dimensions" and err["code"] == "unsupported_parameter"
    assert not embedding_calls(llama)
    dropping = llama_server(serve, llama, drop_unsupported_params=True)
    resp = post(dropping, {"model": "bge", "input": "x", "dimensions": 8})
    assert resp.status_code == 200
    assert resp.headers["x-inferbridge-ignored-params"] == "dimensions"


# -- SageMaker endpoints running the TEI container --------------------------------------------
@pytest.fixture
def tei(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from tests.fakes.sagemaker import FakeSageMaker

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    with FakeSageMaker() as fake:
        fake.container = "tei"  # type: ignore[attr-defined]
        yield fake


def tei_entry(fake: Any, **kw: Any) -> dict[str, Any]:
    return {
        "name": "tei",
        "backend": "sagemaker",
        "region": "us-east-1",
        "url": fake.url,
        "endpoint_name": "my-endpoint",
        "mode": "embeddings",
        "timeout": 5,
        **kw,
    }


def test_sagemaker_tei(serve: Any, tei: Any) -> None:
    srv = serve({"models": [tei_entry(tei)]})
    result = srv.openai().embeddings.create(model="tei", input=TEXTS[:3])
    assert [d.embedding for d in result.data] == [fake_vector(t) for t in TEXTS[:3]]
    assert result.usage.prompt_tokens > 0  # estimated: TEI counts none in its body
    calls = [r for r in tei.requests if r.path.endswith("/invocations")]
    assert calls[0].path == "/endpoints/my-endpoint/invocations"
    assert calls[0].json == {"inputs": TEXTS[:3]}
    resp = post(srv, {"model": "tei", "input": [[1, 2], [3]], "truncate": True})
    assert resp.status_code == 200
    assert resp.headers["x-inferbridge-usage-estimated"] == "true"
    assert vectors(resp) == [fake_vector([1, 2]), fake_vector([3])]
    assert tei.requests[-1].json == {"inputs": [[1, 2], [3]], "truncate": True}


def test_sagemaker_tei_batches_of_32(serve: Any, tei: Any) -> None:
    srv = serve({"models": [tei_entry(tei)]})
    texts = [f"text number {i}" for i in range(70)]
    result = srv.openai().embeddings.create(model="tei", input=texts)
    assert [d.embedding for d in result.data] == [fake_vector(t) for t in texts]
    sizes = [len(r.json["inputs"]) for r in tei.requests if r.path.endswith("/invocations")]
    assert sizes == [32, 32, 6]
    tei.reset()
    tei.container = "tei"
    too_big = serve({"models": [tei_entry(tei, embedding_batch_size=40)]})
    resp = post(too_big, {"model": "tei", "input": texts[:40]})
    assert resp.status_code == 400  # TGI/TEI validation errors (422) are the client's 400
    assert "maximum allowed batch size 32" in resp.json()["error"]["message"]


def test_sagemaker_refuses_dimensions_and_defaults_to_chat(serve: Any, tei: Any) -> None:
    srv = serve({"models": [tei_entry(tei), tei_entry(tei, name="gen", mode=None)]})
    resp = post(srv, {"model": "tei", "input": "x", "dimensions": 4})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "dimensions"
    resp = post(srv, {"model": "gen", "input": "x"})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "model"
