"""Normalized events -> the Responses API: one `response` object, or its typed SSE events.

`ResponsesRenderer` is the `Renderer` (see `inferbridge.api.serving`) of `/v1/responses`.
Both paths feed the events through the same output builder, so a stream's final
`response.completed` and a whole answer hold the same items:

- text -> one `message` item (`msg_...`) with one `output_text` part;
- tool call fragments -> one `function_call` item (`fc_...`) per call, `call_id` the
  upstream's call id;
- reasoning text -> a `reasoning` item (`rs_...`) with a `reasoning_text` part;
- the finish reason -> `status`: "length" is `incomplete` (`max_output_tokens`),
  "content_filter" `incomplete` (`content_filter`), anything else `completed`;
- usage -> `input_tokens` / `output_tokens` (estimated like chat's when the backend gave
  none, see `ChoiceTracker`).

A stream is `response.created`, `response.in_progress`, then per item
`response.output_item.added` ... `response.output_item.done` (with the content part, text
and argument events between), then `response.completed` or `response.incomplete`; a failure
after the start is `response.failed` carrying the error. Each event is
`event: <type>\\ndata: {...}\\n\\n` with an increasing `sequence_number`; there is no
`[DONE]`.

Items open as their first event arrives and close (their `.done` events) when another kind
of item starts or the answer finishes, so they are sent one after the other, as OpenAI does.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from starlette.responses import Response

from inferbridge.api.responses import ChoiceTracker
from inferbridge.api.responses_api.translate import RESPONSES_NAME, new_id
from inferbridge.api.serving import SSE_MEDIA_TYPE, error_response
from inferbridge.errors import InferbridgeError, InvalidRequest, UnsupportedParameter
from inferbridge.events import Event, Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage
from inferbridge.request import InferenceRequest

_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def sse(event: dict[str, Any]) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


# -- the response object ---------------------------------------------------------------------
def response_shell(body: dict[str, Any], response_id: str, created_at: int) -> dict[str, Any]:
    """The response object before any output: the request's settings echoed as the SDK's
    `Response` type has them."""
    text = body.get("text") or {}
    reasoning = body.get("reasoning") or {}
    tools = [
        {
            "type": "function",
            "name": t["name"],
            "description": t.get("description"),
            "parameters": t.get("parameters"),
            "strict": t.get("strict"),
        }
        for t in body.get("tools") or ()
    ]
    parallel = body.get("parallel_tool_calls")
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": False,
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": None,
        "model": body["model"],
        "output": [],
        "parallel_tool_calls": True if parallel is None else parallel,
        "previous_response_id": body.get("previous_response_id"),
        "prompt_cache_key": body.get("prompt_cache_key"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "safety_identifier": body.get("safety_identifier"),
        "service_tier": body.get("service_tier"),
        "store": body.get("store") is not False,
        "temperature": body.get("temperature"),
        "text": {
            "format": text.get("format") or {"type": "text"},
            "verbosity": text.get("verbosity"),
        },
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": tools,
        "top_logprobs": body.get("top_logprobs"),
        "top_p": body.get("top_p"),
        "truncation": body.get("truncation") or "disabled",
        "usage": None,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


def responses_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """Chat usage (`prompt_tokens`...) in the Responses API's names."""
    prompt = usage.get("prompt_tokens_details") or {}
    completion = usage.get("completion_tokens_details") or {}
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {
            "cached_tokens": prompt.get("cached_tokens") or 0,
            "cache_write_tokens": prompt.get("cache_write_tokens") or 0,
        },
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": completion.get("reasoning_tokens") or 0},
        "total_tokens": usage["total_tokens"],
    }


def responses_logprobs(logprobs: Any) -> list[dict[str, Any]]:
    """Chat logprobs (`{"content": [{token, logprob, bytes, top_logprobs}]}`) as the
    Responses API's list."""
    entries = logprobs.get("content") if isinstance(logprobs, dict) else None
    out = []
    for e in entries or ():
        if not isinstance(e, dict) or "token" not in e:
            continue
        out.append(
            {
                "token": e["token"],
                "logprob": e.get("logprob", 0.0),
                "bytes": e.get("bytes") or [],
                "top_logprobs": [
                    {
                        "token": t["token"],
                        "logprob": t.get("logprob", 0.0),
                        "bytes": t.get("bytes") or [],
                    }
                    for t in e.get("top_logprobs") or ()
                    if isinstance(t, dict) and "token" in t
                ],
            }
        )
    return out


def responses_error(err: InferbridgeError) -> InferbridgeError:
    """A backend's refusal of a chat parameter (`response_format`) in the names of the
    Responses request (`text.format`)."""
    param = err.param or ""
    name = RESPONSES_NAME.get(param)
    if name is None or not isinstance(err, UnsupportedParameter):
        return err
    message = err.message.replace(f"'{param}'", f"'{name}'")
    return InvalidRequest(message, param=name, code=err.code, headers=err.headers)


# -- output items ------------------------------------------------------------------------------
class _Item:
    """An output item being produced: its object (in `output`) and its pieces so far."""

    __slots__ = ("done", "index", "item", "logprobs", "pieces")

    def __init__(self, item: dict[str, Any], index: int) -> None:
        self.item = item
        self.index = index
        self.pieces: list[str] = []
        self.logprobs: list[dict[str, Any]] = []
        self.done = False

    @property
    def id(self) -> str:
        return self.item["id"]


class ResponsesRenderer:
    """One `/v1/responses` answer (see module doc). `shell` is `response_shell(...)`."""

    media_type = SSE_MEDIA_TYPE
    param_names = RESPONSES_NAME

    def __init__(
        self,
        request: InferenceRequest,
        choices: int,
        keep_text: bool,
        shell: dict[str, Any],
    ) -> None:
        self.request = request
        self.response = shell
        self.output: list[dict[str, Any]] = shell["output"]
        self.tracker = ChoiceTracker(choices)
        self.emit = request.stream
        self.seq = 2  # 0 and 1: response.created and response.in_progress (`opening`)
        self.out: list[bytes] = []
        self.reason: str | None = None
        self.message: _Item | None = None
        self.reasoning: _Item | None = None
        self.calls: dict[int, _Item] = {}
        self.open_call: _Item | None = None
        self._usage: dict[str, Any] | None = None
        self.final: dict[str, Any] | None = None
        """The response object once the answer ended (completed, incomplete or failed)."""

    # -- Renderer ---------------------------------------------------------------------------
    def add(self, batch: Sequence[Event]) -> None:
        self._feed(batch)

    def result(self) -> tuple[dict[str, Any], dict[str, str]]:
        estimated = self._finish()
        headers = {"x-inferbridge-usage-estimated": "true"} if estimated else {}
        return self.response, headers

    def opening(self) -> bytes:
        shell = {**self.response, "output": []}
        return sse({"type": "response.created", "sequence_number": 0, "response": shell}) + sse(
            {"type": "response.in_progress", "sequence_number": 1, "response": shell}
        )

    def encode(self, batch: Sequence[Event]) -> bytes:
        self._feed(batch)
        return self._take()

    def closing(self) -> bytes:
        self._finish()
        status = self.response["status"]  # completed or incomplete
        self._send(f"response.{status}", response=self.response)
        return self._take()

    def failure(self, err: InferbridgeError) -> bytes:
        for item in self._open_items():
            item.item["status"] = "incomplete"
            self._fill(item)
        code = "rate_limit_exceeded" if err.status == 429 else "server_error"
        response = self.response
        response["status"] = "failed"
        response["error"] = {"code": code, "message": err.message}
        self._usage = self.tracker.final_usage(self.request)[0]
        response["usage"] = responses_usage(self._usage)
        self.final = response
        self._send("response.failed", response=response)
        return self._take()

    def usage(self) -> dict[str, Any] | None:
        return self._usage

    def completion(self) -> Any:
        return self.output

    @staticmethod
    def error_response(err: InferbridgeError, request_id: str) -> Response:
        return error_response(responses_error(err), request_id)

    # -- events -> items ----------------------------------------------------------------------
    def _feed(self, batch: Iterable[Event]) -> None:
        tracker = self.tracker
        for ev in batch:
            kind = type(ev)
            if kind is TextDelta:
                if ev.text or ev.logprobs:
                    self._text(ev)  # type: ignore[arg-type]
            elif kind is ToolCallDelta:
                self._tool_call(ev)  # type: ignore[arg-type]
            elif kind is ReasoningDelta:
                if ev.text:  # type: ignore[union-attr]
                    self._reasoning(ev)  # type: ignore[arg-type]
            elif kind is Finish:
                self.reason = tracker.finish_reason(ev)  # type: ignore[arg-type]
                status = "incomplete" if self.reason in _INCOMPLETE else "completed"
                self._close_all(status)
            elif kind is Usage:
                tracker.usage = ev  # type: ignore[assignment]

    def _text(self, ev: TextDelta) -> None:
        msg = self.message
        if msg is None or msg.done:
            self._close_reasoning()
            self._close_call()
            msg = self.message = self._open(
                {
                    "id": new_id("msg"),
                    "type": "message",
                    "status": "in_progress",
                    "role": "assistant",
                    "content": [],
                },
                {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
            )
        text = ev.text
        self.tracker.chars += len(text)
        msg.pieces.append(text)
        logprobs = responses_logprobs(ev.logprobs) if ev.logprobs is not None else []
        msg.logprobs += logprobs
        if self.emit and text:
            self._send(
                "response.output_text.delta",
                item_id=msg.id,
                output_index=msg.index,
                content_index=0,
                delta=text,
                logprobs=logprobs,
            )

    def _reasoning(self, ev: ReasoningDelta) -> None:
        item = self.reasoning
        if item is None or item.done:
            self._close_message()
            self._close_call()
            item = self.reasoning = self._open(
                {
                    "id": new_id("rs"),
                    "type": "reasoning",
                    "status": "in_progress",
                    "summary": [],
                    "content": [],
                },
                {"type": "reasoning_text", "text": ""},
            )
        self.tracker.chars += len(ev.text)
        item.pieces.append(ev.text)
        if self.emit:
            self._send(
                "response.reasoning_text.delta",
                item_id=item.id,
                output_index=item.index,
                content_index=0,
                delta=ev.text,
            )

    def _tool_call(self, ev: ToolCallDelta) -> None:
        self.tracker.has_tools.add(ev.index)
        call = self.calls.get(ev.call_index)
        if call is None:
            self._close_reasoning()
            self._close_message()
            self._close_call()
            call = self.calls[ev.call_index] = self.open_call = self._open(
                {
                    "id": new_id("fc"),
                    "type": "function_call",
                    "status": "in_progress",
                    "call_id": ev.id or new_id("call"),
                    "name": ev.name or "",
                    "arguments": "",
                },
                None,
            )
        elif ev.name:
            call.item["name"] += ev.name
        if not ev.arguments:
            return
        self.tracker.chars += len(ev.arguments)
        call.pieces.append(ev.arguments)
        if call.done:  # a fragment after its call was closed: only the final object has it
            call.item["arguments"] = "".join(call.pieces)
        elif self.emit:
            self._send(
                "response.function_call_arguments.delta",
                item_id=call.id,
                output_index=call.index,
                delta=ev.arguments,
            )

    def _open(self, item: dict[str, Any], part: dict[str, Any] | None) -> _Item:
        index = len(self.output)
        self.output.append(item)
        state = _Item(item, index)
        if self.emit:
            self._send("response.output_item.added", output_index=index, item=item)
            if part is not None:
                self._send(
                    "response.content_part.added",
                    item_id=state.id,
                    output_index=index,
                    content_index=0,
                    part=part,
                )
        return state

    def _fill(self, state: _Item) -> None:
        """Put what was produced into the item object."""
        item = state.item
        text = "".join(state.pieces)
        if item["type"] == "message":
            logprobs = state.logprobs
            item["content"] = [
                {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}
            ]
        elif item["type"] == "reasoning":
            item["content"] = [{"type": "reasoning_text", "text": text}]
        else:
            item["arguments"] = text

    def _close(self, state: _Item | None, status: str = "completed") -> None:
        if state is None or state.done:
            return
        state.done = True
        item = state.item
        item["status"] = status
        self._fill(state)
        if not self.emit:
            return
        where = {"item_id": state.id, "output_index": state.index}
        if item["type"] == "message":
            part = item["content"][0]
            self._send(
                "response.output_text.done",
                **where,
                content_index=0,
                text=part["text"],
                logprobs=part["logprobs"],
            )
            self._send("response.content_part.done", **where, content_index=0, part=part)
        elif item["type"] == "reasoning":
            part = item["content"][0]
            self._send("response.reasoning_text.done", **where, content_index=0, text=part["text"])
            self._send("response.content_part.done", **where, content_index=0, part=part)
        else:
            self._send(
                "response.function_call_arguments.done", **where, arguments=item["arguments"]
            )
        self._send("response.output_item.done", output_index=state.index, item=item)

    def _close_message(self) -> None:
        self._close(self.message)

    def _close_reasoning(self) -> None:
        self._close(self.reasoning)

    def _close_call(self) -> None:
        self._close(self.open_call)

    def _open_items(self) -> list[_Item]:
        items = [self.reasoning, self.message, *self.calls.values()]
        return sorted((i for i in items if i is not None and not i.done), key=lambda i: i.index)

    def _close_all(self, status: str) -> None:
        for item in self._open_items():
            self._close(item, status)

    def _finish(self) -> bool:
        """Close what is open, fill in status and usage; whether usage is an estimate."""
        reason = self.reason
        if reason is None:  # the backend never said: like chat, "stop"
            reason = self.reason = "stop"
            self._close_all("completed")
        if not self.output:  # nothing generated: an empty message, as chat's ""
            status = "incomplete" if reason in _INCOMPLETE else "completed"
            self._close(self._open(_empty_message(), _EMPTY_TEXT), status)
        response = self.response
        incomplete = _INCOMPLETE.get(reason)
        if incomplete:
            response["status"] = "incomplete"
            response["incomplete_details"] = {"reason": incomplete}
        else:
            response["status"] = "completed"
            response["completed_at"] = int(time.time())
        usage, estimated = self.tracker.final_usage(self.request)
        self._usage = usage
        response["usage"] = responses_usage(usage)
        self.final = response
        return estimated

    # -- SSE ------------------------------------------------------------------------------------
    def _send(self, kind: str, **fields: Any) -> None:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        self.out.append(sse(event))

    def _take(self) -> bytes:
        if not self.out:
            return b""
        data = b"".join(self.out)
        self.out.clear()
        return data


_EMPTY_TEXT = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}


def _empty_message() -> dict[str, Any]:
    return {
        "id": new_id("msg"),
        "type": "message",
        "status": "in_progress",
        "role": "assistant",
        "content": [],
    }
