"""What every request meets before a backend: content type, key before body, body limits,
methods, nesting depth, fan-out, CORS, the echo model's tolerance, system_fingerprint."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.fakes.azure import FakeAzure
from tests.server import InferbridgeServer

USER = [{"role": "user", "content": "alpha beta gamma"}]
CHAT = {"model": "echo", "messages": USER}


@pytest.fixture(scope="module")
def srv() -> Iterator[InferbridgeServer]:
    config = {
        "server": {"body_timeout": 1, "max_fanout": 16},
        "auth": {"api_keys": ["sk-test"]},
        "models": [{"name": "echo", "backend": "echo"}],
    }
    with InferbridgeServer(config) as server:
        yield server


def post(srv: InferbridgeServer, body: Any, **kw: Any) -> httpx.Response:
    headers = {"authorization": "Bearer sk-test", **kw.pop("headers", {})}
    path = kw.pop("path", "/v1/chat/completions")
    return httpx.post(srv.url + path, json=body, headers=headers, timeout=10, **kw)


def raw(srv: InferbridgeServer, data: bytes, wait: float = 5.0) -> bytes:
    """Send `data` on a new connection and return what comes back within `wait` seconds."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=wait) as sock:
        sock.sendall(data)
        return sock.recv(65536)


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_a_body_not_labelled_json_is_415_in_the_openai_envelope(srv, content_type):
    r = httpx.post(
        srv.url + "/v1/chat/completions",
        content=orjson.dumps(CHAT),
        headers={"authorization": "Bearer sk-test", "content-type": content_type},
        timeout=10,
    )
    assert r.status_code == 415
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "application/json" in r.json()["error"]["message"]


def test_json_with_a_charset_parameter_is_accepted(srv):
    headers = {"content-type": "application/json; charset=utf-8"}
    r = httpx.post(
        srv.url + "/v1/chat/completions",
        content=orjson.dumps(CHAT),
        headers={"authorization": "Bearer sk-test", **headers},
        timeout=10,
    )
    assert r.status_code == 200, r.text


def test_the_key_is_checked_before_the_body_arrives(srv):
    """A client without a key announces 8 MB and sends none of it: answered 401 at once."""
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 8000000\r\n\r\n"
    )
    started = time.monotonic()
    answer = raw(srv, head, wait=5)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:100]
    assert b"invalid_api_key" in answer
    assert b"connection: close" in answer.lower()  # the unread body is not waited for
    assert time.monotonic() - started < 4


def test_a_refused_unread_body_closes_the_connection(srv):
    """After the 401 the server closes: a client trickling the body cannot keep it."""
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 8000000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(head)
        received = b""
        while chunk := sock.recv(65536):  # ends when the server closes; a timeout fails
            received += chunk
            if b"invalid_api_key" in received:
                sock.sendall(b"x")  # trickling on does not keep the connection
    assert received.startswith(b"HTTP/1.1 401")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"model":"echo","messages":[{"role":"user","content":"\\ud800"}]}', "not valid JSON"),
        (b'{"model":"echo","messages":[{"role":"user","content":"\xff"}]}', "not valid JSON"),
        (
            b'{"model":"echo","messages":[{"role":"user","content":"x"}],"e":'
            + b"[" * 2000
            + b"]" * 2000
            + b"}",
            "64 levels",
        ),
        (
            b'{"model":"echo","messages":[{"role":"user","content":"x"}],"e":{"a":[1'
            + b"0" * 30
            + b"]}}",
            "beyond 64 bits",
        ),
    ],
)
def test_bodies_no_backend_could_take_are_400(srv, body, words):
    """Unpaired surrogates, bytes that are not UTF-8, nesting past any parser's limit and
    integers past 64 bits: a 400 saying so, never a 500 or a cut stream."""
    for stream in (False, True):
        data = body.replace(b'"model"', b'"stream":true,"model"') if stream else body
        r = httpx.post(
            srv.url + "/v1/chat/completions",
            content=data,
            headers={"authorization": "Bearer sk-test", "content-type": "application/json"},
            timeout=10,
        )
        assert r.status_code == 400, r.text
        assert words in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": 10**30}, "max_tokens"),
        ({"seed": 2**70}, "seed"),
        ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
        ({"stop": "x" * 201}, "stop"),
    ],
)
def test_values_past_their_bounds_are_400_naming_the_field(srv, extra, param):
    r = post(srv, {**CHAT, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_model_names_are_not_metric_labels_and_are_cut_in_messages(srv):
    name = "nope\nX-Evil: 1" + "Z" * 5000
    r = post(srv, {**CHAT, "model": name})
    assert r.status_code == 404
    message = r.json()["error"]["message"]
    assert len(message) < 400 and "\\n" in message and "\n" not in message
    metrics = httpx.get(srv.url + "/metrics").text
    assert "ZZZZ" not in metrics and "nope" not in metrics


def test_a_body_that_stops_arriving_is_408_after_body_timeout(srv):
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b'authorization: Bearer sk-test\r\ncontent-length: 100\r\n\r\n{"model"'
    )
    started = time.monotonic()
    answer = raw(srv, head, wait=5)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert b"request_timeout" in answer
    assert time.monotonic() - started < 4


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods_on_completion_routes_are_405_with_allow(srv, method):
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = httpx.request(
            method, srv.url + path, headers={"authorization": "Bearer sk-test"}, timeout=10
        )
        assert r.status_code == 405, (path, r.text)
        assert r.headers["allow"] == "POST"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.json()["error"]["code"] == "method_not_allowed"


def test_a_body_nested_1000_deep_is_400_naming_the_limit(srv):
    deep: Any = "x"
    for _ in range(1000):
        deep = {"a": deep}
    r = httpx.post(
        srv.url + "/v1/chat/completions",
        content=b'{"model":"echo","messages":[{"role":"user","content":"hi"}],"extra":'
        + b'{"a":' * 1000
        + b'"x"'
        + b"}" * 1000
        + b"}",
        headers={"authorization": "Bearer sk-test", "content-type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 400, r.text
    assert "64 levels" in r.json()["error"]["message"]


def test_nesting_past_the_limit_but_parseable_is_400_naming_it(srv):
    deep: Any = "x"
    for _ in range(100):
        deep = {"a": deep}
    r = post(srv, {**CHAT, "extra": deep})
    assert r.status_code == 400, r.text
    assert "64 levels" in r.json()["error"]["message"]


def test_fan_out_past_max_fanout_is_400_naming_the_limit(srv):
    r = post(srv, {**CHAT, "n": 17})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "n"
    assert "max_fanout" in r.json()["error"]["message"]
    prompts = {"model": "echo", "prompt": ["a", "b", "c", "d"], "n": 5}
    r = post(srv, prompts, path="/v1/completions")
    assert r.status_code == 400
    assert "20 choices" in r.json()["error"]["message"]
    assert post(srv, {**CHAT, "n": 16}).status_code == 200


def test_the_echo_model_accepts_any_parameter_and_names_what_it_ignored(srv):
    """h2oGPT's client example sends langchain_mode and friends through extra_body."""
    client = openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0)
    raw_response = client.chat.completions.with_raw_response.create(
        model="echo",
        messages=USER,
        logprobs=True,
        extra_body={"langchain_mode": "LLM", "langchain_action": "Query", "top_k": 40},
    )
    reply = raw_response.parse()
    assert reply.choices[0].message.content == "alpha beta gamma"
    ignored = raw_response.headers["x-inferbridge-ignored-params"]
    assert {p.strip() for p in ignored.split(",")} == {
        "logprobs",
        "langchain_mode",
        "langchain_action",
        "top_k",
    }


def test_ignored_parameter_names_a_header_cannot_carry_are_counted(srv):
    """The names are the client's: CR/LF, non-Latin-1 and thousands of them cannot break
    the answer or its header."""
    odd = {"a\r\nSet-Cookie: x": 1, "ключ": 2, **{f"k{i}": i for i in range(40)}}
    for stream in (False, True):
        r = post(srv, {**CHAT, "stream": stream, **odd})
        assert r.status_code == 200, r.text
        ignored = r.headers["x-inferbridge-ignored-params"]
        assert ignored.startswith("k0, k1") and ignored.endswith("26 more"), ignored
        assert "set-cookie" not in r.headers


def test_no_system_fingerprint_when_the_backend_gives_none(srv):
    body = post(srv, CHAT).json()
    assert "system_fingerprint" not in body
    with httpx.stream(
        "POST",
        srv.url + "/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers={"authorization": "Bearer sk-test"},
        timeout=10,
    ) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    assert lines
    assert all("system_fingerprint" not in line for line in lines)


def test_the_upstreams_system_fingerprint_is_relayed():
    with FakeAzure(deployments=("dep",)) as fake:
        entry = {
            "name": "gpt",
            "backend": "azure",
            "url": fake.url,
            "deployment": "dep",
            "api_version": "2024-10-21",
            "api_key": "azure-key",
        }
        with InferbridgeServer({"models": [entry]}) as srv:
            client = srv.openai()
            whole = client.chat.completions.create(model="gpt", messages=USER)
            assert whole.system_fingerprint == "fp_fake"
            chunks = list(client.chat.completions.create(model="gpt", messages=USER, stream=True))
            assert {c.system_fingerprint for c in chunks if c.choices} == {"fp_fake"}


class TestCors:
    ORIGIN = "http://app.example"

    def preflight(self, srv: InferbridgeServer) -> httpx.Response:
        return httpx.options(
            srv.url + "/v1/chat/completions",
            headers={
                "origin": self.ORIGIN,
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type",
            },
            timeout=10,
        )

    def test_off_by_default_no_origin_is_allowed(self, srv):
        r = self.preflight(srv)
        assert "access-control-allow-origin" not in r.headers

    def test_when_on_the_preflight_is_answered_and_requests_carry_the_header(self):
        config = {
            "server": {"cors": {"allow_origins": [self.ORIGIN]}},
            "auth": {"api_keys": ["sk-test"]},
            "models": [{"name": "echo", "backend": "echo"}],
        }
        with InferbridgeServer(config) as srv:
            r = self.preflight(srv)
            assert r.status_code == 200
            assert r.headers["access-control-allow-origin"] == self.ORIGIN
            assert "authorization" in r.headers["access-control-allow-headers"].lower()
            r = post(srv, CHAT, headers={"origin": self.ORIGIN})
            assert r.status_code == 200
            assert r.headers["access-control-allow-origin"] == self.ORIGIN
            other = self.preflight_from(srv, "http://evil.example")
            assert "access-control-allow-origin" not in other.headers
            anthropic_sdk = httpx.options(  # a browser Anthropic client's preflight
                srv.url + "/v1/messages",
                headers={
                    "origin": self.ORIGIN,
                    "access-control-request-method": "POST",
                    "access-control-request-headers": "x-api-key,anthropic-version,content-type",
                },
                timeout=10,
            )
            assert anthropic_sdk.status_code == 200, anthropic_sdk.text

    def preflight_from(self, srv: InferbridgeServer, origin: str) -> httpx.Response:
        return httpx.options(
            srv.url + "/v1/chat/completions",
            headers={"origin": origin, "access-control-request-method": "POST"},
            timeout=10,
        )


def test_past_limit_concurrency_new_requests_are_refused_not_queued():
    """Connections held open (half-open, or slow) count against server.limit_concurrency:
    past it a request is answered 503 at once instead of piling up."""
    config = {"server": {"limit_concurrency": 20}, "models": [{"name": "echo", "backend": "echo"}]}
    with InferbridgeServer(config) as srv:
        held = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(25)]
        try:
            time.sleep(0.2)
            r = httpx.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=5)
            assert r.status_code == 503
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.2)
        assert httpx.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=5).status_code == 200


def test_client_given_names_are_cut_and_escaped_in_messages(srv):
    """A path, a response id or a tool name the client chose is repeated in an error cut
    to 200 characters, control characters escaped."""
    headers = {"authorization": "Bearer sk-test"}
    long_path = "/v1/" + "Q" * 5000 + "%1b%00"
    r = httpx.get(srv.url + long_path, headers=headers, timeout=10)
    assert r.status_code == 404 and len(r.json()["error"]["message"]) < 400
    r = httpx.get(srv.url + "/v1/responses/resp_" + "Z" * 5000, headers=headers, timeout=10)
    assert r.status_code == 404 and len(r.json()["error"]["message"]) < 400
    tools = [{"type": "function", "function": {"name": "a"}}]
    choice = {"type": "function", "function": {"name": "x\x1b" * 50_000}}
    r = post(srv, {**CHAT, "tools": tools, "tool_choice": choice})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and len(message) < 400 and "\x1b" not in message
