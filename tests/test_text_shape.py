"""Text chunks read by their bytes (`TextShape`) give exactly what parsing them gives.

Each stream is parsed twice, by a `ChunkParser` that learns the shape of its text chunks
and by one that never does, with the body cut at random places; the events, the encoded
OpenAI chunks and the protocol errors must be the same.
"""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from inferbridge.api.responses import StreamEncoder
from inferbridge.backends.openai_compat import ChunkParser, OpenAICompatBackend
from inferbridge.backends.openai_compat import OpenAICompatSettings as Settings
from inferbridge.backends.text_shape import TextShape, plain_text
from inferbridge.events import Event, TextDelta
from inferbridge.request import InferenceRequest

BACKEND = OpenAICompatBackend(Settings(name="m", backend="vllm", url="http://127.0.0.1:9/v1"))

# Texts as they appear on the wire (JSON string contents): plain ones, escaped ones, and
# bytes no valid JSON string holds (a raw control character, broken UTF-8).
PLAIN = [b"Hello", b" world", b"\xc3\xa9t\xc3\xa9", b"\xe6\xbc\xa2", b"\xf0\x9f\x99\x82", b"a b"]
ESCAPED = [b"line\\nbreak", b'say \\"hi\\"', b"back\\\\slash", b"\\u00e9", b"\\ud83d\\ude42"]
ODD = [b"", b"\xe2\x80\xa8", b"\xe2\x80\x8b"]  # empty, U+2028, zero-width space (not printable)
INVALID = [b"raw\x01control", b"broken\xffutf8", b"tab\there"]


def text_chunk(
    chat: bool,
    text: bytes,
    *,
    cid: bytes = b"id-1",
    index: int = 0,
    tail: bytes = b"",
    role: bool = False,
) -> bytes:
    """A chat.completion.chunk (vLLM's layout) or text_completion chunk carrying `text`."""
    if chat:
        head = b'"object":"chat.completion.chunk","created":1700000000,"model":"m",'
        start = b'"choices":[{"index":%d,"delta":{' % index
        start += b'"role":"assistant",' if role else b""
        choice = start + b'"content":"' + text + b'"},'
    else:
        head = b'"object":"text_completion","created":1700000000,"model":"m",'
        choice = b'"choices":[{"text":"' + text + b'","index":%d,' % index
    end = b'"logprobs":null,"finish_reason":null}]' + tail + b"}\n\n"
    return b'data: {"id":"' + cid + b'",' + head + choice + end


def chat_chunk(text: bytes, **kwargs: Any) -> bytes:
    return text_chunk(True, text, **kwargs)


def finish_chunk(chat: bool) -> bytes:
    part = b'"delta":{}' if chat else b'"text":""'
    return b'data: {"id":"x","choices":[{"index":0,' + part + b',"finish_reason":"stop"}]}\n\n'


ROLE = b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
USAGE = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":9}}\n\n'


def random_stream(rng: random.Random, chat: bool, invalid: bool) -> bytes:
    pool = PLAIN * 4 + ESCAPED + ODD + (INVALID if invalid else [])
    parts = []
    if chat:  # vLLM's first chunk has the role and no text; others' have both
        parts.append(ROLE if rng.random() < 0.5 else text_chunk(True, b"Hi", role=True))
    for _ in range(rng.randint(1, 40)):
        roll = rng.random()
        text = rng.choice(pool)
        if roll < 0.8:
            parts.append(text_chunk(chat, text))
        elif roll < 0.85:
            parts.append(text_chunk(chat, text, cid=b"other-id"))  # another prefix
        elif roll < 0.9:
            parts.append(text_chunk(chat, text, index=1))  # another choice
        elif roll < 0.95:
            parts.append(text_chunk(chat, text, tail=b',"usage":null'))  # another suffix
        else:
            parts.append(b": keep-alive\n\n")
    parts += [finish_chunk(chat), USAGE, b"data: [DONE]\n\n"]
    return b"".join(parts)


def cut(rng: random.Random, body: bytes) -> list[bytes]:
    """`body` in random pieces: single bytes, small, chunk-sized, whole, or (as servers
    write them) one or several whole events per piece."""
    if rng.random() < 0.5:
        events = [e + b"\n\n" for e in body.split(b"\n\n")[:-1]]
        pieces = []
        while events:
            take = rng.randint(1, 12)
            pieces.append(b"".join(events[:take]))
            del events[:take]
        return pieces
    pieces, pos = [], 0
    biggest = rng.choice([1, 7, 64, 600, len(body)])
    while pos < len(body):
        step = rng.randint(1, biggest)
        pieces.append(body[pos : pos + step])
        pos += step
    return pieces


def run(parser: ChunkParser, pieces: list[bytes]) -> tuple[list[Event], Any]:
    events: list[Event] = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish()
    return events, (parser.done, parser.error.message if parser.error else None)


def described(events: list[Event]) -> list[tuple[Any, ...]]:
    return [
        (type(e).__name__, *(getattr(e, s) for s in e.__slots__ if s != "json")) for e in events
    ]


def encoded(events: list[Event], chat: bool) -> bytes:
    kind = "chat" if chat else "completion"
    encoder = StreamEncoder(InferenceRequest(kind, "m", {}, stream=True), 2)  # type: ignore[arg-type]
    return encoder.encode(events).replace(encoder._head, b"HEAD")


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("invalid", [False, True])
def test_shape_reads_the_same_events_as_parsing(chat: bool, invalid: bool) -> None:
    rng = random.Random(f"{chat}{invalid}")
    spliced = 0
    for _ in range(150):
        body = random_stream(rng, chat, invalid)
        pieces = cut(rng, body)
        learner = ChunkParser(BACKEND, chat)
        reference = ChunkParser(BACKEND, chat)
        reference.learning = 0
        got, got_end = run(learner, pieces)
        want, want_end = run(reference, pieces)
        assert described(got) == described(want)
        assert got_end == want_end
        assert encoded(got, chat) == encoded(want, chat)
        for event in got:
            if isinstance(event, TextDelta) and event.json is not None:
                assert event.json == orjson.dumps(event.text)
                spliced += 1
    assert spliced > 100  # the shape was learned and used, not only the parsing path


def test_learning_needs_the_same_plain_string_under_the_key() -> None:
    data = chat_chunk(b"Hi")[6:-2]
    shape = TextShape.learn(data, b'"content":', "Hi")
    assert shape is not None
    assert shape.prefix.endswith(b'"content":"') and shape.suffix.startswith(b'"}')
    assert TextShape.learn(data, b'"content":', "Ho") is None
    assert TextShape.learn(data, b'"text":', "Hi") is None
    escaped = chat_chunk(b"a\\nb")[6:-2]
    assert TextShape.learn(escaped, b'"content":', "a\nb") is None
    not_a_string = data.replace(b'"content":"Hi"', b'"content":7,"x":"Hi"')
    assert TextShape.learn(not_a_string, b'"content":', "Hi") is None


def test_scan_stops_at_the_first_event_of_another_shape() -> None:
    shape = TextShape.learn(chat_chunk(b"Hi")[6:-2], b'"content":', "Hi")
    assert shape is not None
    first, second = chat_chunk(b"one"), chat_chunk(b"two")
    for stopper in (
        chat_chunk(b"x", cid=b"chatcmpl-2"),
        chat_chunk(b'\\"'),
        chat_chunk(b"\xff"),
        chat_chunk(b"\x01"),
        finish_chunk(True),
        b"data: [DONE]\n\n",
        first[:-1],  # cut before its blank line
    ):
        batch: list[Event] = []
        used = shape.scan(b"xy" + first + second + stopper + first, 2, batch)
        assert used == 2 + len(first + second)
        assert [e.text for e in batch] == ["one", "two"]  # type: ignore[union-attr]


def test_plain_text() -> None:
    assert plain_text(b'"caf\xc3\xa9"') == "café"
    assert plain_text(b'""') == ""
    for raw in (b'"a\\nb"', b'"\xff"', b'"\x1f"', b'"\x7f"'):
        assert plain_text(raw) is None


@pytest.mark.parametrize(("per_read", "spliced"), [(1, 38), (11, 28), (100, 38)])
def test_a_first_chunk_of_another_shape_is_outgrown(per_read: int, spliced: int) -> None:
    """vLLM-like: the first chunk also carries the role. A shape learned from it (in a long
    first read) does not fit the next ones, which teach the right one: every later text
    chunk is spliced. A short first read (1 or 11 chunks here) is only parsed."""
    events = [text_chunk(True, b"t0", role=True)]
    events += [text_chunk(True, b"t%d" % i) for i in range(1, 40)]
    events += [finish_chunk(True), b"data: [DONE]\n\n"]
    parser = ChunkParser(BACKEND, chat=True)
    got: list[Event] = []
    for i in range(0, len(events), per_read):
        got += parser.feed(b"".join(events[i : i + per_read]))
    texts = [e for e in got if isinstance(e, TextDelta)]
    assert [e.text for e in texts] == [f"t{i}" for i in range(40)]
    assert sum(e.json is not None for e in texts) == spliced
    assert parser.done


def test_a_short_first_read_is_parsed_without_learning() -> None:
    """The first read is on the way to the first token: parsed only. Learning starts with
    the next read, or in the first one when it is long (a burst of many chunks)."""
    chunks = [text_chunk(True, b"t%d" % i) for i in range(40)]
    parser = ChunkParser(BACKEND, chat=True)
    first = parser.feed(b"".join(chunks[:3]))
    assert [e.json for e in first] == [None, None, None]  # type: ignore[union-attr]
    assert parser.shape is None
    later = parser.feed(b"".join(chunks[3:6]))
    assert [e.json for e in later] == [None, b'"t4"', b'"t5"']  # type: ignore[union-attr]

    burst = ChunkParser(BACKEND, chat=True)
    got = burst.feed(b"".join(chunks))
    assert len(b"".join(chunks)) >= 2048
    assert sum(e.json is not None for e in got) == 39  # type: ignore[union-attr]
