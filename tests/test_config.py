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


# -- errors caught at load, naming the file, the line and the field --------------------------
def write(tmp_path, text: str):
    path = tmp_path / "inferbridge.yaml"
    path.write_text(text)
    return path


def test_an_invalid_log_level_names_the_line(tmp_path):
    path = write(tmp_path, "server:\n  log_level: loud\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert f"{path}:2: server.log_level" in str(info.value)
    assert "'loud'" in str(info.value)


def test_a_url_without_a_scheme_is_refused_at_load(tmp_path):
    path = write(tmp_path, "models:\n  - name: m\n    backend: vllm\n    url: gpu1:8000/v1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert f"{path}:4: models[0] (m): url" in str(info.value)
    assert "http://" in str(info.value)


def test_duplicate_keys_are_refused_naming_both_lines(tmp_path):
    text = "models:\n  - name: a\n    backend: echo\nmodels:\n  - name: b\n    backend: echo\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ={})
    assert "duplicate" in str(info.value)
    assert "4: models (first at line 1)" in str(info.value)


def test_shell_style_variables_suggest_os_environ(tmp_path):
    path = write(tmp_path, "auth:\n  api_keys: ['${MY_KEY}']\n")
    with pytest.raises(ConfigError, match=r"did you mean os\.environ/MY_KEY"):
        load_config(path, environ={"MY_KEY": "x"})


def test_an_unknown_key_gets_a_suggestion(tmp_path):
    path = write(tmp_path, "models:\n  - name: a\n    backend: echo\n    timout: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert f"{path}:4: models[0] (a): timout: unknown key (did you mean 'timeout'?)" in str(
        info.value
    )


def test_every_unset_variable_is_reported_at_once(tmp_path):
    text = (
        "auth:\n  api_keys: [os.environ/KEY_ONE]\nmodels:\n  - name: a\n    backend: openai\n"
        "    api_key: os.environ/KEY_TWO\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ={})
    assert "KEY_ONE" in str(info.value) and "KEY_TWO" in str(info.value)


def test_without_the_secrets_the_needed_variables_are_listed(tmp_path):
    text = "models:\n  - name: a\n    backend: openai\n    api_key: os.environ/KEY_TWO\n"
    config = load_config(write(tmp_path, text), environ={}, require_env=False)
    assert config.missing_env == ["KEY_TWO"]


def test_a_secret_can_come_from_a_file(tmp_path):
    secret = tmp_path / "key.txt"
    secret.write_text("sk-from-file\n")
    path = write(tmp_path, "auth:\n  api_keys: [os.environ_file/KEY_FILE]\n")
    config = load_config(path, environ={"KEY_FILE": str(secret)})
    assert config.auth.keys == ["sk-from-file"]


def test_a_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, environ={})


def test_entries_sharing_a_name_with_different_upstreams_are_warned_about(caplog):
    data = {
        "models": [
            {"name": "m", "backend": "vllm", "url": "http://a/v1", "upstream_model": "x"},
            {"name": "m", "backend": "vllm", "url": "http://b/v1", "upstream_model": "y"},
        ]
    }
    load_config(data=data, environ={})
    assert "treated as deployments of one model" in caplog.text


def test_a_name_file_variable_stands_for_the_secret(tmp_path):
    secret = tmp_path / "key.txt"
    secret.write_text("sk-docker-secret")
    path = write(tmp_path, "auth:\n  api_keys: [os.environ/MY_KEY]\n")
    config = load_config(path, environ={"MY_KEY_FILE": str(secret)})
    assert config.auth.keys == ["sk-docker-secret"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "models:\n  - name: d\n    backend: vllm\n"
            "    url: http://u:p@127.0.0.1:19505/v1\n    api_key: sk-x\n",
            "c.yaml:4: models[0] (d): url: the URL carries a user and password",
        ),
        ("auth:\n  api_keys: ['sha256:abc']\n", "c.yaml:2: auth.api_keys[0]: a 'sha256:' key"),
        ("auth:\n  api_keys: [k1, k1]\n", "c.yaml:2: auth.api_keys[1]: the same key as"),
        (
            "models:\n  - {name: t, backend: tgi, url: 'http://h:1', mode: embeddings}\n",
            "c.yaml:2: models[0] (t): mode: backend 'tgi' cannot serve embeddings",
        ),
        (
            "models:\n  - {name: e, backend: echo}\n  - {name: e, backend: echo, mode: chat}\n",
            "c.yaml:3: models[1] (e): mode: serves other requests than models[0]",
        ),
    ],
)
def test_what_the_server_would_refuse_is_refused_at_load(tmp_path, text, expected):
    """Errors once found only when the Gateway was built (after `check` said OK)."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert expected in str(info.value)


def test_no_env_checks_a_file_whose_checked_values_are_variables(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "state:\n  store: redis\n  url: os.environ/REDIS_URL\n"
        "models:\n  - {name: a, backend: vllm, url: os.environ/IB_URL}\n"
        "  - {name: h, backend: h2ogpt, url: 'http://h:7860', auth: os.environ/H2OGPT_LOGIN}\n"
    )
    cfg = load_config(path, environ={}, require_env=False)
    assert cfg.missing_env == ["H2OGPT_LOGIN", "IB_URL", "REDIS_URL"]
    # a real value is still checked
    with pytest.raises(ConfigError, match=r"c.yaml:3: state.url: .*must start with redis://"):
        load_config(path, environ={"REDIS_URL": "http://x"}, require_env=False)


def test_command_line_models_resolve_their_variables():
    entry = {"name": "m", "backend": "openai", "api_key": "os.environ/OPENAI_API_KEY"}
    cfg = load_config(overrides={"models": [entry]}, environ={"OPENAI_API_KEY": "sk-env"})
    assert cfg.models[0].api_key == "sk-env"


def test_shell_style_variables_are_reported_with_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("auth:\n  api_keys: ['${INFERBRIDGE_API_KEY}']\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:2: auth\.api_keys\[0\]: did you mean"):
        load_config(path, environ={})


def test_an_invalid_value_from_the_environment_names_the_variable(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  log_level: info\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"INFERBRIDGE_LOG_LEVEL": "verbose"})
    assert "server.log_level:" in str(info.value)
    assert "(got 'verbose' from INFERBRIDGE_LOG_LEVEL)" in str(info.value)
    assert "c.yaml:2" not in str(info.value)  # the file's value is not the one at fault


def test_messages_carry_no_pydantic_wording_and_name_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "models:\n  - {name: a, backend: tgi, url: 'gpu:80'}\n"
        "  - {name: b, backend: tgi, url: 'http://h:1', prompt_template: nope}\n"
        f"  - {{name: c, backend: tgi, url: 'http://h:1', chat_template_file: {tmp_path}/no}}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    text = str(info.value)
    assert "Value error" not in text and "(entry)" not in text and "Errno" not in text
    assert "c.yaml:2: models[0] (a): url: must start with http://" in text
    assert "c.yaml:3: models[1] (b): prompt_template: Unknown chat template 'nope'" in text
    assert "c.yaml:4: models[2] (c): chat_template_file: cannot read" in text
