"""The checks every API request passes before a route sees it, as plain ASGI middleware.

`RequestGate` runs on the headers, before any body is read:
- their total size (`server.max_header_bytes`, 431);
- the API key, as `Authorization: Bearer KEY`, `api-key` (Azure's clients) or `x-api-key`
  (Anthropic's) (401 as soon as the headers are in, so a client without a key cannot make
  the server buffer a body);
- for POST requests: the content type must be JSON (415), and a
  declared `content-length` must be within `server.max_body_bytes` (413).
Then it reads the body itself, bounded in size (413) and in time (`server.body_timeout`,
408), checks that it is JSON (400: malformed, not UTF-8, unpaired surrogates, nested too
deep), and hands the route the whole body. A request refused before its body was read
is answered with `connection: close`.

Health, metrics and the API documentation are public; every other path needs the key
when keys are configured. Errors use the OpenAI envelope, or Anthropic's on the Anthropic
routes (`/v1/messages*`).
"""

from __future__ import annotations

import asyncio

import orjson
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferbridge import ids
from inferbridge.api.anthropic.errors import error_body as anthropic_error_body
from inferbridge.api.anthropic.errors import is_anthropic_path
from inferbridge.api.protocol import check_values, too_deep
from inferbridge.errors import (
    HeadersTooLarge,
    InferbridgeError,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from inferbridge.gateway import Gateway
from inferbridge.keys import IDENTITY
from inferbridge.observability import AnswerWatch

PUBLIC_PATHS = frozenset(
    {
        "/health",
        "/health/readiness",
        "/metrics",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/openapi.json",
    }
)
"""Paths served without a key (`/metrics` too, unless `server.metrics_auth`)."""
DOCS_ASSETS = "/static-offline-docs/"
"""Where the documentation pages' scripts and styles are served from (public too)."""
BODY_METHODS = frozenset({"POST"})


def is_json(content_type: str | None) -> bool:
    """`application/json`, with or without parameters (`; charset=utf-8`)."""
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def has_body(headers: Headers) -> bool:
    """The request announces a body (a non-zero `content-length`, or chunks)."""
    length = headers.get("content-length")
    return "transfer-encoding" in headers or (length is not None and length.strip("0") != "")


def check_json(body: bytes) -> None:
    """A 400 for a body that is not JSON (malformed, not UTF-8, an unpaired surrogate) or
    that nests too deep (`check_values`). Integers past 64 bits, which orjson reads as
    floats, are found where the route validates the body (schema bounds, `normalize`)."""
    if not body:
        return  # the route says the body is missing
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            raise too_deep() from None
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    check_values(value)


def request_id_of(headers: Headers) -> str:
    """The client's `x-request-id` when it is a sane token, else a new id."""
    given = headers.get("x-request-id")
    if given and len(given) <= 200 and given.isascii() and given.isprintable():
        return given
    return ids.new_id()


async def send_error(
    send: Send, exc: InferbridgeError, request_id: str, *, close: bool = False, path: str = ""
) -> None:
    """`exc` as the whole answer, in the envelope of the API `path` belongs to; `close`:
    the connection is closed after it (a body that was refused unread, or too slow, is not
    read on)."""
    body = anthropic_error_body(exc) if is_anthropic_path(path) else exc.body()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGate:
    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway
        self.max_body = gateway.config.server.max_body_bytes
        self.body_timeout = gateway.config.server.body_timeout
        self.max_headers = gateway.config.server.max_header_bytes
        self.public = PUBLIC_PATHS
        if gateway.config.server.metrics_auth:
            self.public = PUBLIC_PATHS - {"/metrics"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = request_id_of(headers)
        scope.setdefault("state", {})["request_id"] = request_id
        size = sum(len(name) + len(value) + 4 for name, value in scope["headers"])
        if size > self.max_headers:
            too_large = HeadersTooLarge(
                f"The request headers are larger than the limit of {self.max_headers} "
                "bytes (server.max_header_bytes)."
            )
            self.rejected(scope, request_id, too_large)
            await send_error(send, too_large, request_id, close=True, path=scope["path"])
            return
        if scope["path"] in self.public or scope["path"].startswith(DOCS_ASSETS):
            await self.app(scope, receive, send)
            return
        body: bytes | None = None
        try:
            scope["state"][IDENTITY] = self.gateway.authenticate(
                headers.get("authorization"), headers.get("api-key") or headers.get("x-api-key")
            )
            if scope["method"] in BODY_METHODS:
                body = await self.read_body(headers, receive)
                check_json(body)
        except _ClientLeft:
            self.rejected(scope, request_id)
            return
        except InferbridgeError as exc:
            self.rejected(scope, request_id, exc)
            # a body refused unread (or too slow) is not read on: the connection closes
            close = body is None and has_body(headers)
            await send_error(send, exc, request_id, close=close, path=scope["path"])
            return
        if body is not None:
            receive = _replay(body, receive)
        # an access-log line for a request no generation route logs (GET /v1/models...)
        watch = AnswerWatch(self.gateway.observability, send, request_id)
        await watch.serve(self.app, scope, receive)

    def rejected(self, scope: Scope, request_id: str, exc: InferbridgeError | None = None) -> None:
        """Count and log a request refused here (`exc`), or whose client left (499)."""
        self.gateway.observability.rejected(
            exc.status if exc is not None else 499,
            error=exc,
            path=scope["path"],
            method=scope["method"],
            request_id=request_id,
        )

    async def read_body(self, headers: Headers, receive: Receive) -> bytes:
        if not is_json(headers.get("content-type")):
            raise UnsupportedMediaType(
                "Unsupported Content-Type: send the body as JSON with "
                "'Content-Type: application/json'.",
                param="Content-Type",
            )
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise self.too_large()
        try:
            async with asyncio.timeout(self.body_timeout):
                return await self._read(receive)
        except TimeoutError:
            raise RequestTimeout(
                f"The request body did not arrive within {self.body_timeout:g} s."
            ) from None

    async def _read(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientLeft
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > self.max_body:
                    raise self.too_large()
                chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"The request body is larger than the limit of {self.max_body} bytes "
            "(server.max_body_bytes)."
        )


class _ClientLeft(Exception):
    """The client disconnected while sending its body."""


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the app the body read already, then the real messages (so the
    app still learns of a disconnect)."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay
