"""How upstream failures become inferbridge errors: an answer outside 2xx (`status_error`,
with the message and code found in whatever error body shape the backend uses) and a
failed exchange (`transport_error`, without the upstream's address), each naming the
deployment. `shown(error, secrets)` makes an error fit for a client: the entry's secrets,
and any URL, internal address or key-like fragment in upstream-supplied text, masked."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterable
from typing import Any

import aiohttp
import orjson

from inferbridge.errors import (
    UpstreamError,
    UpstreamNotServed,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)


def error_message(body: bytes) -> str:
    """The human message in an upstream error body, whatever shape the backend uses."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return text[:500] or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            for key in ("message", "detail", "error", "msg"):
                value = err.get(key)
                if isinstance(value, str) and value:
                    return value
            if isinstance(err.get("detail"), list):  # FastAPI-style validation errors
                return "; ".join(str(d.get("msg", d)) for d in err["detail"])
        elif isinstance(err, str) and err:
            return err
    return text[:500]


def error_code(body: bytes) -> str | None:
    """An upstream's own error `code` when it is a string (kept, e.g. Azure content_filter)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    err = data.get("error") if isinstance(data, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    return code if isinstance(code, str) else None


# Upstream refusals relayed with their status: the client's request is at fault. A 404 is
# not one of them: it says the deployment's path or model is wrong (`UpstreamNotServed`),
# and like 401/403 (the entry's credentials) and 405 (its path) it is the deployment's
# failure, retried elsewhere.
RELAYED_STATUSES = frozenset({400, 409, 413, 422})


def status_error(label: str, status: int, body: bytes, headers: Any = None) -> UpstreamError:
    """Map an upstream HTTP error status to the error inferbridge returns."""
    message = error_message(body)
    retry_after = headers.get("Retry-After") if headers is not None else None
    extra = {"Retry-After": retry_after} if retry_after else {}
    if status in (401, 403):
        return UpstreamError(
            f"{label} rejected inferbridge's credentials (HTTP {status}): {message}",
            backend=label,
        )
    if status == 429:
        err = UpstreamRejected(
            f"{label} is rate limiting: {message}", status=429, backend=label, headers=extra
        )
        err.type, err.code, err.retryable = "rate_limit_error", "rate_limit_exceeded", True
        return err
    if status == 404:
        return UpstreamNotServed(message, status=404, code=error_code(body), backend=label)
    if status in RELAYED_STATUSES:
        return UpstreamRejected(
            f"{message} (from {label})",
            status=400 if status == 422 else status,
            code=error_code(body),
            backend=label,
        )
    if status == 503:
        return UpstreamUnavailable(
            f"{label} is unavailable (HTTP 503): {message}", backend=label, headers=extra
        )
    if status in (408, 504):
        return UpstreamTimeout(f"{label} timed out (HTTP {status}): {message}", backend=label)
    return UpstreamError(f"{label} failed with HTTP {status}: {message}", backend=label)


def _reason(exc: aiohttp.ClientConnectorError) -> str:
    """Why a connection failed, without the address (it may be internal)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "its TLS certificate is not trusted"
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        return "the TLS handshake failed"
    code = exc.os_error.errno
    if isinstance(exc.os_error, socket.gaierror):
        return "its host name does not resolve"
    return os.strerror(code) if code else type(exc.os_error).__name__


def transport_error(label: str, exc: BaseException) -> UpstreamError:
    """Map an aiohttp or socket exception to the error inferbridge returns."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return UpstreamError(
            f"{label}: the proxy refused the connection (HTTP {exc.status}): {exc.message}",
            backend=label,
        )
    if isinstance(exc, aiohttp.ClientResponseError):  # the parser refused the answer's head
        return UpstreamError(f"{label} sent an invalid answer: {exc.message}", backend=label)
    if isinstance(exc, aiohttp.ClientConnectorError):  # refused, DNS, TLS, proxy: not sent
        return UpstreamError(f"{label} is unreachable ({_reason(exc)})", backend=label)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamTimeout(f"{label} did not answer in time (connecting)", backend=label)
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return UpstreamTimeout(
            f"{label} did not answer in time (nothing received for read_timeout)",
            backend=label,
        )
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"{label} did not answer in time", backend=label)
    if isinstance(exc, aiohttp.ClientPayloadError):  # cut short, or undecodable
        return UpstreamError(f"{label} closed the connection mid-response ({exc})", backend=label)
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError)):
        return UpstreamError(f"{label} closed the connection mid-response", backend=label)
    return UpstreamError(f"{label} failed ({type(exc).__name__})", backend=label)


def load_json(label: str, data: bytes, what: str = "stream event") -> Any:
    """Parse one JSON payload from a backend; garbage is the backend's protocol error."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamError(
            f"{label} sent an invalid {what}: {data[:200]!r}", backend=label
        ) from None


def deployment_failure(error: UpstreamError) -> UpstreamError:
    """The error a client gets for `error`: an upstream's refusal that is the deployment's
    fault (`UpstreamNotServed`, its 404) becomes the 502 naming the deployment; anything
    else is itself."""
    if isinstance(error, UpstreamNotServed):
        return error.failure()
    return error


# What upstream-supplied text must not show a client (`scrub`): URLs of any scheme (to the
# last character that is not sentence punctuation); addresses: IPv4 and IPv6 (bracketed or
# not, with or without a port), `user:password@host`, and a host name with a port
# (`localhost:11434`, `gpu7.internal:8000`); and what looks like a credential:
# OpenAI/Anthropic-style keys (`sk-...`, with the stars of a partly masked one), Hugging
# Face, Replicate and GitHub tokens, AWS access key ids, the value after `Bearer`/`Basic`
# (unless it is a lowercase word: "Bearer token required") or after `password=`,
# `token=`, `api-key=`..., and any run of 32 or more hex digits.
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s\"'<>`]*[^\s\"'<>`.,;:!?)\]}]")
_ADDRESS = re.compile(
    r"[\w.%+\-]+:[^\s@/:]+@[\w.\-]+(?::\d{1,5})?"  # user:password@host
    r"|\[[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*\](?::\d{1,5})?"  # [IPv6]:port
    r"|(?<![\w:.])(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{1,4})*(?![\w:]|\.\d)"
    r"|(?<![\w:.])(?:[0-9A-Fa-f]{1,4}:){0,6}[0-9A-Fa-f]{0,4}::"  # fe80::1, ::ffff:...
    r"(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4})*)?(?![\w:]|\.\d)"
    r"|(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?(?!\w|\.\d)"  # IPv4[:port]
    r"|(?<![\w.\-])(?:localhost|[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+):\d{1,5}\b"  # host:port
)
_KEY = re.compile(
    r"(?<![\w*-])(?:(?:sk|pk|rk)[-_][\w*\-]{3,}|(?:hf|r8)_[\w*]{6,}|A[KS]IA[0-9A-Z*]{8,}"
    r"|gh[pousr]_[A-Za-z0-9*]{16,}|[0-9A-Fa-f]{32,})"
    r"|(?<=\b[Bb]earer )(?![a-z]+(?:[\s,;]|$))[^\s\"',;]+"
    r"|(?<=\bBasic )(?![a-z]+(?:[\s,;]|$))[^\s\"',;]+"
    r"|(?i:(?<=password=)|(?<=passwd=)|(?<=secret=)|(?<=token=)|(?<=api-key=)|(?<=api_key=)"
    r"|(?<=apikey=))[^\s\"',;&]+"
)


def scrub(text: str) -> str:
    """`text` without URLs (`<url>`), addresses (`<address>`) and key-like fragments
    (`***`)."""
    if "://" in text:
        text = _URL.sub("<url>", text)
    text = _ADDRESS.sub("<address>", text)
    return _KEY.sub("***", text)


def shown(error: UpstreamError, secrets: Iterable[str] = ()) -> UpstreamError:
    """`error` as a client may see it: the entry's own `secrets` masked, then `scrub`bed
    (the message may quote an upstream: its error body, its stream's error event)."""
    error.redact(list(secrets))
    clean = scrub(error.message)
    if clean != error.message:
        error.message = clean
        error.args = (clean,)
    return error
