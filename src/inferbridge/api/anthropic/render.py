"""Normalized events -> Anthropic Messages answers: one `message` object, or its stream.

Both come from one state machine over the events (`MessagesRenderer._feed`), so a streamed
answer accumulates (as the SDK's `get_final_message()` does) to the object a whole answer
is:
- text goes into a text block, opened at the first text and closed when a tool call
  starts (text after a tool call opens a new block);
- each tool call is one `tool_use` block, in the order the calls start. Its arguments are
  collected until the block closes and parsed then: `input` is the JSON object the model
  wrote, `{}` for empty arguments, and `{"_raw_arguments": "<text>"}` when they are not a
  JSON object (invalid JSON, or another JSON value). A stream sends them as one
  `input_json_delta` when the block closes, so what it sends always parses;
- the stop reason: `max_tokens` for a length finish, `tool_use` when tool calls were made,
  `stop_sequence` when the backend says one of the request's `stop_sequences` ended the
  answer (`stop_sequence` is that string, or null when the backend does not say which),
  `refusal` for a content filter, else `end_turn`;
- usage: the backend's counts, estimated when it gives none (as for chat; a whole answer
  says so in `x-inferbridge-usage-estimated`). A stream's `message_start` carries the
  input tokens known by then (an estimate unless the first batch had the counts), and its
  `message_delta` the final input and output counts.

Reasoning text (`ReasoningDelta`) is not rendered: extended thinking is not supported.
A stream is `event: <type>\\ndata: <json>\\n\\n` events: `message_start`,
`content_block_start` / `content_block_delta` / `content_block_stop` per block,
`message_delta`, `message_stop`; `ping` after `heartbeat` seconds without a batch, and an
`error` event when the stream breaks after it started.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import orjson
from starlette.responses import Response

from inferbridge import ids
from inferbridge.api.anthropic.errors import error_response, error_type
from inferbridge.api.anthropic.schema import ANTHROPIC_NAME
from inferbridge.api.responses import ChoiceTracker
from inferbridge.api.serving import SSE_MEDIA_TYPE
from inferbridge.errors import InferbridgeError
from inferbridge.events import Event, Finish, TextDelta, ToolCallDelta, Usage
from inferbridge.request import InferenceRequest
from inferbridge.usage import estimate_prompt_tokens

log = logging.getLogger("inferbridge")

RAW_ARGUMENTS = "_raw_arguments"
"""The `input` key holding tool arguments that are not a JSON object."""

PING = b'event: ping\ndata: {"type":"ping"}\n\n'
MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
_TEXT_DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
    b'"delta":{"type":"text_delta","text":'
)
_BLOCK_STOP = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n'


def sse(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's `input` from the arguments the model wrote (see module doc)."""
    if not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {RAW_ARGUMENTS: arguments}
    return value if isinstance(value, dict) else {RAW_ARGUMENTS: arguments}


class MessagesRenderer:
    """The Anthropic Messages dialect (a `Renderer`, see `inferbridge.api.serving`)."""

    media_type = SSE_MEDIA_TYPE
    param_names = ANTHROPIC_NAME
    heartbeat: float | None = 15.0
    """Seconds without a batch after which a stream gets a `ping` event."""

    def __init__(self, request: InferenceRequest, choices: int, keep_text: bool) -> None:
        self.request = request
        self.id = "msg_" + ids.new_id()
        self.tracker = ChoiceTracker(1)
        self.content: list[dict[str, Any]] = []
        self.open = -1
        """The index of the open block (-1: none)."""
        self.texts: list[str] = []
        """The open text block's text, in pieces."""
        self.unsent: list[str] = []
        """Text of the open block not written to the stream yet."""
        self.args: list[str] = []
        """The open tool_use block's arguments, in pieces."""
        self.calls: dict[int, int] = {}
        """Tool call index -> its block's index."""
        self.finish: Finish | None = None
        self._usage: dict[str, Any] | None = None

    # -- the blocks -------------------------------------------------------------------------
    def _feed(self, batch: Sequence[Event], out: list[bytes] | None) -> None:
        """Take a batch's events; `out` gets the stream events (None: a whole answer)."""
        tracker = self.tracker
        for ev in batch:
            if isinstance(ev, TextDelta):
                text = ev.text
                if ev.index or not text:
                    continue
                tracker.chars += len(text)
                if self.open < 0 or self.content[self.open]["type"] != "text":
                    self._close(out)
                    self._start({"type": "text", "text": ""}, out)
                self.texts.append(text)
                if out is not None:
                    self.unsent.append(text)
            elif isinstance(ev, ToolCallDelta):
                if not ev.index:
                    self._tool_call(ev, out)
            elif isinstance(ev, Finish):
                if ev.index == 0:
                    self.finish = ev
            elif isinstance(ev, Usage):
                tracker.usage = ev
        self._send_text(out)

    def _tool_call(self, ev: ToolCallDelta, out: list[bytes] | None) -> None:
        at = self.calls.get(ev.call_index)
        if at is None:
            self._close(out)
            self.calls[ev.call_index] = len(self.content)
            call_id = ev.id or f"toolu_{ids.new_id()}"
            self._start(
                {"type": "tool_use", "id": call_id, "name": ev.name or "", "input": {}}, out
            )
        elif at != self.open:
            log.warning(
                "request %s: arguments for tool call %d after it ended are left out",
                self.request.request_id,
                ev.call_index,
            )
            return
        elif ev.name and not self.content[at]["name"]:
            self.content[at]["name"] = ev.name
        self.args.append(ev.arguments)
        self.tracker.chars += len(ev.arguments)

    def _start(self, block: dict[str, Any], out: list[bytes] | None) -> None:
        self.open = len(self.content)
        self.content.append(block)
        if out is not None:
            start = {"type": "content_block_start", "index": self.open, "content_block": block}
            out.append(sse("content_block_start", start))

    def _send_text(self, out: list[bytes] | None) -> None:
        if out is not None and self.unsent:
            text = orjson.dumps("".join(self.unsent))
            out.append(_TEXT_DELTA % self.open + text + b"}}\n\n")
            self.unsent.clear()

    def _close(self, out: list[bytes] | None) -> None:
        at = self.open
        if at < 0:
            return
        block = self.content[at]
        if block["type"] == "text":
            self._send_text(out)
            block["text"] = "".join(self.texts)
            self.texts = []
        else:
            value = block["input"] = tool_input("".join(self.args))
            self.args = []
            if out is not None and value:
                delta = {"type": "input_json_delta", "partial_json": orjson.dumps(value).decode()}
                out.append(
                    sse(
                        "content_block_delta",
                        {"type": "content_block_delta", "index": at, "delta": delta},
                    )
                )
        if out is not None:
            out.append(_BLOCK_STOP % at)
        self.open = -1

    def _stop(self) -> tuple[str, str | None]:
        """(stop_reason, stop_sequence)."""
        finish = self.finish
        reason = finish.reason if finish is not None else "stop"
        if reason == "length":
            return "max_tokens", None
        if reason == "content_filter":
            return "refusal", None
        if self.calls and reason in ("stop", "tool_calls"):
            return "tool_use", None
        matched = finish.stop_sequence if finish is not None else None
        if reason == "stop" and matched is not None:
            stops = self.request.stop
            if matched == "" and stops:
                return "stop_sequence", None
            if matched and matched in stops:
                return "stop_sequence", matched
        return "end_turn", None

    def _final_usage(self) -> tuple[dict[str, Any], bool]:
        usage, estimated = self.tracker.final_usage(self.request)
        self._usage = usage
        return usage, estimated

    # -- a whole answer ---------------------------------------------------------------------
    def add(self, batch: Sequence[Event]) -> None:
        self._feed(batch, None)

    def result(self) -> tuple[dict[str, Any], dict[str, str]]:
        self._close(None)
        stop_reason, stop_sequence = self._stop()
        usage, estimated = self._final_usage()
        message = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.request.model,
            "content": self.content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": {
                "input_tokens": usage["prompt_tokens"],
                "output_tokens": usage["completion_tokens"],
            },
        }
        return message, {"x-inferbridge-usage-estimated": "true"} if estimated else {}

    # -- a stream ---------------------------------------------------------------------------
    def opening(self) -> bytes:
        reported = self.tracker.usage
        known = reported.prompt_tokens if reported is not None else None
        message = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.request.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": known
                if known is not None
                else estimate_prompt_tokens(self.request),
                "output_tokens": 0,
            },
        }
        return sse("message_start", {"type": "message_start", "message": message})

    def encode(self, batch: Sequence[Event]) -> bytes:
        out: list[bytes] = []
        self._feed(batch, out)
        return b"".join(out)

    def closing(self) -> bytes:
        out: list[bytes] = []
        self._close(out)
        stop_reason, stop_sequence = self._stop()
        usage, _ = self._final_usage()
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": {
                "input_tokens": usage["prompt_tokens"],
                "output_tokens": usage["completion_tokens"],
            },
        }
        out.append(sse("message_delta", delta))
        out.append(MESSAGE_STOP)
        return b"".join(out)

    def failure(self, err: InferbridgeError) -> bytes:
        error = {"type": error_type(err.status), "message": err.message}
        return sse("error", {"type": "error", "error": error})

    def ping(self) -> bytes:
        return PING

    # -- records ----------------------------------------------------------------------------
    def usage(self) -> dict[str, Any] | None:
        return self._usage

    def completion(self) -> Any:
        return self.content

    @staticmethod
    def error_response(err: InferbridgeError, request_id: str) -> Response:
        return error_response(err, request_id)
