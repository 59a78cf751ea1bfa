"""`POST /v1/embeddings`: OpenAI's embeddings API through the same models, keys, routing,
limits, metrics and logs as chat.

The route validates the body against `EmbeddingRequest` (so `/openapi.json` documents it and
a bad field is a 400 naming it), `build_embedding_request` makes an `InferenceRequest` of
kind "embedding" whose `input` is the list of inputs (a string becomes a list of one, a
list of token ids one input), and `CompletionService.answer` routes it like a chat request:
retries, fallbacks, cooldowns, concurrency limits and metrics are the same code. The
adapter returns vectors and token counts (`inferbridge.backends.embedding`);
`EmbeddingsRenderer` builds OpenAI's answer from them, in input order, and encodes
`base64` itself (little-endian float32, as OpenAI does) so every backend supports it.
Embeddings are never streamed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, NotRequired

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from pydantic import ConfigDict, Field, with_config
from typing_extensions import TypedDict

from inferbridge.api.protocol import check_values, one_error
from inferbridge.api.serving import ERRORS as SERVING_ERRORS
from inferbridge.api.serving import CompletionService, error_response
from inferbridge.backends.embedding import encode_base64
from inferbridge.errors import InferbridgeError, InvalidRequest, UpstreamError
from inferbridge.events import Embeddings, Event
from inferbridge.request import InferenceRequest

TokenIds = list[Annotated[int, Field(ge=0, lt=2**31)]]
MAX_INPUTS = 2048
"""Inputs one request may embed (OpenAI's limit too)."""
INPUT_SHAPES = (
    "must be a string, an array of strings, an array of token ids (integers from 0) or an "
    "array of arrays of token ids"
)


@with_config(ConfigDict(extra="allow", strict=True))
class EmbeddingRequest(TypedDict):
    """`POST /v1/embeddings`. Unknown fields are kept as backend extras (forwarded by
    OpenAI-compatible backends, understood by some others, refused by the rest)."""

    model: Annotated[str, Field(min_length=1)]
    input: Annotated[str | list[str] | TokenIds | list[TokenIds], one_error(INPUT_SHAPES)]
    """A text, a list of texts, a list of token ids, or a list of such lists."""
    encoding_format: NotRequired[Literal["float", "base64"] | None]
    dimensions: NotRequired[Annotated[int, Field(ge=1)] | None]
    user: NotRequired[str | None]


_FIELDS = frozenset(EmbeddingRequest.__required_keys__ | EmbeddingRequest.__optional_keys__)
_PARAMS = ("dimensions", "user")


def build_embedding_request(body: dict[str, Any]) -> InferenceRequest:
    """An `InferenceRequest` of kind "embedding" from a body validated against
    `EmbeddingRequest`: inputs as a list (each a text or a list of token ids), `dimensions`
    and `user` in `params`, unknown fields in `extras`."""
    raw = body["input"]
    single = isinstance(raw, str) or (bool(raw) and isinstance(raw[0], int))
    if not raw and not single:
        raise InvalidRequest("'input' must not be an empty list.", param="input")
    inputs: list[Any] = [raw] if single else list(raw)  # token ids: one input
    if len(inputs) > MAX_INPUTS:
        raise InvalidRequest(
            f"'input' holds {len(inputs)} items; at most {MAX_INPUTS} are accepted in one request.",
            param="input",
        )
    for i, item in enumerate(inputs):
        if not item:
            where = "input" if single else f"input[{i}]"
            raise InvalidRequest(f"'{where}' must not be empty.", param=where)
    params = {k: body[k] for k in _PARAMS if body.get(k) is not None}
    extras = {k: v for k, v in body.items() if k not in _FIELDS and v is not None}
    if extras:
        check_values(extras)
    return InferenceRequest(
        kind="embedding",
        model=body["model"],
        params=params,
        extras=extras,
        body=body,
        input=inputs,
    )


class EmbeddingsRenderer:
    """OpenAI's embeddings answer from the one `Embeddings` event (a whole answer only:
    an embeddings request is never streamed, so the stream methods are never called)."""

    media_type = "application/json"
    param_names: Mapping[str, str] = {}

    def __init__(self, request: InferenceRequest, choices: int, keep_text: bool) -> None:
        self.request = request
        self.answer: Embeddings | None = None
        self._usage: dict[str, Any] | None = None

    def add(self, batch: Sequence[Event]) -> None:
        for event in batch:
            if type(event) is Embeddings:
                self.answer = event

    def result(self) -> tuple[dict[str, Any], dict[str, str]]:
        answer = self.answer
        if answer is None:
            raise UpstreamError("The backend returned no embeddings.")
        tokens = answer.prompt_tokens or 0
        base64 = self.request.body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": encode_base64(vector) if base64 else vector,
            }
            for i, vector in enumerate(answer.vectors)
        ]
        self._usage = {"prompt_tokens": tokens, "completion_tokens": 0}
        body = {
            "object": "list",
            "data": data,
            "model": self.request.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return body, {"x-inferbridge-usage-estimated": "true"} if answer.estimated else {}

    def opening(self) -> bytes:
        return b""

    def encode(self, batch: Sequence[Event]) -> bytes:
        return b""

    def closing(self) -> bytes:
        return b""

    def failure(self, err: InferbridgeError) -> bytes:
        return err.body()

    def usage(self) -> dict[str, Any] | None:
        return self._usage

    def completion(self) -> Any:
        """For access logs (`log_prompts`): how many vectors of what size, not the vectors."""
        answer = self.answer
        if answer is None:
            return None
        dims = len(answer.vectors[0]) if answer.vectors else 0
        return {"embeddings": len(answer.vectors), "dimensions": dims}

    @staticmethod
    def error_response(err: InferbridgeError, request_id: str) -> Response:
        return error_response(err, request_id)


ERRORS: dict[int | str, dict[str, Any]] = {
    **SERVING_ERRORS,
    400: {"description": "Invalid request, or a model that does not serve embeddings"},
}

router = APIRouter(tags=["openai"])


@router.post("/embeddings", summary="Create embeddings", responses=ERRORS)
async def create_embeddings(body: EmbeddingRequest, request: Request) -> Response:
    """OpenAI-compatible: one vector per input, in input order, as floats or (with
    `encoding_format: base64`) little-endian float32 in base64."""
    service: CompletionService = request.app.state.completions
    data = dict(body)
    return await service.answer(request, lambda: build_embedding_request(data), EmbeddingsRenderer)


def include_embeddings(app: FastAPI) -> None:
    """Serve `/v1/embeddings` (and `/embeddings` for clients configured without `/v1`)."""
    app.include_router(router, prefix="/v1")
    app.include_router(router, include_in_schema=False)
