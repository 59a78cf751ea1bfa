"""The HTTP client every HTTP backend uses (aiohttp). Failures are mapped to errors by
`upstream_errors`; streamed bodies are read as events by `stream_parsing`; URLs and TLS
settings come from `urls`.

One `HttpUpstream` per deployment owns one `aiohttp.ClientSession` (opened in `start()`,
closed in `close()`) configured from the entry: timeouts, connection limit, proxy, TLS,
body limit. It turns every transport failure and every answer outside 2xx into an
`UpstreamError` subclass that names the backend, so adapters only deal with their protocol:

    async with self.http.post("/generate", payload) as resp:   # raises unless 2xx
        async for batch in self.http.events(resp, parser):
            yield batch                                         # raises on a broken stream

`parser` (a `StreamParser`, usually an `ItemParser` over an SSE or NDJSON decoder) turns
the body into events, one batch per upstream read. `iter_chunks(resp)` gives the raw body
pieces for protocols that need their own loop; `read_json(resp)` the whole body, parsed.
`path` is joined to the base URL's path, the base URL's query string kept
(`urls.join_url`), or is an absolute URL (Replicate's stream and cancel URLs).

`resp` (an `UpstreamResponse`) has `status`, `headers.get(name)` (any case) and
`await resp.read()`. What the client guarantees:

- At most `max_connections` connections per origin; a request waits `pool_timeout`
  seconds for a free one, then fails with `UpstreamUnavailable`.
- `connect_timeout` to connect, `read_timeout` (optional) for each wait for more of the
  body, `timeout` for the whole exchange (a request may pass its own).
- Response heads are bounded (line and field sizes, header count); non-streamed bodies
  read with `read()` / `read_json()` are bounded by `max_response_bytes`.
- Proxies: the entry's `proxy`, else HTTP_PROXY / HTTPS_PROXY / NO_PROXY as they were at
  `start()`. TLS: the entry's `tls` (CA file, verification, client certificate).
- gzip and deflate answers are decompressed. Redirects are not followed: a 3xx is an error
  (its target goes to the log, without its query string, not into the error).
- A POST is never sent twice: one whose connection closes before the answer fails (the
  router decides about retries). aiohttp sends a GET (idempotent) once more when a pooled
  connection turns out to be closed.
- A connection goes back to the pool only when its answer was read to the end. Leaving
  `async with` early closes it, so the upstream sees the disconnect and stops generating;
  after a stream's end marker (`parser.done`) the rest of the body (the chunked
  terminator) is read, briefly, so the connection can be reused.
- Upstream cookies are not kept.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any
from urllib.request import getproxies_environment, proxy_bypass_environment

import aiohttp
import orjson
from multidict import CIMultiDictProxy
from yarl import URL

from inferbridge.backends.stream_parsing import ItemParser, StreamParser
from inferbridge.backends.upstream_errors import (
    RELAYED_STATUSES,
    error_code,
    error_message,
    load_json,
    status_error,
    transport_error,
)
from inferbridge.backends.urls import join_url, split_user_info, ssl_context, without_query
from inferbridge.config import ConfigError, DeploymentConfig, TLSConfig
from inferbridge.errors import (
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from inferbridge.events import Event

__all__ = [  # what adapters import from here
    "RELAYED_STATUSES",
    "HttpUpstream",
    "ItemParser",
    "StreamParser",
    "UpstreamResponse",
    "error_code",
    "error_message",
    "load_json",
    "status_error",
    "transport_error",
]

# Response head limits (aiohttp's parser): one status or header line, one header field,
# and the number of header lines.
MAX_LINE_SIZE = 8190
MAX_FIELD_SIZE = 16384
MAX_HEADERS = 128
ERROR_BODY_BYTES = 64 * 1024  # of an error answer's body, read for its message
DRAIN_BYTES = 64 * 1024  # read after a stream's end marker, at most, to reuse the connection
DRAIN_TIMEOUT = 1.0  # seconds
DEFAULT_HEADERS = {"User-Agent": "inferbridge"}
JSON_HEADERS = {"Content-Type": "application/json"}

Origin = tuple[str, str, int | None]
log = logging.getLogger("inferbridge.upstream")


_FAILURES = (aiohttp.ClientError, OSError)


Reader = Callable[[], Awaitable[bytes]]
"""Everything received since the last call, as one `bytes`; b"" at the end of the body."""


class UpstreamResponse:
    """A 2xx answer: `status`, `headers` (any case) and the body, through `read()`
    (bounded by `max_response_bytes`), `read_any()` or `HttpUpstream.events` /
    `iter_chunks`."""

    __slots__ = ("_body", "_limit", "ended", "headers", "label", "raw", "read_any", "status")

    def __init__(self, raw: aiohttp.ClientResponse, up: HttpUpstream) -> None:
        self.raw = raw
        self.status = raw.status
        self.headers: CIMultiDictProxy[str] = raw.headers
        self.label = up.label
        self.read_any: Reader = up.reader(raw.content)
        self._limit = up.max_response_bytes
        self._body: bytes | None = None
        self.ended = False
        """The protocol's end marker was seen: only the body's own end may follow."""

    async def read(self) -> bytes:
        """The whole body (kept, so reading twice gives it twice)."""
        if self._body is None:
            self._body = await read_body(self.raw, self.read_any, self._limit, self.label)
        return self._body


async def read_body(
    raw: aiohttp.ClientResponse, read: Reader, limit: int, label: str, *, truncate: bool = False
) -> bytes:
    """The body, decompressed. Beyond `limit` bytes the connection is closed, and the
    answer is an UpstreamError (or, with `truncate`, its first `limit` bytes)."""
    length = raw.content_length
    if length is not None and length > limit and not truncate:
        raw.close()
        raise _too_large(label, limit)
    parts: list[bytes] = []
    size = 0
    while data := await read():
        size += len(data)
        if size > limit:
            raw.close()
            if not truncate:
                raise _too_large(label, limit)
            parts.append(data[: len(data) - (size - limit)])
            break
        parts.append(data)
    return b"".join(parts)


def _too_large(label: str, limit: int) -> UpstreamError:
    return UpstreamError(
        f"{label} sent an answer larger than max_response_bytes ({limit} bytes)", backend=label
    )


def settle(resp: aiohttp.ClientResponse) -> None:
    """Done with an answer: its connection goes back to the pool only if the body was
    received to its end; otherwise it is closed (its leftover bytes die with it)."""
    content = resp.content
    if content.is_eof() and content.exception() is None:
        resp.release()
    else:
        resp.close()


class HttpUpstream:
    """One upstream base URL: an aiohttp session (pools per origin), limits and errors."""

    @classmethod
    def for_deployment(
        cls,
        config: DeploymentConfig,
        label: str,
        *,
        base_url: str | None = None,
        headers: dict[str, str] | None = None,
        error_mapper: Callable[[str, int, bytes, Any], UpstreamError] = status_error,
    ) -> HttpUpstream:
        """The client for one config entry: its URL, timeouts, limits, proxy and TLS, its
        `api_key` as a bearer token (unless `headers` says otherwise) and its `headers:`."""
        if headers is None:
            headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        return cls(
            base_url or config.url or "",
            label=label,
            timeout=config.timeout,
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
            max_connections=config.max_connections,
            pool_timeout=config.pool_timeout,
            max_response_bytes=config.max_response_bytes,
            proxy=config.proxy,
            tls=config.tls,
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
        read_timeout: float | None = None,
        max_connections: int = 100,
        pool_timeout: float = 30.0,
        max_response_bytes: int = 64 * 1024 * 1024,
        proxy: str | None = None,
        tls: TLSConfig | None = None,
        headers: dict[str, str] | None = None,
        error_mapper: Callable[[str, int, bytes, Any], UpstreamError] = status_error,
    ) -> None:
        self.base_url, basic = split_user_info(base_url.rstrip("/"))
        self.label = label
        self.headers = headers or {}
        if basic is not None:
            if any(k.lower() == "authorization" for k in self.headers):
                raise ConfigError(
                    f"{label}: the URL carries a user and password and the entry sets an "
                    "Authorization header too (api_key or headers:); keep one"
                )
            self.headers = {**self.headers, "Authorization": basic}
        self.error_mapper = error_mapper
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.pool_timeout = pool_timeout
        self.max_response_bytes = max_response_bytes
        self.proxy = proxy
        self.tls = tls
        self._session: aiohttp.ClientSession | None = None
        self._env_proxies: dict[str, str] = {}
        self._targets: dict[str, tuple[URL, Origin]] = {}  # path -> (URL, origin), cached
        self._slots: dict[Origin, asyncio.Semaphore] = {}  # free connections per origin
        self._proxies: dict[Origin, str | None] = {}
        self._timeouts: dict[float | None, aiohttp.ClientTimeout] = {}

    async def start(self) -> None:
        """Open the session (inside the running loop); read the proxy environment."""
        if self._session is not None:
            return
        self._env_proxies = getproxies_environment()
        self._proxies.clear()
        try:
            tls = ssl_context(self.tls)
        except OSError as exc:  # ssl.SSLError too: an unreadable or invalid PEM file
            raise ConfigError(f"{self.label}: tls: {exc}") from exc
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=self.max_connections, ssl=tls)
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={**DEFAULT_HEADERS, **self.headers},
            timeout=self._client_timeout(self.timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
            max_line_size=MAX_LINE_SIZE,
            max_field_size=MAX_FIELD_SIZE,
            max_headers=MAX_HEADERS,
        )

    async def close(self) -> None:
        """Close the session and every connection it holds."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        self._slots.clear()

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
        UpstreamError. `path` is joined to the base URL unless it is an absolute URL.
        `timeout` (seconds) overrides the entry's total timeout."""
        return _Exchange(self, method, path, json, data, params, headers, timeout)

    def post(self, path: str, payload: Any, **kw: Any) -> _Exchange:
        return self.request("POST", path, json=payload, **kw)

    def reader(self, content: aiohttp.StreamReader) -> Reader:
        """`content.readany`, failing with UpstreamTimeout after `read_timeout` seconds
        without data when the entry sets one."""
        seconds = self.read_timeout
        if seconds is None:
            return content.readany
        label = self.label

        async def read_any() -> bytes:
            deadline = asyncio.timeout(seconds)
            try:
                async with deadline:
                    return await content.readany()
            except TimeoutError:
                if not deadline.expired():
                    raise  # the total timeout
                raise UpstreamTimeout(
                    f"{label} did not answer in time (nothing received for "
                    f"{seconds:g} s: read_timeout)",
                    backend=label,
                ) from None

        return read_any

    async def events(
        self, resp: UpstreamResponse, parser: StreamParser
    ) -> AsyncIterator[list[Event]]:
        """The body's events, batch by batch (one per upstream read), as `parser` decodes
        them. A parse error is raised after the events before it were yielded."""
        read = resp.read_any
        try:
            while not parser.done:
                data = await read()
                if not data:
                    break
                batch = parser.feed(data)
                if parser.done:
                    resp.ended = True
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

    async def iter_chunks(self, resp: UpstreamResponse) -> AsyncIterator[bytes]:
        """The body as it arrives: everything received since the last read, with failures
        mapped."""
        read = resp.read_any
        try:
            while chunk := await read():
                yield chunk
        except _FAILURES as exc:
            raise transport_error(self.label, exc) from exc

    async def read_json(self, resp: UpstreamResponse) -> Any:
        """The whole body (at most `max_response_bytes`), parsed as JSON."""
        try:
            body = await resp.read()
        except _FAILURES as exc:
            raise transport_error(self.label, exc) from exc
        return load_json(self.label, body, "JSON answer")

    # -- internals --------------------------------------------------------------------------
    def _target(self, path: str) -> tuple[URL, Origin]:
        """The URL of `path` and its origin (scheme, host, port), cached per path."""
        hit = self._targets.get(path)
        if hit is None:
            text = path
            try:
                if not path.startswith(("http://", "https://")):
                    text = join_url(self.base_url, path)
                url = URL(text)
            except ValueError:
                url = None
            if url is None or url.scheme not in ("http", "https") or not url.host:
                raise UpstreamError(
                    f"{self.label}: invalid upstream URL {text!r}", backend=self.label
                )
            if len(self._targets) >= 256:
                self._targets.clear()
            hit = self._targets[path] = (url, (url.scheme, url.host, url.port))
        return hit

    async def _acquire(self, origin: Origin) -> asyncio.Semaphore:
        """A connection slot for `origin`: at once, or the first one freed within
        `pool_timeout`."""
        slots = self._slots.get(origin)
        if slots is None:
            slots = self._slots[origin] = asyncio.Semaphore(self.max_connections)
        if not slots.locked():
            await slots.acquire()  # returns without suspending
            return slots
        try:
            async with asyncio.timeout(self.pool_timeout):
                await slots.acquire()
        except TimeoutError:
            raise UpstreamUnavailable(
                f"{self.label} has no free connection: all {self.max_connections} "
                f"(max_connections) stayed busy for {self.pool_timeout:g} s (pool_timeout)",
                backend=self.label,
            ) from None
        return slots

    def _proxy_for(self, origin: Origin) -> str | None:
        """The entry's proxy, else the environment's for this origin (NO_PROXY honoured)."""
        if self.proxy is not None:
            return self.proxy
        try:
            return self._proxies[origin]
        except KeyError:
            pass
        scheme, host, port = origin
        env = self._env_proxies
        proxy = env.get(scheme) or None
        if proxy is not None:
            if proxy_bypass_environment(f"{host}:{port}" if port else host, env):
                proxy = None
            elif "://" not in proxy:
                proxy = f"http://{proxy}"
        self._proxies[origin] = proxy
        return proxy

    def _client_timeout(self, total: float | None) -> aiohttp.ClientTimeout:
        """aiohttp's timeouts for a request whose total timeout is `total`. aiohttp never
        waits for a pooled connection (`_acquire` does, first): `connect` only bounds
        connecting (TCP, proxy, TLS). `read_timeout` is applied by `reader`, not as
        aiohttp's `sock_read`: in aiohttp 3.14, a body that ends while reading is paused
        (a reader behind by 2 x read_bufsize) re-arms `sock_read` on the connection once
        it is back in the pool, and the next request on it fails at once."""
        timeout = self._timeouts.get(total)
        if timeout is None:
            if len(self._timeouts) >= 64:
                self._timeouts.clear()
            timeout = self._timeouts[total] = aiohttp.ClientTimeout(
                total=total,
                connect=self.connect_timeout + self.pool_timeout,
                sock_connect=self.connect_timeout,
            )
        return timeout

    async def _refuse(self, raw: aiohttp.ClientResponse) -> UpstreamError:
        """The error for an answer outside 2xx, with the message of its (bounded) body."""
        try:
            read = self.reader(raw.content)
            body = await read_body(raw, read, ERROR_BODY_BYTES, self.label, truncate=True)
        except (*_FAILURES, UpstreamError):
            body = b""  # the status says enough
        finally:
            settle(raw)
        status = raw.status
        if status < 400:
            # The target is not the client's business (it may carry a token, or name an
            # internal host): the log has it, without its query string.
            location = raw.headers.get("Location", "")
            log.warning(
                "%s answered HTTP %d, a redirect to %s",
                self.label,
                status,
                without_query(location)[:200] or "(no Location)",
            )
            return UpstreamError(
                f"{self.label} answered with an unexpected redirect (HTTP {status}); "
                "check the entry's url (the log has the target)",
                backend=self.label,
            )
        return self.error_mapper(self.label, status, body, raw.headers)


def _with_json_type(headers: dict[str, str] | None) -> dict[str, str]:
    if not headers:
        return JSON_HEADERS
    if any(name.lower() == "content-type" for name in headers):
        return headers
    return {**JSON_HEADERS, **headers}


class _Exchange:
    """`async with http.request(...) as resp`: takes a connection slot and sends on enter;
    on exit gives the slot back and settles the answer (pooled once complete, closed
    otherwise; a stream past its end marker is first read to its end, briefly)."""

    __slots__ = ("args", "resp", "slots", "up")

    def __init__(self, up: HttpUpstream, *args: Any) -> None:
        self.up = up
        self.args = args
        self.resp: UpstreamResponse | None = None
        self.slots: asyncio.Semaphore | None = None

    async def __aenter__(self) -> UpstreamResponse:
        up = self.up
        method, path, json, data, params, headers, timeout = self.args
        session = up._session
        if session is None:
            raise UpstreamError(f"{up.label}: client not started", backend=up.label)
        url, origin = up._target(path)
        slots = await up._acquire(origin)
        try:
            if json is not None:
                data, headers = orjson.dumps(json), _with_json_type(headers)
            raw = await session.request(
                method,
                url,
                data=data,
                params=params,
                headers=headers,
                timeout=up._client_timeout(up.timeout if timeout is None else timeout),
                allow_redirects=False,
                proxy=up._proxy_for(origin),
            )
            if raw.status >= 300:
                raise await up._refuse(raw)
        except BaseException as exc:
            slots.release()
            if isinstance(exc, _FAILURES):
                raise transport_error(up.label, exc) from exc
            raise
        self.slots = slots
        self.resp = resp = UpstreamResponse(raw, up)
        return resp

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        resp, self.resp = self.resp, None
        try:
            if resp is not None:
                try:
                    if resp.ended and (exc is None or isinstance(exc, GeneratorExit)):
                        await _drain(resp.raw.content, resp.read_any)
                finally:
                    settle(resp.raw)
        finally:
            if self.slots is not None:
                self.slots.release()
                self.slots = None
        if isinstance(exc, _FAILURES):
            raise transport_error(self.up.label, exc) from exc


async def _drain(content: aiohttp.StreamReader, read: Reader) -> None:
    """Read what is left of a body whose protocol already ended (typically the chunked
    terminator, a read later): at most DRAIN_BYTES within DRAIN_TIMEOUT."""
    if content.is_eof() or content.exception() is not None:
        return
    left = DRAIN_BYTES
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT):
            while left > 0 and (data := await read()):
                left -= len(data)
    except (*_FAILURES, UpstreamError):
        pass  # not reusable: `settle` closes it
