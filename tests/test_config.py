"""Config loading: validation errors name entry and field; env references and overrides."""

import pytest

from inferbridge.config import ConfigError, load_config


def test_default_is_the_echo_model():
    cfg = load_config(environ={})
    assert [(m.name, m.backend) for m in cfg.models] == [("echo", "echo")]
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 5000)


def test_errors_name_the_entry_and_field():
    with pytest.raises(ConfigError) as info:
        load_config(
            data={
                "models": [
                    {"name": "a", "backend": "echo", "timout": 3},
                    {"name": "b", "backend": "vllm"},
                    {"name": "c", "backend": "nope"},
                    {"name": "d", "backend": "echo", "timeout": "soon"},
                ]
            },
            environ={},
        )
    text = str(info.value)
    assert "models[0] (a): timout" in text
    assert "models[1] (b): url" in text
    assert "models[2] (c): backend: unknown backend 'nope'" in text
    assert "models[3] (d): timeout" in text


def test_env_references_resolve_and_missing_ones_fail(monkeypatch, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "auth:\n  api_keys: ['os.environ/IB_TEST_KEY']\n"
        "models:\n  - name: m\n    backend: vllm\n    url: http://x/v1\n"
        "    api_key: os.environ/IB_UPSTREAM\n"
    )
    monkeypatch.setenv("IB_TEST_KEY", "k1")
    monkeypatch.setenv("IB_UPSTREAM", "k2")
    cfg = load_config(path)
    assert cfg.auth.api_keys == ["k1"] and cfg.models[0].api_key == "k2"
    monkeypatch.delenv("IB_UPSTREAM")
    with pytest.raises(ConfigError, match="IB_UPSTREAM"):
        load_config(path)


def test_env_and_cli_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("server: {port: 6000, host: 0.0.0.0}\n")
    cfg = load_config(
        path,
        environ={"INFERBRIDGE_PORT": "7000", "INFERBRIDGE_API_KEYS": "a,b"},
        overrides={"server": {"host": "127.0.0.2"}},
    )
    assert cfg.server.port == 7000 and cfg.server.host == "127.0.0.2"
    assert cfg.auth.api_keys == ["a", "b"]


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
