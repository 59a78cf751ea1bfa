"""Azure OpenAI: the OpenAI protocol behind Azure's URLs, query and auth headers.

Two URL forms (see docs/backends/azure.md):

- classic: `{url}/openai/deployments/{deployment}/chat/completions?api-version={api_version}`
  (and `/completions`); the deployment in the path selects the model.
- v1 (`api_version: v1`, or a `url` that already ends in `/openai/v1`):
  `{url}/openai/v1/chat/completions` with `model` = the deployment name, no api-version.

Auth: `api_key` is sent as the `api-key` header (classic) or as `Authorization: Bearer`
(v1, as Microsoft's examples do with the plain OpenAI client); `azure_ad_token` (an Entra ID
token) is always `Authorization: Bearer`.

Everything else is `OpenAICompatBackend`: the body is relayed as the client sent it, and the
stream handling there already drops Azure's empty-`choices` chunks (prompt filter results),
relays `finish_reason: "content_filter"`, and the shared HTTP error mapping keeps Azure's
string error `code` ("content_filter" on a prompt the filter blocked, as a 400).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from pydantic import Field, model_validator
from yarl import URL

from inferbridge.backends.openai_compat import OpenAICompatBackend, OpenAICompatSettings
from inferbridge.backends.urls import join_url
from inferbridge.request import InferenceRequest

V1_SUFFIX = "/openai/v1"


class AzureSettings(OpenAICompatSettings):
    url: str = Field(description="The resource endpoint, e.g. https://NAME.openai.azure.com.")
    deployment: str | None = Field(
        default=None, description="The deployment name (defaults to upstream_model or name)."
    )
    api_version: str | None = Field(
        default=None,
        description="The api-version query value (e.g. 2024-10-21), or 'v1' for the v1 API.",
    )
    azure_ad_token: str | None = Field(
        default=None, description="A Microsoft Entra ID token, sent as Authorization: Bearer."
    )

    @property
    def v1(self) -> bool:
        return self.api_version == "v1" or URL(self.url).path.rstrip("/").endswith(V1_SUFFIX)

    @property
    def deployment_name(self) -> str:
        return self.deployment or self.target_model

    @model_validator(mode="after")
    def _check(self) -> AzureSettings:
        if self.api_key and self.azure_ad_token:
            raise ValueError("set api_key or azure_ad_token, not both")
        if not self.v1 and not self.api_version:
            raise ValueError(
                "api_version is required for Azure's deployment URLs (e.g. 2024-10-21); "
                "use api_version: v1 for the v1 API"
            )
        return self


class AzureBackend(OpenAICompatBackend):
    """Azure OpenAI deployments (classic api-version URLs or the v1 API)."""

    Settings = AzureSettings
    list_models = None  # Azure lists base models, not the deployments entries name

    @property
    def azure(self) -> AzureSettings:
        assert isinstance(self.config, AzureSettings)
        return self.config

    def base_url(self) -> str:
        cfg = self.azure
        if cfg.v1:
            return join_url(cfg.url, V1_SUFFIX, strip=V1_SUFFIX)
        return join_url(cfg.url, f"/openai/deployments/{quote(cfg.deployment_name, safe='')}")

    def health_path(self) -> str:
        cfg = self.azure
        if cfg.v1:
            return "/models"
        return join_url(cfg.url, f"/openai/models?api-version={cfg.api_version}")

    def upstream_headers(self) -> dict[str, str]:
        cfg = self.azure
        if cfg.azure_ad_token:
            return {"Authorization": f"Bearer {cfg.azure_ad_token}"}
        if not cfg.api_key:
            return {}
        if cfg.v1:
            return {"Authorization": f"Bearer {cfg.api_key}"}
        return {"api-key": cfg.api_key}

    def endpoint(self, request: InferenceRequest) -> tuple[str, dict[str, str] | None]:
        path, _ = super().endpoint(request)
        cfg = self.azure
        if cfg.v1:
            return path, None
        assert cfg.api_version is not None
        return path, {"api-version": cfg.api_version}

    def responses_endpoint(self) -> tuple[str, dict[str, str] | None]:
        """v1: `{url}/openai/v1/responses`; classic: `{url}/openai/responses?api-version=`
        (the Responses API is not under the deployment's path)."""
        cfg = self.azure
        if cfg.v1:
            return "/responses", None
        assert cfg.api_version is not None
        return join_url(cfg.url, "/openai/responses"), {"api-version": cfg.api_version}

    def responses_upstream_body(self, request: InferenceRequest) -> dict[str, Any]:
        body = super().responses_upstream_body(request)
        body["model"] = self.azure.deployment_name  # the deployment, in both URL forms
        return body

    def upstream_body(self, request: InferenceRequest) -> dict[str, Any]:
        body = super().upstream_body(request)
        # v1: the model field selects the deployment; classic: the path does, and the
        # field is ignored (sent anyway, as Azure's own SDK does).
        body["model"] = self.azure.deployment_name
        return body
