"""Secrets and internal addresses never reach a client, a metric label or a log line."""

from __future__ import annotations

import base64
import socket
from typing import Any

import httpx
import openai
import pytest

from inferbridge.config import load_config
from tests.fakes.openai_compat import FakeOpenAI
from tests.fakes.replicate import LLAMA3, FakeReplicate
from tests.server import InferbridgeServer

USER = [{"role": "user", "content": "hi"}]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_upstream_failures_name_the_deployment_not_its_url():
    port = closed_port()
    url = f"http://admin:hunter22@127.0.0.1:{port}/v1?token=tok-secret"
    entry = {"name": "m", "backend": "vllm", "url": url}
    with InferbridgeServer({"models": [entry], "server": {"access_log": True}}) as srv:
        with pytest.raises(openai.APIStatusError) as info:
            srv.openai().chat.completions.create(model="m", messages=USER)
        message = str(info.value.body)
        assert "backend 'vllm' (m[0])" in message
        for leak in ("127.0.0.1", str(port), "hunter22", "tok-secret", "admin"):
            assert leak not in message
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text
        assert 'deployment="m[0]"' in metrics
        for leak in ("127.0.0.1", "hunter22", "tok-secret"):
            assert leak not in metrics


def test_access_log_lines_carry_the_deployment_id(capfdbinary):
    port = closed_port()
    entry = {"name": "m", "backend": "vllm", "url": f"http://u:pw-secret@127.0.0.1:{port}/v1"}
    with InferbridgeServer({"models": [entry], "server": {"access_log": True}}) as srv:
        httpx.post(
            srv.url + "/v1/chat/completions",
            json={"model": "m", "messages": USER},
            headers={"authorization": "Bearer sk-test"},
            timeout=10,
        )
    err = capfdbinary.readouterr().err.decode()
    assert '"deployment":"m[0]"' in err
    assert "pw-secret" not in err and f":{port}" not in err


def test_user_info_in_a_url_becomes_basic_auth():
    with FakeOpenAI() as fake:
        url = fake.url.replace("http://", "http://alice:s%40cret@") + "/v1"
        entry = {"name": "m", "backend": "vllm", "url": url, "upstream_model": fake.served_model}
        with InferbridgeServer({"models": [entry]}) as srv:
            srv.openai().chat.completions.create(model="m", messages=USER)
        sent = fake.requests[-1].headers["Authorization"]
    assert sent == "Basic " + base64.b64encode(b"alice:s@cret").decode()


def test_user_info_and_an_api_key_together_are_refused():
    """Refused when the config is loaded (so `inferbridge check` says it too)."""
    from inferbridge.config import ConfigError

    url = "http://alice:pw@127.0.0.1:9/v1"
    with pytest.raises(ConfigError, match="Authorization"):
        load_config(
            data={"models": [{"name": "m", "backend": "vllm", "url": url, "api_key": "sk-x"}]},
            environ={},
        )


def test_an_upstream_echoing_the_key_has_it_masked():
    with FakeOpenAI() as fake:
        fake.behaviour.status = 400
        fake.behaviour.error_body = {
            "error": {
                "message": "bad key sk-upstream-secret-123 (header Bearer sk-upstream-secret-123)"
            }
        }
        entry = {
            "name": "m",
            "backend": "vllm",
            "url": fake.url + "/v1",
            "api_key": "sk-upstream-secret-123",
            "headers": {"X-Org-Token": "org-token-456"},
        }
        with (
            InferbridgeServer({"models": [entry]}) as srv,
            pytest.raises(openai.BadRequestError) as info,
        ):
            srv.openai().chat.completions.create(model="m", messages=USER)
    message = info.value.body["message"]  # type: ignore[index]
    assert "sk-upstream-secret-123" not in message
    assert "***" in message


class TestReplicateFollowsOnlyItsOrigin:
    def config(self, fake: FakeReplicate) -> dict[str, Any]:
        entry = {
            "name": "llama",
            "backend": "replicate",
            "url": fake.url + "/v1",
            "api_key": "r8_test",
            "model": LLAMA3,
            "poll_interval": 0.01,
        }
        return {"models": [entry]}

    @pytest.mark.parametrize("stream", [False, True])
    def test_urls_on_another_origin_are_not_sent_the_token(self, stream):
        with FakeReplicate() as fake, FakeReplicate() as elsewhere:
            fake.url_origin = elsewhere.url
            fake.wait_completes = False
            with InferbridgeServer(self.config(fake)) as srv:
                client = srv.openai()
                if stream:
                    text = "".join(
                        c.choices[0].delta.content or ""
                        for c in client.chat.completions.create(
                            model="llama", messages=USER, stream=True
                        )
                        if c.choices
                    )
                else:
                    reply = client.chat.completions.create(model="llama", messages=USER)
                    text = reply.choices[0].message.content or ""
            assert text == "Hello world, how are you?"
            assert elsewhere.requests == []  # never contacted, so never given the token

    def test_prediction_ids_are_percent_encoded_in_paths(self):
        from inferbridge.backends import registry

        with FakeReplicate() as fake:
            config = load_config(data=self.config(fake), environ={})
            backend = registry.create(config.models[0])
            prediction = {"id": "../../v1/models\r\nx", "urls": {}}
            path = backend.prediction_url(prediction, "get")  # the fallback path built from the id
            assert "\r" not in path and "/../" not in path
            assert path.startswith("/predictions/")
