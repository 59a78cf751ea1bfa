"""The normalized request the OpenAI layer hands to the router and to backend adapters.

It is built once per request from the validated OpenAI body. Adapters read sampling
parameters from `params` (only what the client or the model entry actually set, never an
invented default), unknown fields from `extras`, and the conversation from `messages` (chat)
or `prompt` (legacy completions), the texts to embed from `input` (embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["chat", "completion", "embedding"]


@dataclass(slots=True)
class InferenceRequest:
    kind: Kind
    model: str
    """The public model name the client asked for (what responses carry)."""
    params: dict[str, Any]
    """OpenAI parameters the client (or the entry's `params:` defaults) set, non-null only.

    Normalized: `max_tokens` holds max_completion_tokens or max_tokens (the former wins), and
    `stop` is always a list. `stream`, `stream_options` and `model` are not in here.
    """
    extras: dict[str, Any] = field(default_factory=dict)
    """Fields that are not part of the OpenAI schema (top_k, min_p, langchain_mode...)."""
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[int] | None = None
    """One prompt: the OpenAI layer fans a list of prompts out into one request each."""
    stream: bool = False
    include_usage: bool = False
    body: dict[str, Any] = field(default_factory=dict)
    """The client's original JSON body, for pass-through adapters."""
    request_id: str = ""
    ignored: list[str] = field(default_factory=list)
    """Parameters the adapter dropped instead of refusing (`drop_unsupported_params`)."""
    input: list[str] | list[list[int]] | None = None
    """Embeddings: the inputs, in order, each a text or a list of token ids."""
    responses_body: dict[str, Any] | None = None
    """A `/v1/responses` request: its Responses API body, for adapters that pass it through
    to an upstream's own `/responses` (`responses_api: native`); the chat form above is what
    every other adapter serves. Never changed: an adapter copies what it sends."""
    key: str = ""
    """The name of the API key the request came with ('' without keys): for logs."""

    def copy(self) -> InferenceRequest:
        """A copy whose `params`, `extras` and `body` may be changed without touching this
        request (what an adapter's `prepare` gets, so a retry starts from the original)."""
        return InferenceRequest(
            self.kind,
            self.model,
            dict(self.params),
            dict(self.extras),
            self.messages,
            self.prompt,
            self.stream,
            self.include_usage,
            dict(self.body),
            self.request_id,
            [],
            self.input,
            self.responses_body,
            self.key,
        )

    @property
    def max_tokens(self) -> int | None:
        return self.params.get("max_tokens")

    @property
    def stop(self) -> list[str]:
        return self.params.get("stop") or []

    @property
    def n(self) -> int:
        return self.params.get("n") or 1


@dataclass(slots=True)
class RouteInfo:
    """Which deployment served a request; filled in by the router as it goes, read by the
    OpenAI layer for response headers, metrics and access logs."""

    model: str = ""
    """The model that answered (differs from the requested one after a fallback)."""
    deployment: str = ""
    backend: str = ""
    attempts: int = 0
    fallback: bool = False
    """True when a fallback model answered (an alias resolving to a model is not one)."""
    ignored: list[str] = field(default_factory=list)
    """Parameters the answering deployment ignored (`InferenceRequest.ignored`)."""


def message_text(content: Any) -> str:
    """The text of a message's `content`: a string, or the text parts of a content list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(
        part.get("text") or ""
        for part in content
        if isinstance(part, dict) and part.get("type") in ("text", "input_text")
    )


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message.get("content"))
    return ""
