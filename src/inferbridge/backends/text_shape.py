"""Recognizing an upstream's plain text chunks by their bytes, without parsing them.

Most tokens of a stream arrive as SSE events that differ only in their text: vLLM's
`data: {"id":"chatcmpl-1",...,"delta":{"content":"Hel"},"logprobs":null,...}` repeats
every byte but `"Hel"`. An adapter parses a chunk the usual way and, when it carried
nothing but text, learns its `TextShape`: the bytes before the text's JSON string and the
bytes after it. A later event that is exactly `prefix + string + suffix` must then parse
to the same structure with a new text, so its `TextDelta` is taken from the bytes:
`json.loads` of such an event would give the same result, this is cheaper.

Only strings that are their own plain UTF-8 are taken this way: no backslash escapes, no
control or other non-printable characters, valid UTF-8 (the same bytes `orjson.dumps`
would write for the text, so the OpenAI layer can reuse them, see `TextDelta.json`).
Anything else, and any event that differs outside its string, takes the adapter's
normal path.
"""

from __future__ import annotations

from inferbridge.events import Event, TextDelta


def plain_text(raw: bytes) -> str | None:
    """The text of a JSON string token (`raw` with its quotes) that needs no unescaping,
    or None when it is not one."""
    try:
        text = raw[1:-1].decode()
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() and "\\" not in text else None


class TextShape:
    """The fixed bytes around the text of one stream's plain text chunks (see module doc)."""

    __slots__ = ("prefix", "suffix")

    def __init__(self, prefix: bytes, suffix: bytes) -> None:
        self.prefix = prefix
        """`data: ` and the event's JSON up to the text, its opening quote included."""
        self.suffix = suffix
        """The JSON from the text's closing quote on, and the blank line ending the event."""

    @classmethod
    def learn(cls, data: bytes, key: bytes, text: str) -> TextShape | None:
        """The shape of SSE event `data` (one line) that the adapter parsed as nothing but
        `text`, the value of the first `key` (e.g. `b'"content":'`); None if that value is
        not `text` written as a plain string."""
        at = data.find(key)
        if at < 0:
            return None
        start = at + len(key) + 1  # the text, after its opening quote
        end = data.find(b'"', start)
        if end < 0 or data[start - 1 : start] != b'"' or b"\n" in data:
            return None
        if plain_text(data[start - 1 : end + 1]) != text:
            return None
        return cls(b"data: " + data[:start], data[end:] + b"\n\n")

    def scan(self, buf: bytes, pos: int, batch: list[Event]) -> int:
        """Append the `TextDelta` of each whole event of this shape in `buf` from `pos` on,
        up to the first event of another shape; returns where they end (`pos` if the first
        one is not of this shape)."""
        prefix, suffix = self.prefix, self.suffix
        skip, after = len(prefix), len(suffix)
        startswith, find, append = buf.startswith, buf.find, batch.append
        try:
            while startswith(prefix, pos):
                start = pos + skip
                end = find(b'"', start)
                if end < 0 or not startswith(suffix, end):
                    break
                text = buf[start:end].decode()  # `plain_text`, inlined: once per chunk
                if not text.isprintable() or "\\" in text:
                    break
                if text:  # an empty string is no event, as when parsed
                    append(TextDelta(text, 0, None, buf[start - 1 : end + 1]))
                pos = end + after
        except UnicodeDecodeError:
            pass
        return pos
