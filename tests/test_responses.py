"""The OpenAI layer's encoders: the text fast path writes the same bytes as the general one."""

from __future__ import annotations

import orjson
import pytest

from inferbridge.api.responses import StreamEncoder
from inferbridge.events import TextDelta
from inferbridge.request import InferenceRequest

TEXTS = ["Hello", "", 'quote " and \\ backslash', "é ü 漢字 🙂", "line\nbreak\ttab", "\u2028"]


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_text_chunks_match_the_general_encoding(kind: str, include_usage: bool) -> None:
    request = InferenceRequest(kind, "m", {}, stream=True, include_usage=include_usage)  # type: ignore[arg-type]
    encoder = StreamEncoder(request, 1)
    for text in TEXTS:
        fast = encoder.encode([TextDelta(text)])
        general = encoder._chunk([encoder._choice(0, {"content": text})])
        assert fast == general
        chunk = orjson.loads(fast.removeprefix(b"data: "))
        choice = chunk["choices"][0]
        assert (choice["delta"]["content"] if kind == "chat" else choice["text"]) == text
        assert ("usage" in chunk) is include_usage


def test_other_choices_and_logprobs_take_the_general_path() -> None:
    request = InferenceRequest("chat", "m", {}, stream=True)
    encoder = StreamEncoder(request, 2)
    logprobs = {"content": [{"token": "a", "logprob": -0.1}]}
    data = encoder.encode([TextDelta("a", 1), TextDelta("b", 0, logprobs)])
    first, second = (orjson.loads(c.removeprefix(b"data: ")) for c in data.split(b"\n\n")[:2])
    assert first["choices"][0]["index"] == 1 and first["choices"][0]["delta"]["content"] == "a"
    assert second["choices"][0]["logprobs"] == logprobs
    assert encoder.tracker.chars == 2
