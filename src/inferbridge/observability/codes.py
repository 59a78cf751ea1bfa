"""The error vocabulary of metrics and access logs: one code per kind of failure, and
the outcome class of a request (`ok`, `client_error`, `upstream_error`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from inferbridge.errors import InferbridgeError, UpstreamError, UpstreamRejected

if TYPE_CHECKING:
    pass

_now = time.perf_counter

ERROR_CODES: dict[str, str] = {
    "invalid_request": "400: the request is malformed (JSON, schema, values, choices)",
    "unsupported_parameter": "400: a parameter the model's backend does not support",
    "context_length_exceeded": "400: the prompt is longer than the model's context",
    "chat_template_error": "400: the model's chat template refused the conversation",
    "invalid_api_key": "401: missing or wrong API key",
    "expired_api_key": "401: the key is past its expires_at",
    "insufficient_permissions": "403: the key may not do this (GET /v1/usage without an admin key)",
    "not_found": "404: unknown path or stored object",
    "model_not_found": "404: unknown model",
    "method_not_allowed": "405: wrong method for the path",
    "request_timeout": "408: the body did not arrive within server.body_timeout",
    "request_too_large": "413: body over server.max_body_bytes",
    "unsupported_media_type": "415: a POST whose body is not JSON",
    "headers_too_large": "431: headers over server.max_header_bytes",
    "rate_limit_exceeded": "429: every deployment full (limits), or the upstream's 429",
    "client_error": "another 4xx",
    "client_disconnected": "the client left before the end (499 before the answer started)",
    "upstream_rejected": "the upstream refused the request itself (its 4xx, relayed)",
    "upstream_error": "502: the upstream failed, refused the connection or broke its protocol",
    "deployment_misconfigured": "502: the deployment cannot serve the request as configured",
    "upstream_unavailable": "503: the upstream is not ready, or every deployment cools down",
    "upstream_timeout": "504: the upstream did not answer in time",
    "internal_error": "500: a bug in inferbridge (logged with its traceback)",
    "store_unavailable": "503: the shared state store did not answer (on_store_error: deny)",
    "server_error": "another 5xx",
}
"""code -> meaning. Every `code` (`inferbridge_errors_total`), `kind`
(`inferbridge_upstream_errors_total`) and access-log `error` is one of these."""

_BY_STATUS = {
    400: "invalid_request",
    401: "invalid_api_key",
    403: "insufficient_permissions",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limit_exceeded",
    431: "headers_too_large",
    499: "client_disconnected",
    500: "internal_error",
    502: "upstream_error",
    503: "upstream_unavailable",
    504: "upstream_timeout",
}

OUTCOMES = ("ok", "client_error", "upstream_error")
"""The `outcome` label of the histograms: answered; refused or left by the client (4xx,
the limits' 429, disconnects, a 4xx the upstream gave the request); failed upstream or in
the server (5xx, the upstream's 429, a stream cut by its upstream)."""


def code_for_status(status: int) -> str:
    return _BY_STATUS.get(status) or ("client_error" if status < 500 else "server_error")


def classify(
    error: BaseException | None, status: int, disconnected: bool = False
) -> tuple[str | None, str]:
    """(error code from `ERROR_CODES` or None, outcome from `OUTCOMES`) of a request that
    ended with `error` (or none), `status`, and whether its client left."""
    if error is None:
        if disconnected:
            return "client_disconnected", "client_error"
        if status < 400:
            return None, "ok"
        return code_for_status(status), "client_error" if status < 500 else "upstream_error"
    code = getattr(error, "code", None)
    if isinstance(error, UpstreamError) and (
        error.retryable or not isinstance(error, UpstreamRejected)
    ):  # the upstream failed (its 429 included), not the request
        if code not in ERROR_CODES:
            code = _BY_STATUS.get(error.status) if error.status >= 500 else None
        return code or "upstream_error", "upstream_error"
    if not isinstance(error, InferbridgeError):
        return "internal_error", "upstream_error"
    status = error.status
    if code not in ERROR_CODES:
        code = "upstream_rejected" if isinstance(error, UpstreamRejected) else None
    return code or code_for_status(status), "client_error" if status < 500 else "upstream_error"
