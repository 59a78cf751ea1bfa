"""One exception hierarchy, rendered as the OpenAI error envelope.

Everything that can go wrong in a request is an `InferbridgeError` with an HTTP status and
the four envelope fields `{"error": {"message", "type", "param", "code"}}`. The OpenAI
layer catches these and nothing else reaches a client: an unexpected exception becomes a
500 envelope without a traceback.

Backend failures are `UpstreamError`s; their message always names the backend that failed.
"""

from __future__ import annotations

from typing import Any

import orjson


class InferbridgeError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}

    def redact(self, secrets: list[str]) -> InferbridgeError:
        """Mask every one of `secrets` in the message (an upstream may echo a key back)."""
        message = self.message
        for secret in secrets:
            if secret in message:
                message = message.replace(secret, "***")
        if message != self.message:
            self.message = message
            self.args = (message,)
        return self

    def envelope(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return orjson.dumps(self.envelope())


class InvalidRequest(InferbridgeError):
    """400: the client's request is malformed or asks for something the model cannot do."""

    status = 400
    type = "invalid_request_error"


class UnsupportedParameter(InvalidRequest):
    code = "unsupported_parameter"

    def __init__(self, param: str, model: str, backend: str) -> None:
        super().__init__(
            f"Parameter '{param}' is not supported by model '{model}' (backend {backend}). "
            "Remove it, or set drop_unsupported_params: true for this model to ignore it.",
            param=param,
        )


class AuthenticationFailed(InferbridgeError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotFound(InferbridgeError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{shown_name(model)}' does not exist.", param="model")


def shown_name(name: str, limit: int = 200) -> str:
    """A client-given name as an error message repeats it: control characters escaped,
    at most `limit` characters."""
    if not name.isprintable():
        name = name.encode("unicode_escape").decode("ascii")
    return name if len(name) <= limit else name[:limit] + "..."


class NotFound(InferbridgeError):
    status = 404
    type = "invalid_request_error"


class PayloadTooLarge(InferbridgeError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(InferbridgeError):
    """415: the body is not sent as JSON."""

    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class HeadersTooLarge(InferbridgeError):
    """431: the request's headers are over `server.max_header_bytes`."""

    status = 431
    type = "invalid_request_error"
    code = "headers_too_large"


class RequestTimeout(InferbridgeError):
    """408: the body did not arrive within `server.body_timeout`."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class RateLimited(InferbridgeError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamError(InferbridgeError):
    """502: the backend failed (refused, broke the protocol, or died mid-stream)."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"
    retryable = True

    def __init__(self, message: str, *, backend: str = "", **kw: Any) -> None:
        super().__init__(message, **kw)
        self.backend = backend

    @classmethod
    def truncated(cls, backend: str) -> UpstreamError:
        """The backend's stream ended without its protocol's end marker."""
        return cls(f"{backend} ended the stream before the answer was complete", backend=backend)


class DeploymentMisconfigured(UpstreamError):
    """502: this deployment cannot serve the request as it is configured (for example a
    chat request to a raw-prompt backend with no chat template, configured or on the
    server). Not the client's fault: like any upstream failure it is retried on the
    model's other deployments. The message names the deployment and the setting to fix."""

    code = "deployment_misconfigured"


class UpstreamUnavailable(UpstreamError):
    """503: the backend says it is not ready or overloaded."""

    status = 503
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    """504: the backend did not answer in time."""

    status = 504
    code = "upstream_timeout"


class UpstreamRejected(UpstreamError):
    """The backend refused the request itself (4xx): relayed with its status and message.

    Not retryable: another deployment would refuse the same request.
    """

    type = "invalid_request_error"
    code = None
    retryable = False

    def __init__(self, message: str, *, status: int, **kw: Any) -> None:
        super().__init__(message, status=status, **kw)


class UpstreamNotServed(UpstreamRejected):
    """The upstream answered 404: nothing is served at the entry's path, or not its model
    (`url` without `/v1`, an Ollama model not pulled, an Azure deployment that does not
    exist). That is the deployment's configuration, not the client's request: retried on
    the model's other deployments like any upstream failure, and answered as `failure()`,
    a 502 naming the deployment. Adapters still see the upstream's status (a 404 from a
    route a server may lack tells them something)."""

    retryable = True

    def __init__(self, detail: str, *, status: int, backend: str, **kw: Any) -> None:
        super().__init__(f"{detail} (from {backend})", status=status, backend=backend, **kw)
        self.detail = detail

    def failure(self) -> DeploymentMisconfigured:
        """What the client gets: a 502 naming the backend and deployment, never the URL."""
        return DeploymentMisconfigured(
            f"{self.backend} failed with HTTP {self.status}: {self.detail} (is the entry's "
            "url, with its base path, or its upstream_model wrong?)",
            backend=self.backend,
        )
