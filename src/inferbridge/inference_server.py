"""h2oGPT `--inference_server` strings -> inferbridge model entries.

h2oGPT users describe a backend with one string; `inferbridge serve --inference-server STR
--model NAME` accepts the same strings for a one-backend start, and docs/migration-h2ogpt.md
shows the config entry each one becomes. Forms:

    http://host:port | host:port              TGI (native /generate)
    tgi:host:port | tgi:URL                   TGI (inferbridge's own prefix)
    ollama:host:port | ollama:URL             Ollama (native /api/chat; inferbridge's own)
    llamacpp:host:port | llamacpp:URL         llama.cpp's server (inferbridge's own)
    h2ogpt:http://host:port                   an h2oGPT Gradio server (inferbridge's own prefix)
    vllm:host:port | vllm:http://host:port/v1 OpenAI-compatible completions server
    vllm_chat:host:port | vllm_chat:URL       OpenAI-compatible chat server
    openai | openai_chat                      OpenAI (key from OPENAI_API_KEY)
    openai_azure_chat:DEPLOYMENT:BASEURL:API_VERSION[:KEY]   Azure OpenAI (also openai_azure)
    replicate:OWNER/NAME[:VERSION]            Replicate
    sagemaker_chat:ENDPOINT[:REGION]          SageMaker, chat-messages payload
    sagemaker:ENDPOINT[:REGION]               SageMaker, TGI container payload

Empty fields or the word `None` mean "not given", as in h2oGPT. A `host:port` needs its
port: `vllm:127.0.0.1` is refused rather than taken as port 80.
"""

from __future__ import annotations

from typing import Any


class InferenceServerError(ValueError):
    """The string is not one of the forms above."""


def _field(parts: list[str], i: int) -> str | None:
    value = parts[i].strip() if i < len(parts) else ""
    return None if value in ("", "None", "none") else value


def _origin(rest: str, spec: str) -> str:
    """`host:port` or a URL -> a URL without a trailing slash; a bare host needs its port."""
    if rest.startswith(("http://", "https://")):
        return rest.rstrip("/")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise InferenceServerError(
            f"{spec!r}: give the port as host:port (e.g. 127.0.0.1:8000), or a full URL"
        )
    return f"http://{rest}"


def _host_url(rest: str, spec: str) -> str:
    """`host:port` or a URL -> an OpenAI base URL ending in /v1."""
    url = _origin(rest, spec)
    return url if url.endswith("/v1") else url + "/v1"


def parse_inference_server(
    spec: str, model: str, *, prompt_template: str | None = None
) -> dict[str, Any]:
    """The config entry (a dict, validated later like any entry) for one h2oGPT string.

    `model` is h2oGPT's `--base_model`: the name clients send, and the upstream model name.
    """
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    entry: dict[str, Any] = {"name": model}
    if spec.startswith(("http://", "https://")):
        entry.update(backend="tgi", url=spec.rstrip("/"))
    elif kind in ("tgi", "ollama", "llamacpp") and rest:
        entry.update(backend=kind, url=_origin(rest, spec))
        if kind == "ollama":
            entry["upstream_model"] = model
    elif rest.isdigit() and kind:  # a bare host:port is TGI, as http://host:port is
        entry.update(backend="tgi", url=f"http://{spec}")
    elif kind == "h2ogpt" and rest:
        entry.update(backend="h2ogpt", url=rest.rstrip("/"))
    elif kind in ("vllm", "vllm_chat") and rest:
        entry.update(backend="vllm", url=_host_url(rest, spec), upstream_model=model)
    elif kind in ("openai", "openai_chat") and not rest:
        entry.update(backend="openai", api_key="os.environ/OPENAI_API_KEY", upstream_model=model)
    elif kind in ("openai_azure", "openai_azure_chat"):
        parts = rest.split(":") if rest else []
        # A base URL given with its scheme contains a ':' of its own: rejoin it.
        if len(parts) > 2 and parts[1] in ("http", "https"):
            parts[1:3] = [f"{parts[1]}:{parts[2]}"]
        deployment, base, version, key = (_field(parts, i) for i in range(4))
        if not base:
            raise InferenceServerError(
                f"{spec!r}: the Azure endpoint (BASEURL) is required in this form"
            )
        url = base if base.startswith(("http://", "https://")) else f"https://{base}"
        entry.update(
            backend="azure", url=url.rstrip("/"), api_key=key or "os.environ/OPENAI_API_KEY"
        )
        if deployment:
            entry["deployment"] = deployment
        entry["api_version"] = version or "2024-10-21"
    elif kind == "replicate" and rest:
        owner_name, _, version = rest.partition(":")
        entry.update(backend="replicate", api_key="os.environ/REPLICATE_API_TOKEN")
        if version:
            entry["version"] = version
        else:
            entry["model"] = owner_name
    elif kind in ("sagemaker", "sagemaker_chat") and rest:
        parts = rest.split(":")
        entry.update(
            backend="sagemaker",
            endpoint_name=_field(parts, 0),
            payload="messages" if kind == "sagemaker_chat" else "tgi",
        )
        region = _field(parts, 1)
        if region:
            entry["region"] = region
    else:
        raise InferenceServerError(
            f"unrecognised --inference-server {spec!r}: expected http://host:port, host:port, "
            "tgi:host:port, ollama:host:port, llamacpp:host:port, "
            "vllm:host:port, vllm_chat:URL, openai, openai_azure_chat:DEPLOYMENT:BASEURL:"
            "API_VERSION, replicate:OWNER/NAME[:VERSION], sagemaker[_chat]:ENDPOINT[:REGION] "
            "or h2ogpt:URL"
        )
    if prompt_template and entry["backend"] in ("tgi", "llamacpp", "replicate", "sagemaker"):
        entry["prompt_template"] = prompt_template
    return entry
