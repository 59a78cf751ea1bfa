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
    `retry` are ignored; lines may end in `\\n` or `\\r\\n`; the last `id` persists.

    The input is cut into events at blank lines first; an event that is a single
    `data: ` line (what every OpenAI-compatible server sends) is taken whole, without
    splitting it into lines and fields: about half the cost per event.
    """

    __slots__ = ("_buf", "_id")

    def __init__(self) -> None:
        self._buf = b""
        self._id: str | None = None

    @property
    def buffered(self) -> bool:
        """Whether part of an event is held from earlier input."""
        return bool(self._buf)

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:  # a "\r" at the very end may begin a "\r\n" the next read completes
            buf = buf.replace(b"\r\n", b"\n")
        blocks = buf.split(b"\n\n")
        self._buf = blocks.pop()
        out: list[ServerSentEvent] = []
        event_id = self._id
        for block in blocks:
            if block[:6] == b"data: " and b"\n" not in block:
                out.append(ServerSentEvent(block[6:], None, event_id))
            elif block:
                self._parse(block, out)
                event_id = self._id
        return out

    def _parse(self, block: bytes, out: list[ServerSentEvent]) -> None:
        """One event's lines, field by field."""
        data: list[bytes] = []
        event: str | None = None
        for line in block.split(b"\n"):
            if not line or line[0] == 58:  # blank (a third newline) or ":" comment
                continue
            name, colon, value = line.partition(b":")
            if colon and value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                data.append(value)
            elif name == b"event":
                event = value.decode("utf-8", "replace")
            elif name == b"id":
                self._id = value.decode("utf-8", "replace")
        if data:
            out.append(ServerSentEvent(b"\n".join(data), event, self._id))

    def flush(self) -> list[ServerSentEvent]:
        """The last event when the stream ended without its blank line."""
        block, self._buf = self._buf.rstrip(b"\r\n"), b""
        out: list[ServerSentEvent] = []
        if block:
            self._parse(block.replace(b"\r\n", b"\n"), out)
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
