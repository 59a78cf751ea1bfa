"""Incremental decoders for upstream streams: Server-Sent Events and NDJSON.

Bytes arrive from the network in arbitrary pieces: one event split over several reads, or
several events in one read. Each decoder is fed raw chunks and returns the complete items
found so far, keeping any partial line for the next call. `flush()` returns what is left
when the stream ends (a last event without its blank line, a last line without `\\n`).
"""

from __future__ import annotations


class ServerSentEvent:
    __slots__ = ("data", "event", "id")

    def __init__(self, data: bytes, event: str | None = None, id: str | None = None) -> None:
        self.data = data
        self.event = event
        self.id = id

    def __repr__(self) -> str:
        return f"ServerSentEvent(data={self.data!r}, event={self.event!r}, id={self.id!r})"


class SSEDecoder:
    """The SSE wire format (WHATWG): `field: value` lines, events end at a blank line.

    `data` lines of one event are joined with `\\n`; comment lines (`:` keep-alives) and
    `retry` are ignored; lines may end in `\\n` or `\\r\\n`.
    """

    __slots__ = ("_buf", "_data", "_event", "_id")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []
        self._event: str | None = None
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        buf = self._buf + chunk if self._buf else chunk
        lines = buf.split(b"\n")
        self._buf = lines.pop()
        out: list[ServerSentEvent] = []
        for line in lines:
            if line[-1:] == b"\r":
                line = line[:-1]
            if not line:
                self._dispatch(out)
                continue
            if line[0] == 58:  # ":" comment / keep-alive
                continue
            name, colon, value = line.partition(b":")
            if colon and value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self._data.append(value)
            elif name == b"event":
                self._event = value.decode("utf-8", "replace")
            elif name == b"id":
                self._id = value.decode("utf-8", "replace")
        return out

    def _dispatch(self, out: list[ServerSentEvent]) -> None:
        if self._data:
            data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
            out.append(ServerSentEvent(data, self._event, self._id))
            self._data = []
        self._event = None

    def flush(self) -> list[ServerSentEvent]:
        out = self.feed(b"\n") if self._buf else []
        self._dispatch(out)
        return out


class NDJSONDecoder:
    """Newline-delimited JSON: returns each complete non-blank line (bytes, not parsed)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf + chunk if self._buf else chunk
        lines = buf.split(b"\n")
        self._buf = lines.pop()
        return [line for line in lines if line.strip()]

    def flush(self) -> list[bytes]:
        rest, self._buf = self._buf, b""
        return [rest] if rest.strip() else []
