"""Normalized events -> OpenAI responses: SSE chunks for streams, one object otherwise.

Both paths consume the same events through `ChoiceTracker`, which also fills what a backend
left out: a finish reason for a choice that never got one ("stop"), "tool_calls" as the
finish reason of a choice that produced tool calls, and usage estimated from the text when
the backend reported no counts (see `inferbridge.usage`).

Chunks are built as plain dicts and encoded with orjson against a pre-encoded prefix that
holds the id / object / created / model shared by every chunk of the stream.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import orjson

from inferbridge import ids
from inferbridge.events import (
    Event,
    Finish,
    ReasoningDelta,
    SystemFingerprint,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from inferbridge.request import InferenceRequest
from inferbridge.usage import estimate_prompt_tokens, estimate_tokens

DONE = b"data: [DONE]\n\n"
_ROLE_CHOICE = (  # the opening chunk's choices when there is one
    b'[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]'
)


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + ids.new_id()


class ChoiceTracker:
    """What has been produced per choice: enough to close every choice and count usage."""

    __slots__ = ("chars", "choices", "finished", "has_tools", "text", "usage")

    def __init__(self, choices: int, keep_text: bool = False) -> None:
        self.choices = choices
        self.text: list[str] | None = [] if keep_text else None
        self.finished: dict[int, str] = {}
        self.has_tools: set[int] = set()
        self.chars = 0
        self.usage: Usage | None = None

    def finish_reason(self, ev: Finish) -> str:
        reason = ev.reason
        if reason == "stop" and ev.index in self.has_tools:
            reason = "tool_calls"
        self.finished[ev.index] = reason
        return reason

    def missing_finishes(self) -> list[int]:
        return [i for i in range(self.choices) if i not in self.finished]

    def final_usage(self, request: InferenceRequest) -> tuple[dict[str, Any], bool]:
        """The usage object, and whether it is an estimate."""
        u = self.usage
        if u is not None:
            out: dict[str, Any] = {
                "prompt_tokens": u.prompt_tokens,
                "completion_tokens": u.completion_tokens,
                "total_tokens": u.prompt_tokens + u.completion_tokens,
            }
            if u.details:
                out.update(u.details)
            return out, u.estimated
        prompt = estimate_prompt_tokens(request)
        completion = estimate_tokens(self.chars)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }, True


class StreamEncoder:
    """Encodes event batches as SSE `data:` lines for one streamed response."""

    def __init__(self, request: InferenceRequest, choices: int, keep_text: bool = False) -> None:
        self.request = request
        self.chat = request.kind == "chat"
        self.id = new_id(request.kind)
        self.created = int(time.time())
        self._tail = b',"usage":null}\n\n' if request.include_usage else b"}\n\n"
        self.tracker = ChoiceTracker(choices, keep_text)
        self._set_head(None)

    def _set_head(self, fingerprint: str | None) -> None:
        """The bytes every chunk starts with (and those around choice 0's text, the most
        common chunk); `system_fingerprint` only when the upstream gave one."""
        head: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.request.model,
        }
        if fingerprint:
            head["system_fingerprint"] = fingerprint
        self._head = b"data: " + orjson.dumps(head)[:-1] + b',"choices":'
        if self.chat:
            opening = b'[{"index":0,"delta":{"content":'
            closing = b'},"logprobs":null,"finish_reason":null}]'
        else:
            opening = b'[{"index":0,"text":'
            closing = b',"logprobs":null,"finish_reason":null}]'
        self._text_head = self._head + opening
        self._text_tail = closing + self._tail

    def _chunk(self, choices: list[dict[str, Any]]) -> bytes:
        return self._head + orjson.dumps(choices) + self._tail

    def _choice(
        self, index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None
    ) -> dict[str, Any]:
        if self.chat:
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {
            "index": index,
            "text": delta.get("content", ""),
            "logprobs": logprobs,
            "finish_reason": finish,
        }

    def opening(self) -> bytes:
        """The first chunk(s): the assistant role for every chat choice."""
        if not self.chat:
            return b""
        if self.tracker.choices == 1:
            return self._head + _ROLE_CHOICE + self._tail
        return self._chunk(
            [
                self._choice(i, {"role": "assistant", "content": ""})
                for i in range(self.tracker.choices)
            ]
        )

    def encode(self, batch: Iterable[Event]) -> bytes:
        out: list[bytes] = []
        tracker = self.tracker
        for ev in batch:
            if isinstance(ev, TextDelta):
                text = ev.text
                tracker.chars += len(text)
                if tracker.text is not None:
                    tracker.text.append(text)
                if ev.index == 0 and ev.logprobs is None:
                    encoded = orjson.dumps(text)
                    out.append(self._text_head + encoded + self._text_tail)
                else:
                    choice = self._choice(ev.index, {"content": text}, ev.logprobs)
                    out.append(self._chunk([choice]))
            elif isinstance(ev, ToolCallDelta):
                tracker.has_tools.add(ev.index)
                out.append(
                    self._chunk([self._choice(ev.index, {"tool_calls": [_tool_call_delta(ev)]})])
                )
            elif isinstance(ev, Finish):
                reason = tracker.finish_reason(ev)
                out.append(self._chunk([self._choice(ev.index, {}, None, reason)]))
            elif isinstance(ev, Usage):
                tracker.usage = ev
            elif isinstance(ev, SystemFingerprint):
                self._set_head(ev.value)
            elif isinstance(ev, ReasoningDelta) and self.chat:
                tracker.chars += len(ev.text)
                out.append(self._chunk([self._choice(ev.index, {"reasoning_content": ev.text})]))
        return b"".join(out)

    def closing(self) -> bytes:
        """Finish chunks for choices left open, the usage chunk if asked, and [DONE]."""
        out = [
            self._chunk([self._choice(i, {}, None, "stop")])
            for i in self.tracker.missing_finishes()
        ]
        if self.request.include_usage:
            usage, _ = self.tracker.final_usage(self.request)
            out.append(self._head + b"[]" + b',"usage":' + orjson.dumps(usage) + b"}\n\n")
        out.append(DONE)
        return b"".join(out)


def _tool_call_delta(ev: ToolCallDelta) -> dict[str, Any]:
    call: dict[str, Any] = {"index": ev.call_index}
    if ev.id is not None:
        call["id"] = ev.id
        call["type"] = "function"
    function: dict[str, Any] = {"arguments": ev.arguments}
    if ev.name is not None:
        function["name"] = ev.name
    call["function"] = function
    return call


def error_event(envelope: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(envelope) + b"\n\n"


class ResponseAssembler:
    """Collects the events of a non-streamed request into one OpenAI response object."""

    def __init__(self, request: InferenceRequest, choices: int) -> None:
        self.request = request
        self.chat = request.kind == "chat"
        self.tracker = ChoiceTracker(choices)
        self.text: dict[int, list[str]] = {}
        self.reasoning: dict[int, list[str]] = {}
        self.logprobs: dict[int, list[Any]] = {}
        self.calls: dict[int, dict[int, dict[str, Any]]] = {}
        self.fingerprint: str | None = None

    def add(self, batch: Iterable[Event]) -> None:
        tracker = self.tracker
        for ev in batch:
            if isinstance(ev, TextDelta):
                tracker.chars += len(ev.text)
                self.text.setdefault(ev.index, []).append(ev.text)
                if ev.logprobs is not None:
                    self.logprobs.setdefault(ev.index, []).append(ev.logprobs)
            elif isinstance(ev, ToolCallDelta):
                tracker.has_tools.add(ev.index)
                calls = self.calls.setdefault(ev.index, {})
                call = calls.get(ev.call_index)
                if call is None:
                    call = calls[ev.call_index] = {
                        "id": ev.id or f"call_{ids.new_id()}",
                        "type": "function",
                        "function": {"name": ev.name or "", "arguments": ""},
                    }
                elif ev.name:
                    call["function"]["name"] += ev.name
                call["function"]["arguments"] += ev.arguments
            elif isinstance(ev, Finish):
                tracker.finish_reason(ev)
            elif isinstance(ev, Usage):
                tracker.usage = ev
            elif isinstance(ev, ReasoningDelta):
                self.reasoning.setdefault(ev.index, []).append(ev.text)
            elif isinstance(ev, SystemFingerprint):
                self.fingerprint = ev.value

    def result(self) -> tuple[dict[str, Any], bool]:
        """The response object, and whether its usage is an estimate."""
        tracker = self.tracker
        choices = []
        for i in range(tracker.choices):
            text = "".join(self.text.get(i, ()))
            reason = tracker.finished.get(i, "stop")
            logprobs = _merge_logprobs(self.logprobs.get(i))
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
                calls = self.calls.get(i)
                if calls:
                    message["tool_calls"] = [calls[k] for k in sorted(calls)]
                    if not text:
                        message["content"] = None
                if i in self.reasoning:
                    message["reasoning_content"] = "".join(self.reasoning[i])
                choices.append(
                    {"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason}
                )
            else:
                choices.append(
                    {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}
                )
        usage, estimated = tracker.final_usage(self.request)
        response: dict[str, Any] = {
            "id": new_id(self.request.kind),
            "object": "chat.completion" if self.chat else "text_completion",
            "created": int(time.time()),
            "model": self.request.model,
        }
        if self.fingerprint:
            response["system_fingerprint"] = self.fingerprint
        response["choices"] = choices
        response["usage"] = usage
        return response, estimated


def _merge_logprobs(parts: list[Any] | None) -> Any:
    """Concatenate streamed logprobs pieces: chat `{"content": [...]}` or legacy lists."""
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if isinstance(first, dict):
        merged: dict[str, Any] = {}
        for part in parts:
            for key, value in part.items():
                if isinstance(value, list):
                    merged.setdefault(key, []).extend(value)
                elif key not in merged:
                    merged[key] = value
        return merged
    return first
