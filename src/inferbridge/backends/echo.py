"""The built-in `echo` backend: deterministic replies with no upstream.

The reply is the last user message (chat) or the prompt (completions), one word per token.
It honours `max_tokens` (counted in words: finish_reason "length"), stop strings (finish
"stop", saying which one), and reports usage (words in the prompt side, words generated).
`delay:` in the entry adds that many seconds before each token, to watch streaming by eye
or in tests.

Embeddings (echo serves both by default): a deterministic unit vector per input, derived
from a hash of its text (or token ids), of 16 dimensions or the request's `dimensions` (a
shorter vector is a prefix of a longer one, renormalized, as OpenAI's `dimensions` behaves).
Usage counts words, or token ids.

It is the default model when no config is given, and the workhorse of the test suite.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import struct
from collections.abc import AsyncIterator
from typing import Any

from pydantic import Field

from inferbridge.backends.base import Backend
from inferbridge.config import DeploymentConfig
from inferbridge.errors import InvalidRequest
from inferbridge.events import Embeddings, Event, Finish, TextDelta, Usage
from inferbridge.request import InferenceRequest, last_user_text, message_text
from inferbridge.stops import StopCutter

TURN_EVERY = 512
"""Words of an answer without `delay` between two turns given to the event loop."""


class EchoSettings(DeploymentConfig):
    delay: float = Field(default=0.0, ge=0, description="Seconds before each token.")


def _words(text: str) -> list[str]:
    return text.split()


def matched_stop(text: str, stops: list[str]) -> str | None:
    """The stop string that ended `text`: of those it contains, the first one to complete."""
    found = [s for s in stops if s in text]
    return min(found, key=lambda s: text.find(s) + len(s)) if found else None


ECHO_DIMENSIONS = 16
MAX_ECHO_DIMENSIONS = 4096


def echo_vector(item: str | list[int], dimensions: int = ECHO_DIMENSIONS) -> list[float]:
    """A unit vector derived from `item` by SHA-256 in counter mode: the same input always
    gives the same vector, and a shorter one is a renormalized prefix of a longer one."""
    seed = item.encode() if isinstance(item, str) else b"ids:" + ",".join(map(str, item)).encode()
    raw = bytearray()
    counter = 0
    while len(raw) < 4 * dimensions:
        raw += hashlib.sha256(seed + counter.to_bytes(4, "little")).digest()
        counter += 1
    # 32-bit words -> [-1, 1), as float32 values (what a real model returns)
    values = [w / 2**31 - 1.0 for w in struct.unpack(f"<{dimensions}I", raw[: 4 * dimensions])]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [struct.unpack("<f", struct.pack("<f", v / norm))[0] for v in values]


class EchoBackend(Backend):
    """Accepts every parameter: the ones it does not act on are ignored and named in the
    `x-inferbridge-ignored-params` response header (it stands in for any backend)."""

    Settings = EchoSettings
    supported_params = frozenset(
        {
            "max_tokens",
            "stop",
            "temperature",
            "top_p",
            "seed",
            "presence_penalty",
            "frequency_penalty",
        }
    )

    default_mode = "both"
    embedding_params = frozenset({"dimensions"})

    def __init__(self, config: DeploymentConfig) -> None:
        super().__init__(config)
        self.drop_unsupported = True

    async def embed(self, request: InferenceRequest) -> Embeddings:
        dimensions = request.params.get("dimensions", ECHO_DIMENSIONS)
        if dimensions > MAX_ECHO_DIMENSIONS:
            raise InvalidRequest(
                f"'dimensions' must be at most {MAX_ECHO_DIMENSIONS} for model "
                f"'{request.model}' (echo).",
                param="dimensions",
            )
        inputs = request.input or []
        vectors = [echo_vector(item, dimensions) for item in inputs]
        tokens = sum(len(i) if isinstance(i, list) else len(_words(i)) for i in inputs)
        return Embeddings(vectors, tokens)

    async def stream(self, request: InferenceRequest) -> AsyncIterator[list[Event]]:
        assert isinstance(self.config, EchoSettings)
        if request.kind == "chat":
            messages: list[dict[str, Any]] = request.messages or []
            source = last_user_text(messages)
            prompt_tokens = sum(len(_words(message_text(m.get("content")))) for m in messages)
        else:
            source = request.prompt if isinstance(request.prompt, str) else ""
            prompt_tokens = len(_words(source))
        words = _words(source)
        limit = request.max_tokens
        cutter = StopCutter(request.stop)
        delay = self.config.delay
        produced = 0
        batch: list[Event] = []
        for i, word in enumerate(words):
            if limit is not None and produced >= limit:
                break
            token = word if i == 0 else " " + word
            text = cutter.feed(token)
            produced += 1
            if text:
                batch.append(TextDelta(text))
            if cutter.stopped:
                break
            if delay:
                await asyncio.sleep(delay)
                yield batch
                batch = []
            elif produced % TURN_EVERY == 0:  # a long answer lets other requests run too
                await asyncio.sleep(0)
                if batch:
                    yield batch
                    batch = []
        rest = cutter.flush()
        if rest:
            batch.append(TextDelta(rest))
        matched = None
        if cutter.stopped:
            reason = "stop"
            matched = matched_stop(" ".join(words[:produced]), cutter.stops)
        elif limit is not None and produced >= limit and produced < len(words):
            reason = "length"
        else:
            reason = "stop"
        batch.append(Finish(reason, stop_sequence=matched))
        batch.append(Usage(prompt_tokens, produced))
        yield batch
