"""JSON access-log lines: written off the event loop (`AccessLogWriter`), one for every
request whatever its outcome (`AnswerWatch` catches those no route recorded)."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import orjson

from inferbridge.keys import IDENTITY

if TYPE_CHECKING:
    from inferbridge.observability import Observability


_now = time.perf_counter

LOGGED = "access_logged"
"""Key set in the ASGI scope's `state` when a generation route took the request's access-log
line (and metrics) on itself (`api.serving`); other requests are logged by `AnswerWatch`."""


def key_name(identity: Any) -> str | None:
    """The name of the key a request came with (never the secret), None without keys."""
    return getattr(identity, "name", None) or None


def envelope_code(body: bytes | None) -> str | None:
    """The `code` of an OpenAI error envelope (None for another body)."""
    if not body:
        return None
    try:
        error = orjson.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


class AnswerWatch:
    """The gate's view of a request that passed it: its status (and an error's body) seen
    through its ASGI `send`. When the route did not log the request itself (`LOGGED`: the
    generation routes do), `serve` logs it once the app is done: `/v1/models`, a body the
    schema refused (400), an unknown path (404), token counts... Costs one call per
    message sent."""

    __slots__ = ("body", "observability", "request_id", "send", "started", "status")

    def __init__(self, observability: Observability, send: Any, request_id: str) -> None:
        self.observability = observability
        self.send = send
        self.request_id = request_id
        self.started = _now()
        self.status = 0
        self.body: bytes | None = None

    def __call__(self, message: dict[str, Any]) -> Any:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif self.body is None and self.status >= 400:
            self.body = message.get("body", b"")
        return self.send(message)

    async def serve(self, app: Any, scope: dict[str, Any], receive: Any) -> None:
        try:
            await app(scope, receive, self)
        except BaseException as exc:
            gone = isinstance(exc, asyncio.CancelledError)
            self._log(scope, self.status or (499 if gone else 500))
            raise
        self._log(scope, self.status or 500)

    def _log(self, scope: dict[str, Any], status: int) -> None:
        if scope["state"].get(LOGGED):
            return
        self.observability.answered(
            status,
            code=envelope_code(self.body) if status >= 400 else None,
            path=scope["path"],
            method=scope["method"],
            request_id=self.request_id,
            started=self.started,
            key=key_name(scope["state"].get(IDENTITY)),
        )


class AccessLogWriter:
    """Writes JSON lines to a binary stream from a background thread, in batches.

    The serving loop only encodes the lines and appends them to a queue; the thread wakes
    every `interval` seconds and writes whatever accumulated in one call. Cheaper than `logging`
    (no record objects, no formatting on the loop, no thread wake-up per line), and a slow
    sink never blocks serving. Lines appear at most `interval` seconds late.
    """

    def __init__(self, stream: Any = None, interval: float = 0.05) -> None:
        self._stream = stream
        self._interval = interval
        self._queue: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
            self._thread.start()

    def write(self, lines: bytes) -> None:
        """Queue one line, or several joined by newlines (without the last newline)."""
        self._queue.put(lines)

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(5)
            self._thread = None

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(self._interval)
            self._flush()
            if stopping:
                return

    def _flush(self) -> None:
        lines: list[bytes] = []
        with contextlib.suppress(queue.Empty):
            while True:
                lines.append(self._queue.get_nowait())
        if not lines:
            return
        stream = self._stream or sys.stderr.buffer
        try:
            stream.write(b"\n".join(lines) + b"\n")
            stream.flush()
        except (OSError, ValueError):  # closed sink: drop, never crash serving
            pass
