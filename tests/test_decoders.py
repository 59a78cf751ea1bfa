"""SSE and NDJSON decoders: events split and coalesced at every byte boundary."""

from inferbridge.decoders import NDJSONDecoder, SSEDecoder

STREAM = (
    b": keep-alive\r\n\r\n"
    b'event: output\r\nid: 1\r\ndata: {"a": "h\\u00e9"}\r\n\r\n'
    b"data: line one\ndata: line two\n\n"
    b"retry: 10\ndata:no-space\n\n"
    b"data: [DONE]\n\n"
)


def decode_in_pieces(size: int) -> list[tuple]:
    dec = SSEDecoder()
    out = []
    for i in range(0, len(STREAM), size):
        out += dec.feed(STREAM[i : i + size])
    out += dec.flush()
    return [(e.event, e.id, e.data) for e in out]


def test_sse_every_split_gives_the_same_events():
    expected = [
        ("output", "1", b'{"a": "h\\u00e9"}'),
        # the last event id persists until another `id:` line (WHATWG)
        (None, "1", b"line one\nline two"),
        (None, "1", b"no-space"),
        (None, "1", b"[DONE]"),
    ]
    for size in range(1, len(STREAM) + 1):
        assert decode_in_pieces(size) == expected, size


LF_STREAM = (
    b'data: {"n": 1}\n\n'
    b": ping\n\n"
    b'data: {"n": 2}\n\n\n'
    b"data: two\ndata: lines\n\n"
    b'event: note\ndata: {"n": 3}\n\n'
    b"data:tight\n\n"
    b"data: [DONE]\n\n"
    b"data: unterminated"
)


def test_sse_lf_only_stream_every_split_gives_the_same_events():
    """`\\n`-only streams take the decoder's fast path; mixed events must still decode."""
    expected = [
        (None, b'{"n": 1}'),
        (None, b'{"n": 2}'),
        (None, b"two\nlines"),
        ("note", b'{"n": 3}'),
        (None, b"tight"),
        (None, b"[DONE]"),
        (None, b"unterminated"),
    ]
    for size in range(1, len(LF_STREAM) + 1):
        dec = SSEDecoder()
        out = []
        for i in range(0, len(LF_STREAM), size):
            out += dec.feed(LF_STREAM[i : i + size])
        out += dec.flush()
        assert [(e.event, e.data) for e in out] == expected, size


def test_sse_flush_returns_an_unterminated_last_event():
    dec = SSEDecoder()
    assert [e.data for e in dec.feed(b"data: {}\n\ndata: last")] == [b"{}"]
    events = dec.flush()
    assert [e.data for e in events] == [b"last"]


def test_ndjson_splits_and_skips_blank_lines():
    blob = b'{"a":1}\n\n{"b":2}\r\n{"c":3}'
    for size in range(1, len(blob) + 1):
        dec = NDJSONDecoder()
        lines = []
        for i in range(0, len(blob), size):
            lines += dec.feed(blob[i : i + size])
        lines += dec.flush()
        assert [line.strip() for line in lines] == [b'{"a":1}', b'{"b":2}', b'{"c":3}']
