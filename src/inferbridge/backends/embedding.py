"""What every adapter's embeddings share: the parameter policy, batching, vector checks.

An adapter that makes embeddings implements one method, `Backend.embed(request)`: embed
`request.input` (at most `embedding_batch_size` inputs, each a text or a list of token ids)
and return an `Embeddings` event with the vectors in input order and the prompt tokens the
backend counted (None when it does not count). It never builds OpenAI JSON: the renderer
(`inferbridge.api.embeddings`) does, and encodes base64 itself.

`embedding_batches` is what the attempt loop runs for an embeddings request: the input is cut
into batches of the entry's `embedding_batch_size`, each batch is one upstream call, one
after the other, and the vectors are merged in input order with their token counts summed
(a batch the backend did not count is estimated, and the answer says so). The whole request
is one attempt on one deployment: a failure in any batch fails the attempt, which the router
retries or falls back like any other request.
"""

from __future__ import annotations

import base64
import binascii
import sys
from array import array
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from inferbridge.api.protocol import IGNORABLE_PARAMS
from inferbridge.errors import InvalidRequest, UpstreamError
from inferbridge.events import Embeddings, Event
from inferbridge.request import InferenceRequest
from inferbridge.usage import estimate_tokens

if TYPE_CHECKING:
    from inferbridge.backends.base import Backend

EMBEDDING_PARAMS = frozenset({"dimensions", "user"})
"""The OpenAI embeddings parameters an `InferenceRequest` may carry in `params`
(`encoding_format` is the renderer's business: adapters always get floats)."""


def prepare_embedding(backend: Backend, request: InferenceRequest) -> InferenceRequest:
    """`Backend.prepare` for an embeddings request (in place): the entry's `params:` defaults
    that are embeddings parameters (`dimensions`) or extras the adapter understands, then
    the unsupported-parameter policy over `embedding_params` / `embedding_extras`."""
    understood = EMBEDDING_PARAMS | backend.embedding_extras
    for key, value in backend.config.params.items():
        if key not in understood:
            continue  # chat defaults (temperature...) mean nothing here
        (request.params if key in EMBEDDING_PARAMS else request.extras).setdefault(key, value)
        request.body.setdefault(key, value)
    for key in list(request.params):
        if key in backend.embedding_params:
            continue
        if key in IGNORABLE_PARAMS:
            del request.params[key]  # accepted; `body` keeps it for pass-through
            continue
        backend._unsupported(request, key, "params")
    if not backend.forwards_extras:
        for key in list(request.extras):
            if key not in backend.embedding_extras:
                backend._unsupported(request, key, "extras")
    return request


def estimate_input_tokens(inputs: list[Any]) -> int:
    """Prompt tokens of inputs the backend did not count: token ids count as themselves,
    texts by the usual estimate (`inferbridge.usage`)."""
    return sum(len(x) if isinstance(x, list) else estimate_tokens(len(x)) for x in inputs)


async def embedding_batches(
    backend: Backend, request: InferenceRequest
) -> AsyncIterator[list[Event]]:
    """The embeddings of `request.input` as one batch holding one `Embeddings` event (see
    module doc)."""
    inputs = request.input or []
    size = backend.embedding_batch_size
    vectors: list[list[float]] = []
    tokens = 0
    estimated = False
    for start in range(0, len(inputs), size):
        part = inputs[start : start + size]
        sub = request.copy()
        sub.input = part
        sub.body["input"] = part
        answer = await backend.embed(sub)
        if len(answer.vectors) != len(part):
            raise UpstreamError(
                f"{backend.label} returned {len(answer.vectors)} embeddings for {len(part)} inputs",
                backend=backend.label,
            )
        vectors += answer.vectors
        if answer.prompt_tokens is None:
            tokens += estimate_input_tokens(part)
            estimated = True
        else:
            tokens += answer.prompt_tokens
            estimated |= answer.estimated
    yield [Embeddings(vectors, tokens, estimated=estimated)]


# -- helpers for adapters -------------------------------------------------------------------
def text_inputs(request: InferenceRequest, backend: str) -> list[str]:
    """`request.input` as texts, for backends that cannot take token ids (400 otherwise)."""
    inputs = request.input or []
    for i, item in enumerate(inputs):
        if not isinstance(item, str):
            raise InvalidRequest(
                f"Model '{request.model}' ({backend}) takes embeddings input as text, "
                "not as token ids.",
                param="input" if len(inputs) == 1 else f"input[{i}]",
            )
    return inputs  # type: ignore[return-value]


def float_vector(label: str, value: Any) -> list[float]:
    """One embedding from an upstream answer: a list of numbers, or OpenAI's base64 of
    little-endian float32 (some servers send it even when floats were asked for)."""
    if isinstance(value, str):
        return decode_base64(label, value)
    if type(value) is list:
        try:
            array("d", value)  # C-speed check that every item is a number
        except TypeError:
            pass
        else:
            return value
    raise UpstreamError(
        f"{label} sent an embedding that is not a list of numbers: {str(value)[:100]}",
        backend=label,
    )


def float_vectors(label: str, value: Any) -> list[list[float]]:
    if not isinstance(value, list):
        raise UpstreamError(
            f"{label} sent embeddings that are not a list: {str(value)[:100]}", backend=label
        )
    return [float_vector(label, v) for v in value]


def decode_base64(label: str, text: str) -> list[float]:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b"\0"  # fails below
    if len(raw) % 4:
        raise UpstreamError(f"{label} sent an embedding that is not base64 float32", backend=label)
    values = array("f")
    values.frombytes(raw)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def encode_base64(vector: list[float]) -> str:
    """OpenAI's `encoding_format: base64`: the vector as little-endian float32, base64."""
    values = array("f", vector)
    if sys.byteorder == "big":
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode("ascii")


def openai_embeddings(label: str, data: Any) -> Embeddings:
    """An OpenAI embeddings answer (`{"data": [{"index", "embedding"}], "usage"}`) as an
    event: vectors put in `index` order, prompt tokens from `usage` when given."""
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise UpstreamError(
            f"{label} sent an embeddings answer without a data list: {str(data)[:200]}",
            backend=label,
        )
    order = sorted(range(len(items)), key=lambda k: _index(items[k], k))
    vectors = [float_vector(label, items[k].get("embedding")) for k in order]
    usage = data.get("usage")
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return Embeddings(vectors, tokens if isinstance(tokens, int) else None)


def _index(item: dict[str, Any], default: int) -> int:
    index = item.get("index")
    return index if isinstance(index, int) else default
