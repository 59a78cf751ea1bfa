"""What the fake upstreams answer to embeddings requests: a vector that identifies its input.

`fake_vector(item)` is a deterministic vector of `FAKE_DIMENSIONS` floats derived from the
text (or token ids), different from the echo backend's, so a test can tell which input a
vector belongs to (and so check the order after batching) and that the upstream, not echo,
made it. `openai_answer` is an OpenAI `/v1/embeddings` answer (optionally in reverse `data`
order with the right `index`es, as a server may legally answer).
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Any

FAKE_DIMENSIONS = 8


def fake_vector(item: str | list[int], dimensions: int = FAKE_DIMENSIONS) -> list[float]:
    seed = (item if isinstance(item, str) else ",".join(map(str, item))).encode()
    digest = b""
    counter = 0
    while len(digest) < 2 * dimensions:
        digest += hashlib.sha256(b"fake:" + seed + bytes([counter])).digest()
        counter += 1
    # float32-exact values (k / 1024), so floats and base64 compare equal
    words = [int.from_bytes(digest[2 * i : 2 * i + 2], "little") for i in range(dimensions)]
    return [(w - 32768) / 1024 for w in words]


def count_tokens(item: str | list[int]) -> int:
    return len(item) if isinstance(item, list) else len(item.split())


def as_inputs(value: Any) -> list[Any]:
    """OpenAI's `input` as a list of inputs (a string or a list of token ids is one)."""
    if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int)):
        return [value]
    return list(value)


def b64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def openai_answer(
    inputs: list[Any],
    model: str,
    *,
    dimensions: int | None = None,
    reverse: bool = False,
    encoding: str = "float",
    usage: bool = True,
) -> dict[str, Any]:
    data = []
    for i, item in enumerate(inputs):
        vector = fake_vector(item, dimensions or FAKE_DIMENSIONS)
        embedding: Any = b64(vector) if encoding == "base64" else vector
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    if reverse:
        data.reverse()
    out: dict[str, Any] = {"object": "list", "data": data, "model": model}
    if usage:
        tokens = sum(count_tokens(i) for i in inputs)
        out["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return out
