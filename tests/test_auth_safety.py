"""Auth that cannot be lost by accident, and what unauthenticated callers may see."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from inferbridge.cli import main
from inferbridge.config import ConfigError, ServerConfig, load_config
from tests.server import InferbridgeServer

KEYED = {"auth": {"api_keys": ["sk-yaml"]}, "models": [{"name": "echo", "backend": "echo"}]}


def test_an_empty_api_keys_variable_does_not_turn_auth_off():
    config = load_config(data=KEYED, environ={"INFERBRIDGE_API_KEYS": ""})
    assert config.auth.keys == ["sk-yaml"]
    config = load_config(data=KEYED, environ={"INFERBRIDGE_API_KEYS": " , "})
    assert config.auth.keys == ["sk-yaml"]


def test_the_api_keys_variable_replaces_the_files_keys():
    config = load_config(data=KEYED, environ={"INFERBRIDGE_API_KEYS": "sk-a, sk-b"})
    assert config.auth.keys == ["sk-a", "sk-b"]


def test_auth_off_only_when_said_explicitly():
    config = load_config(data=KEYED, environ={"INFERBRIDGE_AUTH": "off"})
    assert config.auth.keys == []
    assert config.auth.api_keys == ["sk-yaml"]


def test_a_key_that_resolves_to_nothing_is_a_config_error(monkeypatch):
    monkeypatch.setenv("EMPTY_KEY", "")
    data = {**KEYED, "auth": {"api_keys": ["os.environ/EMPTY_KEY"]}}
    with pytest.raises(ConfigError, match="empty"):
        load_config(data=data, environ={"EMPTY_KEY": ""})


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("10.1.2.3", False),
    ],
)
def test_loopback_addresses(host, loopback):
    assert ServerConfig(host=host).loopback() is loopback


def test_serving_without_keys_on_an_open_address_is_refused(capsys, monkeypatch):
    for name in ("INFERBRIDGE_API_KEYS", "INFERBRIDGE_CONFIG", "INFERBRIDGE_ALLOW_OPEN"):
        monkeypatch.delenv(name, raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "allow_open" in capsys.readouterr().err


@pytest.fixture(scope="module")
def srv() -> Iterator[InferbridgeServer]:
    config = {
        **KEYED,
        "server": {"metrics_auth": True, "max_header_bytes": 4096},
    }
    with InferbridgeServer(config) as server:
        yield server


def test_metrics_need_a_key_when_metrics_auth_is_on(srv):
    assert httpx.get(srv.url + "/metrics", timeout=10).status_code == 401
    r = httpx.get(srv.url + "/metrics", headers={"authorization": "Bearer sk-yaml"}, timeout=10)
    assert r.status_code == 200
    assert "inferbridge_requests" in r.text


def test_readiness_names_models_only_to_an_authenticated_caller(srv):
    anonymous = httpx.get(srv.url + "/health/readiness", timeout=10).json()
    assert anonymous == {"status": "ready"}
    r = httpx.get(
        srv.url + "/health/readiness", headers={"authorization": "Bearer sk-yaml"}, timeout=10
    )
    assert "echo" in r.json()["models"]


def test_headers_over_the_limit_are_431(srv):
    r = httpx.get(
        srv.url + "/v1/models",
        headers={"authorization": "Bearer sk-yaml", "x-padding": "a" * 5000},
        timeout=10,
    )
    assert r.status_code == 431
    assert "max_header_bytes" in r.json()["error"]["message"]
    assert r.headers["connection"] == "close"
