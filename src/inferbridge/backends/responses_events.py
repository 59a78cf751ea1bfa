"""OpenAI's Responses API answers -> normalized events, for upstreams that serve
`/v1/responses` themselves (`responses_api: native`, see `backends.openai_compat`).

A whole answer is one `response` object (`response_object_events`); a stream is typed
server-sent events (`ResponsesStreamParser`), each `data:` a JSON object with its `type`.
What becomes what:

    message items: output_text (and refusal) parts     -> TextDelta (logprobs kept)
    function_call items                                 -> ToolCallDelta (call_id, name,
                                                           argument fragments)
    reasoning items: reasoning_text / summary_text      -> ReasoningDelta
    status completed                                    -> Finish "stop" ("tool_calls"
                                                           when there were calls)
    status incomplete (max_output_tokens / content_filter) -> Finish "length" / "content_filter"
    usage (input_tokens, output_tokens and details)     -> Usage, in chat's names
    status failed, an `error` event                     -> UpstreamError

Streams: `response.output_text.delta`, `response.refusal.delta`,
`response.function_call_arguments.delta`, `response.reasoning_text.delta` and
`response.reasoning_summary_text.delta` carry the pieces; an `output_item.added` of a
function call opens it (id and name). The `.done` events and `response.output_item.done`
repeat the whole text: only what no delta carried is taken from them, so an upstream that
sends no deltas (or fewer) loses nothing. `response.completed` / `response.incomplete` end
the stream (a body that ends before is truncated); other events (created, in_progress,
content_part.*, annotations) carry nothing the renderer needs. Items are never reordered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from inferbridge.backends.http import ItemParser, load_json, status_error
from inferbridge.decoders import ServerSentEvent, SSEDecoder
from inferbridge.errors import UpstreamError
from inferbridge.events import Event, Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage

_INCOMPLETE = {"max_output_tokens": "length", "content_filter": "content_filter"}
_TEXT_DELTAS = {
    "response.output_text.delta": "text",
    "response.refusal.delta": "text",
    "response.reasoning_text.delta": "reasoning",
    "response.reasoning_summary_text.delta": "summary",
}
_TEXT_DONE = {
    "response.output_text.done": ("text", "text"),
    "response.refusal.done": ("text", "refusal"),
    "response.reasoning_text.done": ("reasoning", "text"),
    "response.reasoning_summary_text.done": ("summary", "text"),
}


def usage_of(response: dict[str, Any]) -> Usage | None:
    """The response's `usage` as chat's counts (None when it has none)."""
    usage = response.get("usage")
    if not isinstance(usage, dict):
        return None
    details: dict[str, Any] = {}
    prompt = usage.get("input_tokens_details")
    if isinstance(prompt, dict):
        details["prompt_tokens_details"] = prompt
    completion = usage.get("output_tokens_details")
    if isinstance(completion, dict):
        details["completion_tokens_details"] = completion
    return Usage(
        int(usage.get("input_tokens") or 0),
        int(usage.get("output_tokens") or 0),
        details or None,
    )


def failure(label: str, error: Any, status: Any = None) -> UpstreamError:
    """A `failed` response's `error`, or an `error` event, as the error to raise: a rate
    limit keeps its meaning (429, retried), anything else is the backend's failure."""
    info = error if isinstance(error, dict) else {}
    message = info.get("message") or f"the response ended with status {status or 'failed'}"
    if info.get("code") in ("rate_limit_exceeded", "insufficient_quota"):
        return status_error(label, 429, orjson.dumps({"error": info}))
    return UpstreamError(f"{label} reported an error: {message}", backend=label)


def finish_of(response: dict[str, Any], calls: bool) -> Finish:
    """How the answer ended: `incomplete_details.reason` when incomplete."""
    if response.get("status") == "incomplete":
        reason = (response.get("incomplete_details") or {}).get("reason")
        return Finish(_INCOMPLETE.get(reason or "", "length"))
    return Finish("tool_calls" if calls else "stop")


class _Pieces:
    """What was relayed so far of each text and argument string, so that a `.done` event
    (or a whole item) adds only what no delta carried."""

    __slots__ = ("calls", "seen")

    def __init__(self) -> None:
        self.seen: dict[tuple[Any, ...], str] = {}
        self.calls: dict[Any, int] = {}
        """output_index -> call_index of each function call item."""

    def add(self, key: tuple[Any, ...], delta: str) -> None:
        self.seen[key] = self.seen.get(key, "") + delta

    def rest(self, key: tuple[Any, ...], whole: Any) -> str:
        """The part of `whole` not relayed yet ("" when it adds nothing or disagrees)."""
        if not isinstance(whole, str):
            return ""
        seen = self.seen.get(key, "")
        if len(whole) <= len(seen) or not whole.startswith(seen):
            return ""
        self.seen[key] = whole
        return whole[len(seen) :]

    def call(self, output_index: Any, item: dict[str, Any], out: list[Event]) -> int:
        """The call index of a function call item, opening the call (id and name) the first
        time it is seen."""
        found = self.calls.get(output_index)
        if found is None:
            found = self.calls[output_index] = len(self.calls)
            out.append(ToolCallDelta(found, id=item.get("call_id"), name=item.get("name") or ""))
        return found

    def item(self, output_index: Any, item: dict[str, Any], out: list[Event]) -> None:
        """A whole output item: what its deltas did not carry."""
        kind = item.get("type")
        if kind == "message":
            for j, part in enumerate(item.get("content") or ()):
                if not isinstance(part, dict):
                    continue
                field = "refusal" if part.get("type") == "refusal" else "text"
                key = ("text", output_index, j)
                logprobs = part.get("logprobs") if key not in self.seen else None
                text = self.rest(key, part.get(field))
                if text or logprobs:
                    out.append(TextDelta(text, 0, {"content": logprobs} if logprobs else None))
        elif kind == "function_call":
            index = self.call(output_index, item, out)
            arguments = self.rest(("args", output_index), item.get("arguments"))
            if arguments:
                out.append(ToolCallDelta(index, arguments=arguments))
        elif kind == "reasoning":
            for field, where in (("content", "reasoning"), ("summary", "summary")):
                for j, part in enumerate(item.get(field) or ()):
                    if isinstance(part, dict):
                        text = self.rest((where, output_index, j), part.get("text"))
                        if text:
                            out.append(ReasoningDelta(text))


def response_object_events(data: dict[str, Any], label: str) -> list[Event]:
    """The events of a whole (non-streamed) `response` object."""
    status = data.get("status")
    if status in ("failed", "cancelled") or data.get("error"):
        raise failure(label, data.get("error"), status)
    pieces = _Pieces()
    out: list[Event] = []
    for i, item in enumerate(data.get("output") or ()):
        if isinstance(item, dict):
            pieces.item(i, item, out)
    out.append(finish_of(data, bool(pieces.calls)))
    usage = usage_of(data)
    if usage is not None:
        out.append(usage)
    return out


class ResponsesStreamParser(ItemParser):
    """A Responses API event stream -> events (see module doc). `raise_error` raises an
    error object in another shape (`{"error": {...}}` without a `type`) the adapter's way."""

    __slots__ = ("pieces", "raise_error")

    def __init__(self, label: str, raise_error: Callable[[Any], None]) -> None:
        super().__init__(label, SSEDecoder())
        self.pieces = _Pieces()
        self.raise_error = raise_error

    def take(self, event: ServerSentEvent, batch: list[Event]) -> bool:
        data = event.data
        if data == b"[DONE]":
            return True
        obj = load_json(self.label, data)
        if type(obj) is not dict:
            raise UpstreamError(
                f"{self.label} sent a stream event that is not a JSON object: {data[:200]!r}",
                backend=self.label,
            )
        kind = obj.get("type")
        pieces = self.pieces
        where = obj.get("output_index")
        if kind in _TEXT_DELTAS:
            delta = obj.get("delta")
            if not isinstance(delta, str):
                return False
            what = _TEXT_DELTAS[kind]
            index = obj.get("summary_index") if what == "summary" else obj.get("content_index")
            pieces.add((what, where, index), delta)
            if what == "text":
                logprobs = obj.get("logprobs")
                if delta or logprobs:
                    batch.append(TextDelta(delta, 0, {"content": logprobs} if logprobs else None))
            elif delta:
                batch.append(ReasoningDelta(delta))
        elif kind == "response.function_call_arguments.delta":
            index = pieces.calls.get(where)
            delta = obj.get("delta")
            if index is None or not isinstance(delta, str) or not delta:
                return False
            pieces.add(("args", where), delta)
            batch.append(ToolCallDelta(index, arguments=delta))
        elif kind in _TEXT_DONE:
            what, field = _TEXT_DONE[kind]
            index = obj.get("summary_index") if what == "summary" else obj.get("content_index")
            key = (what, where, index)
            logprobs = obj.get("logprobs") if key not in pieces.seen else None
            text = pieces.rest(key, obj.get(field))
            if what != "text":
                if text:
                    batch.append(ReasoningDelta(text))
            elif text or logprobs:
                batch.append(TextDelta(text, 0, {"content": logprobs} if logprobs else None))
        elif kind == "response.function_call_arguments.done":
            index = pieces.calls.get(where)
            arguments = pieces.rest(("args", where), obj.get("arguments"))
            if index is not None and arguments:
                batch.append(ToolCallDelta(index, arguments=arguments))
        elif kind == "response.output_item.added":
            item = obj.get("item")
            if isinstance(item, dict) and item.get("type") == "function_call":
                index = pieces.call(where, item, batch)
                arguments = pieces.rest(("args", where), item.get("arguments"))
                if arguments:
                    batch.append(ToolCallDelta(index, arguments=arguments))
        elif kind == "response.output_item.done":
            item = obj.get("item")
            if isinstance(item, dict):
                pieces.item(where, item, batch)
        elif kind in ("response.completed", "response.incomplete"):
            response = obj.get("response") or {}
            batch.append(finish_of(response, bool(pieces.calls)))
            usage = usage_of(response)
            if usage is not None:
                batch.append(usage)
            return True
        elif kind == "response.failed":
            response = obj.get("response") or {}
            raise failure(self.label, response.get("error"), response.get("status"))
        elif kind == "error":
            nested = obj.get("error")
            raise failure(self.label, nested if isinstance(nested, dict) else obj)
        elif kind is None and "error" in obj:
            self.raise_error(obj)
        return False
