"""The app as users serve it, end to end through the official `openai` SDK.

Two commands serve the same FastAPI app and must answer alike:
- `inferbridge serve --config FILE` (run as `python -m inferbridge serve`);
- plain `uvicorn --factory inferbridge.app:create_app`, with the file named by
  `INFERBRIDGE_CONFIG`.

Each command runs once for the module, as a subprocess on a free 127.0.0.1 port, with a
config holding the echo model and one API key.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

API_KEY = "sk-test"
CONFIG: dict[str, Any] = {
    "models": [{"name": "echo", "backend": "echo"}],
    "auth": {"api_keys": [API_KEY]},
    "server": {"access_log": False},
}
START_TIMEOUT = 20.0


@dataclass
class Served:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=20)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def uvicorn_command() -> list[str]:
    """The `uvicorn` script installed next to this Python (`python -m uvicorn` without it)."""
    script = Path(sys.executable).with_name("uvicorn")
    return [str(script)] if script.exists() else [sys.executable, "-m", "uvicorn"]


def command(name: str, port: int, config: Path) -> tuple[list[str], dict[str, str]]:
    """The command line and the environment of `name`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERBRIDGE_")}
    if name == "inferbridge-serve":
        args = [sys.executable, "-m", "inferbridge", "serve", "--port", str(port)]
        return [*args, "--host", "127.0.0.1", "--config", str(config)], env
    assert name == "uvicorn-factory"
    args = [*uvicorn_command(), "--factory", "inferbridge.app:create_app"]
    env["INFERBRIDGE_CONFIG"] = str(config)
    return [*args, "--host", "127.0.0.1", "--port", str(port)], env


def wait_for_health(served: Served) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if served.process.poll() is not None:
            raise AssertionError(f"the server exited:\n{served.log.read_text()}")
        try:
            if httpx.get(served.url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"no /health within {START_TIMEOUT} s:\n{served.log.read_text()}")


@pytest.fixture(scope="module", params=["inferbridge-serve", "uvicorn-factory"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp(request.param)
    config = folder / "inferbridge.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    port = free_port()
    args, env = command(request.param, port, config)
    log = folder / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    served = Served(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_for_health(served)
        yield served
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def say(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def test_chat_completion(served):
    r = served.client().chat.completions.create(model="echo", messages=say("hello big world"))
    assert r.object == "chat.completion"
    assert r.choices[0].message.content == "hello big world"
    assert r.choices[0].finish_reason == "stop"


def test_chat_completion_streamed(served):
    stream = served.client().chat.completions.create(
        model="echo", messages=say("one two three"), stream=True
    )
    chunks = list(stream)  # returns only once the stream has ended ([DONE])
    assert chunks and {c.object for c in chunks} == {"chat.completion.chunk"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "one two three"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_legacy_completion(served):
    r = served.client().completions.create(model="echo", prompt="an old prompt")
    assert r.object == "text_completion"
    assert r.choices[0].text == "an old prompt"


def test_models_list(served):
    models = served.client().models.list()
    assert [m.id for m in models.data] == ["echo"]


def test_unknown_model(served):
    with pytest.raises(openai.NotFoundError):
        served.client().chat.completions.create(model="nope", messages=say("x"))


def test_invalid_parameter_named(served):
    with pytest.raises(openai.BadRequestError) as caught:
        served.client().chat.completions.create(
            model="echo",
            messages=say("x"),
            temperature="hot",  # type: ignore[arg-type]
        )
    body = caught.value.body
    param = body.get("param") if isinstance(body, dict) else None
    assert param == "temperature" or "temperature" in str(caught.value), body


def test_wrong_api_key(served):
    with pytest.raises(openai.AuthenticationError):
        served.client(api_key="sk-wrong").chat.completions.create(model="echo", messages=say("x"))


def test_openapi_documents_the_completion_routes(served):
    spec = httpx.get(served.url + "/openapi.json", timeout=10).json()
    schemas = spec["components"]["schemas"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        body = spec["paths"][path]["post"]["requestBody"]
        ref = body["content"]["application/json"]["schema"]["$ref"]
        prefix = "#/components/schemas/"
        assert ref.startswith(prefix), ref
        schema = schemas[ref.removeprefix(prefix)]
        assert "model" in schema["properties"], schema
