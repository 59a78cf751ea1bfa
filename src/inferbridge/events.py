"""The normalized events every backend adapter yields, and the OpenAI layer consumes.

Adapters translate their backend's stream into these small objects; they never build OpenAI
JSON. The OpenAI layer turns the same events into either SSE chunks or one assembled
response, so streamed and non-streamed answers can never disagree.

Adapters yield *batches* (a list of events decoded from one upstream read) so the OpenAI
layer can write everything that arrived together in one socket write.

`index` is the choice index (for n > 1 or several prompts); most backends only use 0.
Finish reasons use the normalized vocabulary: "stop", "length", "tool_calls",
"content_filter".
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any


class TextDelta:
    """A piece of generated text for choice `index` (with its logprobs, if the backend gave any)."""

    __slots__ = ("index", "logprobs", "text")

    def __init__(self, text: str, index: int = 0, logprobs: Any = None) -> None:
        self.text = text
        self.index = index
        self.logprobs = logprobs

    def __repr__(self) -> str:
        return f"TextDelta({self.text!r}, index={self.index})"


class ReasoningDelta:
    """Reasoning/"thinking" text a backend reports apart from the answer."""

    __slots__ = ("index", "text")

    def __init__(self, text: str, index: int = 0) -> None:
        self.text = text
        self.index = index

    def __repr__(self) -> str:
        return f"ReasoningDelta({self.text!r}, index={self.index})"


class ToolCallDelta:
    """A tool call, or a fragment of one: `arguments` fragments concatenate per `call_index`.

    The first fragment of a call carries its `id` and `name`; later ones may carry only
    `arguments`. A backend that produces whole calls sends one delta per call.
    """

    __slots__ = ("arguments", "call_index", "id", "index", "name")

    def __init__(
        self,
        call_index: int,
        *,
        id: str | None = None,
        name: str | None = None,
        arguments: str = "",
        index: int = 0,
    ) -> None:
        self.call_index = call_index
        self.id = id
        self.name = name
        self.arguments = arguments
        self.index = index

    def __repr__(self) -> str:
        return (
            f"ToolCallDelta({self.call_index}, id={self.id!r}, name={self.name!r}, "
            f"arguments={self.arguments!r}, index={self.index})"
        )


class Finish:
    """Choice `index` is complete, for `reason` (normalized vocabulary, see module doc).

    `stop_sequence`: the stop string that ended the choice, when the backend says which
    (`""` when it says a stop string did but not which; None when it says nothing).
    """

    __slots__ = ("index", "reason", "stop_sequence")

    def __init__(self, reason: str, index: int = 0, stop_sequence: str | None = None) -> None:
        self.reason = reason
        self.index = index
        self.stop_sequence = stop_sequence

    def __repr__(self) -> str:
        return f"Finish({self.reason!r}, index={self.index})"


class Usage:
    """Token counts for the whole request, as the backend reported them."""

    __slots__ = ("completion_tokens", "details", "estimated", "prompt_tokens")

    def __init__(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        details: dict[str, Any] | None = None,
        *,
        estimated: bool = False,
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.details = details
        self.estimated = estimated
        """True when part of the counts is an estimate (e.g. a backend that reports only
        the completion side)."""

    def __repr__(self) -> str:
        return f"Usage({self.prompt_tokens}, {self.completion_tokens})"


class SystemFingerprint:
    """The upstream's `system_fingerprint` (the backend configuration that answered)."""

    __slots__ = ("index", "value")

    def __init__(self, value: str, index: int = 0) -> None:
        self.value = value
        self.index = index

    def __repr__(self) -> str:
        return f"SystemFingerprint({self.value!r})"


class Embeddings:
    """The answer to an embeddings request: one vector per input, in input order, and the
    prompt tokens they took (None: the backend did not say). Yielded once, as the only
    event of the only batch; nothing fans it out (an embeddings request has one choice)."""

    __slots__ = ("estimated", "index", "prompt_tokens", "vectors")

    def __init__(
        self, vectors: list[list[float]], prompt_tokens: int | None, *, estimated: bool = False
    ) -> None:
        self.vectors = vectors
        self.prompt_tokens = prompt_tokens
        self.estimated = estimated
        """True when `prompt_tokens` is (partly) an estimate."""
        self.index = 0

    def __repr__(self) -> str:
        return f"Embeddings({len(self.vectors)} vectors, prompt_tokens={self.prompt_tokens})"


Event = TextDelta | ReasoningDelta | ToolCallDelta | Finish | Usage | SystemFingerprint | Embeddings


_FINISH_ALIASES = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "content_filter": "content_filter",
    "function_call": "tool_calls",
    "stop_sequence": "stop",
    "eos_token": "stop",
    "eos": "stop",
    "max_tokens": "length",
    "model_length": "length",
}


def normalize_finish(reason: str | None) -> str:
    """A backend's finish reason in the normalized vocabulary (unknown or none: "stop")."""
    if not reason:
        return "stop"
    return _FINISH_ALIASES.get(reason, "stop")


async def aclose(stream: AsyncIterator[Sequence[Event]] | None) -> None:
    """Close a stream of event batches (which closes its upstream request). A stream that
    already failed may fail again while closing: its first error is the one reported."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:
            logging.getLogger("inferbridge").debug("error closing a stream", exc_info=True)
