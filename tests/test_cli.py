"""The `inferbridge` command as users run it, and h2oGPT --inference_server strings."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import yaml

from inferbridge.cli import main
from inferbridge.config import load_config
from inferbridge.inference_server import InferenceServerError, parse_inference_server
from tests.fakes.openai_compat import FakeOpenAI


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("http://10.0.0.5:6112", {"backend": "tgi", "url": "http://10.0.0.5:6112"}),
        ("vllm:10.0.0.5:5000", {"backend": "vllm", "url": "http://10.0.0.5:5000/v1"}),
        ("vllm_chat:https://host/v1", {"backend": "vllm", "url": "https://host/v1"}),
        (
            "vllm_chat:http://localhost:11434/v1/",
            {"backend": "vllm", "url": "http://localhost:11434/v1"},
        ),
        ("openai_chat", {"backend": "openai", "api_key": "os.environ/OPENAI_API_KEY"}),
        (
            "openai_azure_chat:my-dep:res.openai.azure.com:2024-02-01",
            {
                "backend": "azure",
                "url": "https://res.openai.azure.com",
                "deployment": "my-dep",
                "api_version": "2024-02-01",
            },
        ),
        (
            "openai_azure_chat:None:https://res.openai.azure.com::sk-1",
            {"backend": "azure", "url": "https://res.openai.azure.com", "api_key": "sk-1"},
        ),
        (
            "replicate:a16z-infra/llama13b-v2-chat:df7690f1",
            {"backend": "replicate", "version": "df7690f1"},
        ),
        ("replicate:meta/llama-3-8b", {"backend": "replicate", "model": "meta/llama-3-8b"}),
        (
            "sagemaker_chat:my-endpoint:us-west-2",
            {
                "backend": "sagemaker",
                "endpoint_name": "my-endpoint",
                "region": "us-west-2",
                "payload": "messages",
            },
        ),
        (
            "sagemaker:my-endpoint",
            {"backend": "sagemaker", "endpoint_name": "my-endpoint", "payload": "tgi"},
        ),
        ("h2ogpt:http://10.0.0.9:7860", {"backend": "h2ogpt", "url": "http://10.0.0.9:7860"}),
    ],
)
def test_inference_server_strings(spec, expected, monkeypatch):
    entry = parse_inference_server(spec, "llama")
    for key, value in expected.items():
        assert entry[key] == value, key
    assert entry["name"] == "llama"
    # every produced entry is a valid config entry
    load_config(
        data={"models": [entry]}, environ={"OPENAI_API_KEY": "k", "REPLICATE_API_TOKEN": "k"}
    )


def test_bad_inference_server_string():
    with pytest.raises(InferenceServerError, match="unrecognised"):
        parse_inference_server("ftp:thing", "m")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERBRIDGE_")}
    return subprocess.Popen(
        [sys.executable, "-m", "inferbridge", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_ready(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read() if proc.stdout else "exited")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("server did not start")


def test_serve_with_inference_server_string():
    with FakeOpenAI() as upstream:
        port = _free_port()
        proc = _run(
            [
                "serve",
                "--port",
                str(port),
                "--inference-server",
                f"vllm_chat:127.0.0.1:{upstream.port}",
                "--model",
                "upstream-model",
            ]
        )
        try:
            _wait_ready(port, proc)
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0
            )
            r = client.chat.completions.create(
                model="upstream-model", messages=[{"role": "user", "content": "hi"}]
            )
            assert r.choices[0].message.content == "Hello from upstream"
        finally:
            proc.terminate()
            proc.wait(10)


def test_serve_with_config_file_and_two_workers(tmp_path):
    config = tmp_path / "inferbridge.yaml"
    config.write_text(
        "auth:\n  api_keys: [os.environ/IB_CLI_KEY]\nmodels:\n  - name: demo\n    backend: echo\n"
    )
    port = _free_port()
    env_key = {"IB_CLI_KEY": "sk-cli"}
    os.environ.update(env_key)
    try:
        proc = _run(["serve", "--config", str(config), "--port", str(port), "--workers", "2"])
    finally:
        os.environ.pop("IB_CLI_KEY")
    try:
        _wait_ready(port, proc)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-cli", max_retries=0
        )
        for _ in range(4):
            r = client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "two workers"}]
            )
            assert r.choices[0].message.content == "two workers"
        # Each worker flushes its counts at least every second: the sum reaches 4.
        deadline = time.monotonic() + 5
        while True:
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            total = sum(
                float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith('inferbridge_requests_total{backend="echo"')
            )
            if total == 4 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert total == 4, metrics
    finally:
        proc.terminate()
        proc.wait(10)


def test_bad_config_exits_2_with_a_clear_message(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("models:\n  - name: m\n    backend: vllm\n")
    proc = _run(["serve", "--config", str(config)])
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert "models[0] (m): url" in out


# -- one command to a real model, and a check that means it will work -------------------------
def test_backend_url_and_models_make_entries_and_print_as_yaml(capsys):
    args = [
        "serve",
        "--backend", "ollama", "--url", "http://127.0.0.1:11434",
        "--model", "qwen2.5:7b", "--model", "llama3.2",
        "--backend", "vllm", "--url", "http://127.0.0.1:8000/v1", "--model", "mistral",
        "--print-config",
    ]  # fmt: skip
    assert main(args) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["models"] == [
        {"name": "qwen2.5:7b", "backend": "ollama", "url": "http://127.0.0.1:11434"},
        {"name": "llama3.2", "backend": "ollama", "url": "http://127.0.0.1:11434"},
        {"name": "mistral", "backend": "vllm", "url": "http://127.0.0.1:8000/v1"},
    ]
    # what it printed is a config file that loads
    load_config(data=printed, environ={})


def test_a_model_without_a_backend_is_refused(capsys):
    assert main(["serve", "--model", "m", "--print-config"]) == 2
    assert "--backend" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("spec", "backend", "url"),
    [
        ("tgi:127.0.0.1:8080", "tgi", "http://127.0.0.1:8080"),
        ("ollama:127.0.0.1:11434", "ollama", "http://127.0.0.1:11434"),
        ("llamacpp:http://gpu:8080/", "llamacpp", "http://gpu:8080"),
        ("gpu:8080", "tgi", "http://gpu:8080"),
    ],
)
def test_more_inference_server_forms(spec, backend, url):
    entry = parse_inference_server(spec, "m")
    assert (entry["backend"], entry["url"]) == (backend, url)


@pytest.mark.parametrize("spec", ["vllm:127.0.0.1", "tgi:gpu", "ollama:host:port"])
def test_a_missing_port_is_an_error_not_port_80(spec):
    with pytest.raises(InferenceServerError, match="port"):
        parse_inference_server(spec, "m")


def test_check_without_the_secrets_lists_the_variables(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NEEDED_KEY", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text(
        "models:\n  - name: a\n    backend: openai\n    api_key: os.environ/NEEDED_KEY\n"
    )
    assert main(["check", "--config", str(path)]) == 2
    assert main(["check", "--no-env", "--config", str(path)]) == 0
    assert "NEEDED_KEY" in capsys.readouterr().out


def test_check_probe_says_what_answers_at_each_entry(tmp_path, capsys):
    from tests.fakes.ollama import FakeOllama

    with FakeOllama() as ollama, FakeOpenAI() as vllm:
        path = tmp_path / "c.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "models": [
                        {"name": "pulled", "backend": "ollama", "url": ollama.url,
                         "upstream_model": ollama.models[0]},
                        {"name": "not-pulled", "backend": "ollama", "url": ollama.url,
                         "upstream_model": "nope:70b"},
                        {"name": "good", "backend": "vllm", "url": vllm.url + "/v1",
                         "upstream_model": vllm.served_model},
                        {"name": "no-v1", "backend": "vllm", "url": vllm.url,
                         "upstream_model": vllm.served_model},
                    ]
                }
            )
        )  # fmt: skip
        assert main(["check", "--probe", "--config", str(path)]) == 1
    out = capsys.readouterr().out
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith(("ok", "FAIL"))}
    assert lines["pulled[0]"].startswith("ok")
    assert lines["not-pulled[0]"].startswith("FAIL") and "nope:70b" in lines["not-pulled[0]"]
    assert lines["good[0]"].startswith("ok")
    assert lines["no-v1[0]"].startswith("FAIL")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_start_up_failure_is_one_clear_line_not_a_traceback(workers):
    from tests.fakes.tgi import FakeTGI

    with FakeTGI() as tgi:
        tgi.chat_template = None  # a base model: TGI has no template to apply
        proc = _run(
            ["serve", "--port", str(19520 + int(workers)), "--workers", workers,
             "--backend", "tgi", "--url", tgi.url, "--model", "notpl"]
        )  # fmt: skip
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert "Traceback" not in out and "File " not in out
    assert "start-up failed: backend 'tgi' (notpl[0]) has no chat template" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "tgi", "--url", "http://h:1", "--model", "a", "--prompt-template",
          "llama3"], "--prompt-template llama3: after the last --model"),
        (["--config", "{file}", "--backend", "tgi", "--url", "http://h:1", "--model", "a"],
         "but --config names one"),
        (["--inference-server", "vllm:h:1", "--model", "a", "--model", "b"],
         "--inference-server serves one model"),
        (["--inference-server", "vllm:h:1", "--backend", "tgi", "--url", "http://h:1",
          "--model", "a"], "--inference-server and --backend/--url"),
        (["--inference-server", "", "--model", "a"], "--inference-server: empty"),
    ],
)  # fmt: skip
def test_command_line_options_are_never_silently_ignored(tmp_path, capsys, args, message):
    path = tmp_path / "f.yaml"
    path.write_text("models: [{name: e, backend: echo}]\n")
    args = [a.replace("{file}", str(path)) for a in args]
    assert main(["serve", *args, "--print-config"]) == 2
    assert message in capsys.readouterr().err


def test_a_config_named_by_the_environment_and_backend_options_conflict(
    tmp_path, capsys, monkeypatch
):
    path = tmp_path / "f.yaml"
    path.write_text("models: [{name: e, backend: echo}]\n")
    monkeypatch.setenv("INFERBRIDGE_CONFIG", str(path))
    args = ["serve", "--backend", "tgi", "--url", "http://h:1", "--model", "a", "--print-config"]
    assert main(args) == 2
    assert "INFERBRIDGE_CONFIG names one" in capsys.readouterr().err


def test_check_probe_says_what_it_did_not_check_and_what_the_servers_tell(tmp_path, capsys):
    from tests.fakes.llamacpp import FakeLlamaCpp
    from tests.fakes.ollama import FakeOllama
    from tests.fakes.tgi import FakeTGI

    with FakeTGI() as tgi, FakeLlamaCpp() as llama, FakeOllama() as ollama, FakeOpenAI() as vllm:
        path = tmp_path / "c.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "models": [
                        {"name": "sm", "backend": "sagemaker", "endpoint_name": "ep",
                         "region": "us-east-1", "prompt_template": "llama3"},
                        {"name": "no-v1", "backend": "vllm", "url": vllm.url,
                         "upstream_model": vllm.served_model},
                        {"name": "t", "backend": "tgi", "url": tgi.url},
                        {"name": "l", "backend": "llamacpp", "url": llama.url},
                        {"name": "o", "backend": "ollama", "url": ollama.url,
                         "upstream_model": ollama.models[0]},
                    ]
                }
            )
        )  # fmt: skip
        assert main(["check", "--probe", "--config", str(path)]) == 1
    out = capsys.readouterr().out
    lines = {
        line.split()[1]: line for line in out.splitlines() if line[:4] in ("ok  ", "FAIL", "skip")
    }
    assert lines["sm[0]"].startswith("skip") and "not probed" in lines["sm[0]"]
    assert lines["no-v1[0]"].startswith("FAIL") and f"try url: {vllm.url}/v1" in lines["no-v1[0]"]
    assert lines["t[0]"].startswith("ok") and f"version {tgi.info['version']}" in lines["t[0]"]
    assert f"context {tgi.info['max_input_tokens']}" in lines["t[0]"]
    assert "version b0-fake" in lines["l[0]"] and "context 4096" in lines["l[0]"]
    assert "version 0.12.6" in lines["o[0]"]


def test_the_cli_and_the_docs_list_the_log_levels_the_validator_accepts(capsys):
    from pathlib import Path
    from typing import get_args

    from inferbridge.config import ServerConfig

    levels = get_args(ServerConfig.model_fields["log_level"].annotation)
    for level in levels:
        assert main(["serve", "--log-level", level, "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["server"]["log_level"] == level
    docs = Path(__file__).parent.parent / "docs"
    row = next(
        line
        for line in (docs / "configuration.md").read_text().splitlines()
        if line.startswith("| `log_level`")
    )
    assert all(f"`{level}`" in row for level in levels)
    readiness = (docs / "routing.md").read_text().split("## Readiness")[1].split("\n## ")[0]
    assert "No authentication" not in readiness and '{"status": "ready"}' in readiness


def test_config_warnings_are_said_once_with_workers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "models:\n  - {name: m, backend: echo}\n  - {name: m, backend: echo, upstream_model: o}\n"
    )
    port = 19541
    proc = _run(["serve", "--config", str(path), "--port", str(port), "--workers", "2"])
    try:
        _wait_ready(port, proc)
        time.sleep(1)  # both workers are up
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert out.count("will be treated as deployments of one model") == 1, out


def test_an_address_in_use_is_named():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 19542))
        taken.listen()
        proc = _run(["serve", "--port", "19542"])
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 3
    assert "cannot listen on 127.0.0.1:19542: " in out and "Address already in use" in out
