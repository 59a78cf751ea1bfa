"""Backend registry: the `backend:` names a config entry may use, and their adapter classes.

Adapters are imported lazily, so a backend whose optional client library is missing only
fails (with an install hint) when a config entry actually uses it. Adding a backend is one
module plus one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inferbridge.backends.base import Backend
    from inferbridge.config import DeploymentConfig

# backend name -> "module:Class"
BACKENDS: dict[str, str] = {
    "echo": "inferbridge.backends.echo:EchoBackend",
    "vllm": "inferbridge.backends.openai_compat:OpenAICompatBackend",
    "openai-compatible": "inferbridge.backends.openai_compat:OpenAICompatBackend",
    "openai": "inferbridge.backends.openai_compat:OpenAIBackend",
    "tgi": "inferbridge.backends.tgi:TGIBackend",
    "llamacpp": "inferbridge.backends.llamacpp:LlamaCppBackend",
    "ollama": "inferbridge.backends.ollama:OllamaBackend",
    "h2ogpt": "inferbridge.backends.h2ogpt:H2OGPTBackend",
    "azure": "inferbridge.backends.azure:AzureBackend",
    "replicate": "inferbridge.backends.replicate:ReplicateBackend",
    "sagemaker": "inferbridge.backends.sagemaker:SageMakerBackend",
}

# Optional dependencies: backend name -> (import name, pip extra)
EXTRAS: dict[str, tuple[str, str]] = {
    "h2ogpt": ("gradio_client", "h2ogpt"),
    "sagemaker": ("boto3", "sagemaker"),
}


def backend_class(name: str) -> type[Backend]:
    try:
        target = BACKENDS[name]
    except KeyError:
        known = ", ".join(sorted(BACKENDS))
        raise KeyError(f"unknown backend '{name}' (known: {known})") from None
    if name in EXTRAS:
        module_name, extra = EXTRAS[name]
        try:
            importlib.import_module(module_name)
        except ImportError:
            raise KeyError(
                f"backend '{name}' needs the {module_name} package: "
                f"pip install 'inferbridge[{extra}]'"
            ) from None
    module_name, _, cls_name = target.partition(":")
    return getattr(importlib.import_module(module_name), cls_name)


def settings_class(name: str) -> type[DeploymentConfig]:
    return backend_class(name).Settings


def create(config: DeploymentConfig, *, drop_unsupported_default: bool = False) -> Backend:
    backend = backend_class(config.backend)(config)
    drop = config.drop_unsupported_params
    backend.drop_unsupported |= drop_unsupported_default if drop is None else drop
    return backend
