"""`inferbridge check --probe`: connect to every config entry and say what answers there.

Each deployment is started as the server would start it, asked to describe its upstream
(`Backend.probe`: the backend answers on that URL and base path, serves the entry's model,
and whatever the server tells about itself), and closed again. One line per entry: `ok`,
`FAIL` (with a hint at the base path when an answer was 404), or `skip` for an entry whose
adapter has nothing to ask its upstream (it is not reported as working). Where the server
tells, the line shows its version and the model's context length (TGI `GET /info`,
llama.cpp `GET /props`, Ollama `GET /api/version` and `POST /api/show`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from urllib.parse import urlsplit

from inferbridge.backends import registry
from inferbridge.backends.base import Backend
from inferbridge.config import Config, DeploymentConfig
from inferbridge.errors import InferbridgeError

PROBE_TIMEOUT = 15.0
DETAIL_TIMEOUT = 5.0
"""Seconds for the optional questions (version, context length) once the probe passed."""

OK, FAIL, SKIP = "ok", "FAIL", "skip"
OPENAI_STYLE = ("vllm", "openai-compatible", "openai")
"""Backends whose URL is an OpenAI base URL, normally ending in /v1."""


def can_probe(backend: Backend) -> bool:
    """Whether the adapter has anything to ask its upstream without a real request: a
    health check or a model list (what `Backend.probe` asks)."""
    return (
        getattr(backend, "health", None) is not None
        or getattr(backend, "list_models", None) is not None
    )


def path_hint(entry: DeploymentConfig, message: str) -> str:
    """A hint at the base path for a 404: an OpenAI-style URL without /v1, a TGI one with."""
    if "404" not in message or not entry.url:
        return ""
    path = urlsplit(entry.url).path.rstrip("/")
    if entry.backend in OPENAI_STYLE and not path.endswith("/v1"):
        return (
            f" (the URL has no /v1: OpenAI-compatible servers answer under it; "
            f"try url: {entry.url.rstrip('/')}/v1)"
        )
    if entry.backend in ("tgi", "llamacpp", "ollama") and path.endswith("/v1"):
        return f" ({entry.backend}'s native API has no /v1: remove it from the url)"
    return ""


async def _get(backend: Any, method: str, path: str, body: Any = None) -> Any:
    http = backend.http
    if method == "POST":
        request = http.post(path, body, timeout=DETAIL_TIMEOUT)
    else:
        request = http.request("GET", path, timeout=DETAIL_TIMEOUT)
    async with request as resp:
        return await http.read_json(resp)


async def server_details(backend: Backend) -> dict[str, Any]:
    """The server's version and the model's context length, where the server tells.
    Best effort: a question the server does not answer adds nothing."""
    kind = backend.config.backend
    found: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        if kind == "tgi":
            info = await _get(backend, "GET", "/info")
            found["version"] = info.get("version")
            found["context"] = info.get("max_input_tokens")
        elif kind == "llamacpp":
            props = await _get(backend, "GET", "/props")
            found["version"] = props.get("build_info")
            found["context"] = (props.get("default_generation_settings") or {}).get("n_ctx")
        elif kind == "ollama":
            found["version"] = (await _get(backend, "GET", "/api/version")).get("version")
            shown = await _get(backend, "POST", "/api/show", {"model": backend.config.target_model})
            info = shown.get("model_info") or {}
            found["context"] = next(
                (v for k, v in info.items() if k.endswith(".context_length")), None
            )
    return {k: v for k, v in found.items() if v is not None}


async def probe_entry(config: Config, index: int) -> tuple[bool, str]:
    """(passed, line) for one entry, without the server's details; an entry that was not
    probed has not failed."""
    status, line = await probe_status(config, index, details=False)
    return status != FAIL, line


async def probe_status(config: Config, index: int, *, details: bool = True) -> tuple[str, str]:
    """(status, line) for one entry: status is `ok`, `FAIL` or `skip`; with `details`, the
    line shows the server's version and context length where it tells."""
    entry = config.models[index]
    name = f"{entry.name}[{sum(1 for m in config.models[:index] if m.name == entry.name)}]"
    head = f"{name} ({entry.backend})"
    backend = registry.create(entry)
    if entry.backend == "echo":
        return OK, f"{head}: ok (built in: nothing to reach)"
    if not can_probe(backend):
        return SKIP, (
            f"{head}: not probed: the {entry.backend} adapter has no check it can make "
            "without sending a request; its first request will tell"
        )
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            await backend.start()
            found = await backend.probe()
            if details:
                found.update(await server_details(backend))
    except TimeoutError:
        return FAIL, f"{head}: no answer within {PROBE_TIMEOUT:g} s"
    except InferbridgeError as exc:
        return FAIL, f"{head}: {exc.message}{path_hint(entry, exc.message)}"
    except Exception as exc:  # a library's own failure (credentials, DNS...): say it plainly
        return FAIL, f"{head}: {type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):  # a half-started client must not hide the result
            await backend.close()
    told = ", ".join(f"{k} {v}" for k, v in found.items())
    return OK, f"{head}: ok" + (f" ({told})" if told else "")


async def probe_all(config: Config) -> list[tuple[str, str]]:
    """(status, line) of every entry, probed at once."""
    entries = range(len(config.models))
    return list(await asyncio.gather(*(probe_status(config, i) for i in entries)))
