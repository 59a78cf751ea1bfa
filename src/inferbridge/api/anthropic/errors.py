"""Anthropic's error envelope, for every error answered on `/v1/messages*`.

    {"type": "error", "error": {"type": "not_found_error", "message": "..."}}

The status is inferbridge's (a 502, 503 or 504 stays one); the error type is Anthropic's for
that status: 400 and other 4xx `invalid_request_error`, 401 `authentication_error`, 403
`permission_error`, 404 `not_found_error`, 413 `request_too_large`, 429 `rate_limit_error`,
503 and 529 `overloaded_error`, 504 `timeout_error`, other 5xx `api_error`.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from inferbridge.errors import InferbridgeError

PREFIX = "/v1/messages"

ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def is_anthropic_path(path: str) -> bool:
    """Whether `path` is one of the Anthropic routes (their errors use this envelope)."""
    return path.startswith(PREFIX) and (len(path) == len(PREFIX) or path[len(PREFIX)] == "/")


def error_type(status: int) -> str:
    found = ERROR_TYPES.get(status)
    if found is not None:
        return found
    return "api_error" if status >= 500 else "invalid_request_error"


def envelope(err: InferbridgeError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(err.status), "message": err.message}}


def error_body(err: InferbridgeError) -> bytes:
    return orjson.dumps(envelope(err))


def error_response(err: InferbridgeError, request_id: str | None = None) -> Response:
    """`err` in Anthropic's envelope, with its status and headers."""
    headers = dict(err.headers)
    if request_id:
        headers["x-request-id"] = request_id
    return Response(error_body(err), err.status, headers, media_type="application/json")
