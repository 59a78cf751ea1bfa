"""The configuration's shape: one pydantic model per section (`server`, `auth`, `state`,
`router`, `responses`) and per model entry (`DeploymentConfig`, subclassed by each backend's
settings). Loading a file into them is `inferbridge.config.load_config`."""

from __future__ import annotations

import ipaddress
from datetime import datetime
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

_SECRET_WORDS = ("api_key", "access_key", "ad_token", "api_token", "secret", "password")


class TLSConfig(BaseModel):
    """`tls:` of a model entry: how HTTPS connections to its upstream are verified."""

    model_config = ConfigDict(extra="forbid")

    ca_file: FilePath | None = Field(
        default=None, description="PEM bundle of the CAs to trust instead of the system's."
    )
    verify: bool = Field(default=True, description="Verify the certificate and host name.")
    client_cert: FilePath | None = Field(
        default=None, description="PEM client certificate (mutual TLS); may hold the key."
    )
    client_key: FilePath | None = Field(default=None, description="PEM key of `client_cert`.")

    @model_validator(mode="after")
    def _key_needs_cert(self) -> TLSConfig:
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("client_key needs client_cert")
        return self


class DeploymentConfig(BaseModel):
    """Fields every model entry has. Backends subclass this with their own fields."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="The model name clients send.")
    id: str | None = Field(
        default=None,
        min_length=1,
        description="Short stable id of this deployment in messages, logs and metrics "
        "(default: the name and the entry's position among that name's entries, `name[0]`).",
    )
    backend: str
    url: str | None = None
    upstream_model: str | None = Field(
        default=None, description="The model name sent upstream (defaults to `name`)."
    )
    api_key: str | None = None
    timeout: float = Field(default=600.0, gt=0, description="Total seconds for one request.")
    connect_timeout: float = Field(default=10.0, gt=0)
    # -- the HTTP client (HTTP backends; docs/configuration.md) --
    read_timeout: float | None = Field(
        default=None,
        gt=0,
        description="Seconds without a byte from the upstream (for the head or the body).",
    )
    max_connections: int = Field(
        default=1024,
        ge=1,
        description="Connections open to each upstream origin at most (a stream holds one "
        "for its whole length).",
    )
    pool_timeout: float = Field(
        default=30.0, gt=0, description="Seconds a request may wait for a free connection."
    )
    max_response_bytes: int = Field(
        default=64 * 1024 * 1024, gt=0, description="Largest non-streamed answer body read."
    )
    proxy: str | None = Field(
        default=None, description="HTTP proxy URL (else HTTP(S)_PROXY / NO_PROXY)."
    )
    tls: TLSConfig | None = None
    params: dict[str, Any] = Field(
        default_factory=dict, description="Default request parameters for this model."
    )
    drop_unsupported_params: bool | None = None
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra HTTP headers sent upstream."
    )
    weight: float = Field(default=1.0, gt=0)
    owned_by: str = "inferbridge"
    # -- what the entry serves (docs/embeddings.md) --
    mode: Literal["chat", "embeddings", "both"] | None = Field(
        default=None,
        description="chat (and legacy completions), embeddings or both (default: both for "
        "echo, chat for the others).",
    )
    embedding_batch_size: int | None = Field(
        default=None, ge=1, description="Inputs per upstream embeddings call at most."
    )
    # -- reliability (docs/routing.md) --
    ttft_timeout: float | None = Field(
        default=None, gt=0, description="Seconds to the first token of a streamed answer."
    )
    stream_idle_timeout: float | None = Field(
        default=None, gt=0, description="Seconds without a token before a stream is cut."
    )
    max_concurrent: int | None = Field(
        default=None, ge=1, description="Requests in flight on this deployment at most."
    )
    max_queue: int = Field(default=0, ge=0, description="Requests waiting for a free slot.")
    queue_timeout: float = Field(default=30.0, gt=0, description="Seconds one may wait.")

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("url")
    @classmethod
    def _upstream_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https:// (got {value!r})")
        return value

    @property
    def target_model(self) -> str:
        return self.upstream_model or self.name

    def describe(self) -> str:
        """How messages, logs and metrics name this deployment: `backend 'vllm' (mistral[0])`,
        never by its URL (which may hold credentials or internal addresses)."""
        return f"backend '{self.backend}' ({self.id or self.name})"

    def secrets(self) -> list[str]:
        """Values of this entry that must never reach a client: keys, tokens, header values,
        the URL's user info and query values (masked in relayed upstream text)."""
        found: list[str] = []
        for key, value in self.model_dump().items():
            if isinstance(value, str) and any(w in key for w in _SECRET_WORDS):
                found.append(value)
        for value in self.headers.values():
            found.append(value)
            found.append(value.partition(" ")[2])  # the token of "Bearer TOKEN"
        if self.url:
            parts = urlsplit(self.url)
            found += [parts.password or "", parts.username or ""]
            found += [v for _, v in parse_qsl(parts.query)]
        return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)


class CorsConfig(BaseModel):
    """`server.cors`: which web origins may call the API from a browser."""

    model_config = ConfigDict(extra="forbid")

    allow_origins: list[str] = Field(min_length=1)
    allow_methods: list[str] = Field(default_factory=lambda: ["GET", "POST", "OPTIONS"])
    allow_headers: list[str] = Field(
        default_factory=lambda: [
            "authorization",
            "content-type",
            "api-key",
            "x-api-key",
            "anthropic-version",
            "anthropic-beta",
            "x-request-id",
        ]
    )
    allow_credentials: bool = False
    max_age: int = Field(default=600, ge=0)


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=5000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    log_format: Literal["json", "text"] | None = None
    """Process logs on stderr: JSON lines or readable text (default: text when stderr is a
    terminal, JSON otherwise). The access log is JSON lines either way."""
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    body_timeout: float = Field(default=30.0, gt=0)
    """Seconds a request body may take to arrive once its headers are in."""
    drop_unsupported_params: bool = False
    log_prompts: bool = False
    """Log prompts and completions (off by default: they are private)."""
    max_fanout: int = Field(default=16, ge=1)
    """Choices one request may ask for at most: `n` times the number of prompts."""
    limit_concurrency: int | None = Field(default=2048, ge=1)
    """Connections and requests served at once; past it uvicorn answers 503."""
    timeout_keep_alive: float = Field(default=5.0, gt=0)
    """Seconds an idle keep-alive connection stays open."""
    cors: CorsConfig | None = None
    """Browser access from other origins (off by default)."""
    drain_timeout: float = Field(default=30.0, ge=0)
    """On shutdown, seconds in-flight requests may take to finish before they are cut."""
    access_log: bool = True
    """One JSON line per request on stderr (ids, model, status, timings, token counts)."""
    allow_open: bool = False
    """Serve without API keys on an address other than loopback (refused otherwise)."""
    metrics_auth: bool = False
    """`/metrics` needs an API key too."""
    max_header_bytes: int = Field(default=32 * 1024, ge=1024)
    """Request headers larger than this, all together, are refused (431)."""

    def loopback(self) -> bool:
        """Whether `host` is reachable from this machine only."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class KeyConfig(BaseModel):
    """One entry of `auth.keys`: a named key with its own models and limits
    (docs/keys-and-limits.md). The secret is `key:` (`os.environ/NAME`, or a `sha256:<hex>`
    digest) or `key_sha256:`; it is never shown in logs, metrics or messages."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    """Not `api_keys[i]` / `admin_keys[i]`: the names plain keys go by."""
    key: str | None = Field(default=None, min_length=1, repr=False)
    key_sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$", repr=False)
    models: list[str] | None = None
    """Models (or aliases) this key may use; the others answer 404. None: every model."""
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_parallel: int | None = Field(default=None, ge=1)
    expires_at: datetime | None = None
    """After it the key answers 401 (a time without a zone is UTC)."""

    @field_validator("name")
    @classmethod
    def _not_a_plain_keys_name(cls, name: str) -> str:
        if name.startswith(("api_keys[", "admin_keys[")):
            raise PydanticCustomError(
                "reserved_name",
                "'{name}' is the name of a plain key (auth.api_keys); choose another",
                {"name": name},
            )
        return name

    @model_validator(mode="after")
    def _one_secret(self) -> KeyConfig:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError(f"key '{self.name}': give exactly one of key and key_sha256")
        return self

    @property
    def limited(self) -> bool:
        return bool(self.rpm or self.tpm or self.max_parallel)


class StateConfig(BaseModel):
    """`state:`: where limits, in-flight counts, cooldowns and usage live
    (docs/keys-and-limits.md). `memory`: this process only; `redis`: shared by every
    replica (Redis or Valkey)."""

    model_config = ConfigDict(extra="forbid")

    store: Literal["memory", "redis"] = "memory"
    url: str | None = Field(default=None, repr=False)
    """redis://[user:password@]host:port/db, rediss:// for TLS, unix:///path.sock."""
    timeout: float = Field(default=0.05, gt=0, le=10)
    """Seconds one store call may take, connecting included; past it on_store_error."""
    on_store_error: Literal["allow", "deny"] = "allow"
    prefix: str = Field(default="inferbridge", min_length=1)
    """Prefix of every Redis key (several inferbridge deployments may share one Redis)."""
    lease_ttl: float = Field(default=10.0, ge=0.5, le=300)
    """Seconds an in-flight count outlives a replica that died holding it."""
    sync_interval: float = Field(default=0.25, gt=0, le=5)
    """Seconds between two reads of the shared cooldowns and in-flight counts."""
    max_connections: int = Field(default=16, ge=2, le=1024)
    """Connections to the store per process, opened at start-up; a burst of requests takes
    turns on them (each check is one short script) instead of opening one each."""

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        redis = info.data.get("store") == "redis"
        if value and redis and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @model_validator(mode="after")
    def _url(self) -> StateConfig:
        if self.store == "redis" and not self.url:
            raise ValueError("store: redis needs url: (redis://host:6379/0)")
        return self


class AuthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    enabled: bool = True
    """False only when meant: `INFERBRIDGE_AUTH=off` (the start-up line says so)."""
    api_keys: list[str] = Field(default_factory=list)
    named_keys: list[KeyConfig] = Field(default_factory=list, alias="keys")
    """`auth.keys`: named keys with models and limits (`keys` below is another thing)."""
    admin_keys: list[str] = Field(default_factory=list)
    """Keys that may read `GET /v1/usage` (and use the API without limits)."""

    @field_validator("named_keys")
    @classmethod
    def _unique_names(cls, keys: list[KeyConfig]) -> list[KeyConfig]:
        names = [k.name for k in keys]
        for name in dict.fromkeys(n for n in names if names.count(n) > 1):
            raise ValueError(f"two keys are named '{name}'")
        return keys

    @field_validator("api_keys", "admin_keys")
    @classmethod
    def _non_empty(cls, keys: list[str]) -> list[str]:
        for i, key in enumerate(keys):
            if not key.strip():
                raise ValueError(
                    f"key {i} is empty (an os.environ/ variable set to nothing?); "
                    "remove it, or set INFERBRIDGE_AUTH=off to serve without keys"
                )
        return keys

    @property
    def keys(self) -> list[str]:
        """The plain `api_keys` in force: none when auth is turned off."""
        return self.api_keys if self.enabled else []

    @property
    def required(self) -> bool:
        """Whether requests need a key: some key of any kind is configured and auth is on."""
        return self.enabled and bool(self.api_keys or self.named_keys or self.admin_keys)


Strategy = Literal["simple-shuffle", "least-busy", "latency-based"]


class ModelRouting(BaseModel):
    """`router.models.<name>`: settings of one model (all its deployments)."""

    model_config = ConfigDict(extra="forbid")

    strategy: Strategy | None = None
    retries: int | None = Field(default=None, ge=0)
    fallbacks: list[str] = Field(default_factory=list)
    rpm: int | None = Field(default=None, ge=1)
    """Requests per minute for this model, all deployments and keys together."""
    tpm: int | None = Field(default=None, ge=1)
    """Tokens (prompt + completion) per minute for this model."""


class RouterConfig(BaseModel):
    """`router:`: how requests are spread, retried and failed over (docs/routing.md)."""

    model_config = ConfigDict(extra="forbid")

    strategy: Strategy = "simple-shuffle"
    retries: int = Field(default=2, ge=0)
    retry_backoff: float = Field(default=0.1, ge=0)
    retry_backoff_max: float = Field(default=2.0, ge=0)
    retry_after_max: float = Field(default=10.0, ge=0)
    allowed_fails: int = Field(default=3, ge=1)
    fail_window: float = Field(default=60.0, gt=0)
    cooldown: float = Field(default=30.0, ge=0)
    latency_window: float = Field(default=120.0, gt=0)
    health_check_interval: float | None = Field(default=None, gt=0)
    health_check_timeout: float = Field(default=5.0, gt=0)
    models: dict[str, ModelRouting] = Field(default_factory=dict)


class ResponsesConfig(BaseModel):
    """`responses:`: the store behind the Responses API's `store: true` (docs/responses.md)."""

    model_config = ConfigDict(extra="forbid")

    store_ttl: float = Field(default=3600.0, gt=0)
    """Seconds a stored response stays retrievable and continuable."""
    max_stored: int = Field(default=10_000, ge=0)
    """Responses kept at most (least recently used dropped first); 0 stores none."""
    max_stored_bytes: int = Field(default=128 * 1024 * 1024, gt=0)
    """Bytes of stored responses (serialized, with their conversations) at most."""
    max_record_bytes: int = Field(default=1024 * 1024, gt=0)
    """With `state: {store: redis}`: the largest record (serialized) kept in Redis; a larger
    one is not stored (a warning). It must move within `state.timeout`."""


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    server: ServerConfig = Field(default_factory=ServerConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    responses: ResponsesConfig = Field(default_factory=ResponsesConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    model_aliases: dict[str, str] = Field(default_factory=dict)
    models: list[DeploymentConfig] = Field(default_factory=list)
    missing_env: list[str] = Field(default_factory=list, exclude=True)
    """Variables the file names that were unset (only with `require_env=False`)."""

    def model_names(self) -> list[str]:
        return list(dict.fromkeys(m.name for m in self.models))


DEFAULT_MODELS: list[dict[str, Any]] = [{"name": "echo", "backend": "echo"}]
