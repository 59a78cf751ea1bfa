"""The pooled HTTP client every HTTP backend uses, and its failure mapping.

One `HttpUpstream` per deployment: keep-alive connection pools (`http1.Client`) opened at
start-up and closed at shutdown, with the entry's connect and total timeouts. It turns every
transport failure and every non-2xx answer into an `UpstreamError` subclass that names the
backend, so adapters only deal with their protocol:

    async with self.http.post("/generate", payload) as resp:   # raises on non-2xx
        async for batch in self.http.events(resp, parser):
            yield batch                                         # raises on a broken stream

`parser` (a `StreamParser`, usually an `ItemParser` over an SSE or NDJSON decoder) turns
the body into events. `iter_chunks(resp)` gives the raw body pieces for protocols that
need their own loop.

`resp` has `status`, `headers.get(name)` (any case) and `await resp.read()`. The client is
inferbridge's own lean HTTP/1.1 client (`http1.py`), because aiohttp's client cost ~205 µs
of CPU per request and most of the per-chunk read path in the benchmark (aiohttp had
replaced httpx's pool, measured ~8x costlier still).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any, Protocol

import orjson

from inferbridge.backends.http1 import (
    Client,
    ConnectError,
    ConnectionClosed,
    HttpClientError,
    Response,
)
from inferbridge.decoders import NDJSONDecoder, SSEDecoder
from inferbridge.errors import (
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from inferbridge.events import Event


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


# Upstream refusals relayed with their status: the client's request is at fault.
RELAYED_STATUSES = frozenset({400, 404, 409, 413, 422})


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


def transport_error(label: str, exc: BaseException) -> UpstreamError:
    """Map a client (`http1`) or socket exception to the error inferbridge returns."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, ConnectError):
        return UpstreamError(f"{label} is unreachable: {exc}", backend=label)
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"{label} did not answer in time", backend=label)
    if isinstance(exc, ConnectionClosed):
        return UpstreamError(f"{label} closed the connection mid-response", backend=label)
    return UpstreamError(f"{label} failed: {type(exc).__name__}: {exc}", backend=label)


def load_json(label: str, data: bytes, what: str = "stream event") -> Any:
    """Parse one JSON payload from a backend; garbage is the backend's protocol error."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamError(
            f"{label} sent an invalid {what}: {data[:200]!r}", backend=label
        ) from None


class StreamParser(Protocol):
    """Turns a streamed body into events for `HttpUpstream.events`; one per answer."""

    done: bool
    """The protocol's own end was seen (e.g. `data: [DONE]`): the rest is not read."""
    error: UpstreamError | None
    """Set instead of raising, so the events decoded before the error still go out."""

    def feed(self, data: bytes) -> list[Event]:
        """Events of the next piece of body (bytes may split anywhere)."""
        ...

    def finish(self) -> list[Event]:
        """Events left at the end of the body; sets `error` if the answer was cut short."""
        ...


class ItemParser:
    """The usual `StreamParser`: a decoder cuts the body into items (SSE events, NDJSON
    lines) and `take(item, batch)` appends each item's events to the batch, returning True
    at the protocol's end marker; adapters pass `take` or override the method. An
    `UpstreamError` raised by `take` stops the stream after the events before it; a body
    that ends before the marker is truncated (unless `complete_without_marker`).
    """

    __slots__ = ("_take", "decoder", "done", "error", "label")

    def __init__(
        self,
        label: str,
        decoder: SSEDecoder | NDJSONDecoder,
        take: Callable[[Any, list[Event]], bool] | None = None,
    ) -> None:
        self.label = label
        self.decoder = decoder
        self._take = take
        self.done = False
        self.error: UpstreamError | None = None

    def take(self, item: Any, batch: list[Event]) -> bool:
        """Append the events of one item to `batch`; True at the protocol's end marker."""
        raise NotImplementedError

    def feed(self, data: bytes) -> list[Event]:
        return self._items(self.decoder.feed(data))

    def finish(self) -> list[Event]:
        batch = self._items(self.decoder.flush())
        if not self.done and self.error is None and not self.complete_without_marker():
            self.error = UpstreamError.truncated(self.label)
        return batch

    def complete_without_marker(self) -> bool:
        """Whether an answer whose end marker never came is whole anyway (no, by default)."""
        return False

    def _items(self, items: list[Any]) -> list[Event]:
        batch: list[Event] = []
        if self.done or self.error is not None:
            return batch
        take = self._take or self.take
        try:
            for item in items:
                if take(item, batch):
                    self.done = True
                    break
        except UpstreamError as exc:
            self.error = exc
        return batch


# What the client raises for a failed exchange (TimeoutError is an OSError).
_FAILURES = (OSError, HttpClientError)


class HttpUpstream:
    """A keep-alive connection pool to one upstream base URL."""

    @classmethod
    def for_deployment(
        cls,
        config: Any,
        label: str,
        *,
        base_url: str | None = None,
        headers: dict[str, str] | None = None,
        error_mapper: Callable[[str, int, bytes, Any], UpstreamError] = status_error,
    ) -> HttpUpstream:
        """The pool for one config entry: its URL and timeouts, its `api_key` as a bearer
        token (unless `headers` says otherwise) and its extra `headers:`."""
        if headers is None:
            headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        return cls(
            base_url or config.url,
            label=label,
            timeout=config.timeout,
            connect_timeout=config.connect_timeout,
            headers={**headers, **config.headers},
            error_mapper=error_mapper,
        )

    def __init__(
        self,
        base_url: str,
        *,
        label: str,
        timeout: float,
        connect_timeout: float,
        headers: dict[str, str] | None = None,
        error_mapper: Callable[[str, int, bytes, Any], UpstreamError] = status_error,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.label = label
        self.headers = headers or {}
        self.error_mapper = error_mapper
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._client: Client | None = None

    async def start(self) -> None:
        if self._client is None:
            self._client = Client(self.base_url, self.headers)

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | None = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> _Exchange:
        """Send a request (`async with`); yields the 2xx response, or raises the mapped
        UpstreamError. `timeout` (seconds) overrides the entry's total timeout."""
        return _Exchange(self, method, path, json, data, params, headers, timeout)

    def post(self, path: str, payload: Any, **kw: Any) -> _Exchange:
        return self.request("POST", path, json=payload, **kw)

    async def events(self, resp: Response, parser: StreamParser) -> AsyncIterator[list[Event]]:
        """The body's events, batch by batch (one per upstream read), as `parser` decodes
        them. A parse error is raised after the events before it were yielded."""
        read = resp.read_any
        try:
            while not parser.done:
                data = await read()
                if not data:
                    break
                batch = parser.feed(data)
                if batch:
                    yield batch
                if parser.error is not None:
                    raise parser.error
            if parser.error is None:
                batch = parser.finish()
                if batch:
                    yield batch
            if parser.error is not None:
                raise parser.error
        except _FAILURES as exc:
            raise transport_error(self.label, exc) from exc

    async def iter_chunks(self, resp: Response) -> AsyncIterator[bytes]:
        """The body as it arrives: everything received since the last read, with failures
        mapped."""
        read = resp.read_any
        try:
            while chunk := await read():
                yield chunk
        except _FAILURES as exc:
            raise transport_error(self.label, exc) from exc

    async def read_json(self, resp: Response) -> Any:
        try:
            body = await resp.read()
        except _FAILURES as exc:
            raise transport_error(self.label, exc) from exc
        return load_json(self.label, body, "JSON answer")


class _Exchange:
    """`async with http.request(...) as resp`: sends on enter, releases the connection on
    exit (back to the pool once the body is complete, closed otherwise)."""

    __slots__ = ("args", "resp", "up")

    def __init__(self, up: HttpUpstream, *args: Any) -> None:
        self.up = up
        self.args = args
        self.resp: Response | None = None

    async def __aenter__(self) -> Response:
        up = self.up
        method, path, json, data, params, headers, timeout = self.args
        if up._client is None:
            raise UpstreamError(f"{up.label}: client not started", backend=up.label)
        total = up.timeout if timeout is None else timeout
        connect = up.connect_timeout
        content_type = None
        if json is not None:
            data, content_type = orjson.dumps(json), "application/json"
        try:
            resp = await up._client.send(
                method, path, data, params, headers, total, connect, content_type
            )
            if resp.status >= 400:
                try:
                    body = await resp.read()
                finally:
                    resp.release()
                raise up.error_mapper(up.label, resp.status, body, resp.headers)
        except _FAILURES as exc:
            raise transport_error(up.label, exc) from exc
        self.resp = resp
        return resp

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.resp is not None:
            self.resp.release()
        if isinstance(exc, _FAILURES):
            raise transport_error(self.up.label, exc) from exc
