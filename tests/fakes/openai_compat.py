"""A fake OpenAI-compatible server (vLLM-like) on a real socket.

Serves `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/models` and
OpenAI's Responses API, `/v1/responses`. Replies are scripted with `reply` (text split into
the given chunks) or `tool_calls`; streams are written as real SSE (`data: {...}\\n\\n` ...
`data: [DONE]\\n\\n`), optionally split at awkward byte boundaries, delayed, or cut off.
Errors use vLLM's envelope (`{"error": {..., "code": 400}}`).

`/v1/responses` answers as OpenAI does, byte for byte: a `response` object, or with
`stream: true` typed events (`event: <type>\\ndata: {"type": ..., "sequence_number": ...}`),
no `[DONE]`; `reasoning` (text) adds a reasoning item with a summary first, `reply` is one
message item, each of `tool_calls` a function_call item; `finish_reason` "length" or
"content_filter" makes the response `incomplete`; `error_event_after` sends an `error`
event instead of the Nth text delta and ends the stream. Like OpenAI with `store: false`
it keeps nothing: a `previous_response_id`, or a reasoning item it would have to look up,
is refused (as are chat parameters such as `messages`, with OpenAI's 400).
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from typing import Any

from aiohttp import web

from tests.fakes.base import FakeServer, sse
from tests.fakes.embeddings import as_inputs, openai_answer

# -- the Responses API ------------------------------------------------------------------------
CHAT_ONLY = ("messages", "max_tokens", "max_completion_tokens", "stop", "seed", "n")
LOGPROBS = "message.output_text.logprobs"


def openai_error(status: int, message: str, param: str | None, code: str | None) -> web.Response:
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    return web.json_response({"error": error}, status=status)


def responses_sse(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _ResponsesMixin:
    """`POST /v1/responses` for `FakeOpenAI` (see the module doc)."""

    async def responses(self: Any, request: web.Request) -> web.StreamResponse:
        rec = await self.record(request)
        body = rec.json
        if self.behaviour.status != 200:
            if self.behaviour.delay_first_byte:
                await asyncio.sleep(self.behaviour.delay_first_byte)
            return self.error_response()
        refused = self._refuse_response_request(body)
        if refused is not None:
            return refused
        events = self._response_events(body)
        if body.get("stream"):
            pieces = [responses_sse(e) for e in events]
            return await self.write_stream(request, pieces, "text/event-stream; charset=utf-8")
        if self.behaviour.delay_first_byte:
            await asyncio.sleep(self.behaviour.delay_first_byte)
        final = events[-1]
        if final["type"] == "error":
            return openai_error(500, final["message"], None, final["code"])
        return web.json_response(final["response"])

    def _refuse_response_request(self: Any, body: Any) -> web.Response | None:
        if not isinstance(body, dict):
            return openai_error(400, "We could not parse the JSON body.", None, None)
        if body.get("model") != self.served_model:
            return openai_error(
                400,
                f"The requested model '{body.get('model')}' does not exist.",
                "model",
                "model_not_found",
            )
        for key in CHAT_ONLY:
            if key in body:
                return openai_error(400, f"Unknown parameter: '{key}'.", key, "unknown_parameter")
        previous = body.get("previous_response_id")
        if previous:
            return openai_error(
                400,
                f"Previous response with id '{previous}' not found.",
                "previous_response_id",
                "previous_response_not_found",
            )
        items = body.get("input")
        for item in items if isinstance(items, list) else ():
            if item.get("type") == "reasoning" and not item.get("encrypted_content"):
                return openai_error(
                    404,
                    f"Item with id '{item.get('id')}' not found. Items are not persisted "
                    "when `store` is set to false. Try again with `store` set to true, or "
                    "remove this item from your input.",
                    "input",
                    None,
                )
        for i, tool in enumerate(body.get("tools") or ()):
            if tool.get("type") == "function" and "name" not in tool:
                return openai_error(
                    400,
                    f"Missing required parameter: 'tools[{i}].name'.",
                    f"tools[{i}].name",
                    "missing_required_parameter",
                )
        return None

    def _response_shell(self: Any, body: dict[str, Any]) -> dict[str, Any]:
        text = body.get("text") or {}
        return {
            "id": _id("resp"),
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "background": False,
            "completed_at": None,
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": None,
            "model": self.served_model,
            "output": [],
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": None,
            "prompt_cache_key": None,
            "reasoning": {"effort": (body.get("reasoning") or {}).get("effort"), "summary": None},
            "safety_identifier": None,
            "service_tier": "auto",
            "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0),
            "text": {"format": text.get("format") or {"type": "text"}, "verbosity": "medium"},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "top_logprobs": body.get("top_logprobs", 0),
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": None,
            "user": None,
            "metadata": body.get("metadata") or {},
        }

    def _response_events(self: Any, body: dict[str, Any]) -> list[dict[str, Any]]:
        """Every event of the answer, in order; the last one's `response` is the whole
        answer (or it is an `error` event)."""
        events: list[dict[str, Any]] = []

        def emit(kind: str, **fields: Any) -> None:
            events.append({"type": kind, "sequence_number": len(events), **fields})

        response = self._response_shell(body)
        emit("response.created", response=copy.deepcopy(response))
        emit("response.in_progress", response=copy.deepcopy(response))
        output: list[dict[str, Any]] = response["output"]
        incomplete = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(
            self.finish_reason
        )
        status = "incomplete" if incomplete else "completed"

        if self.reasoning:
            index, item_id = len(output), _id("rs")
            where = {"item_id": item_id, "output_index": index, "summary_index": 0}
            emit(
                "response.output_item.added",
                output_index=index,
                item={"id": item_id, "type": "reasoning", "summary": []},
            )
            emit("response.reasoning_summary_part.added", **where, part=_summary(""))
            for k, word in enumerate(self.reasoning.split(" ")):
                delta = word if k == 0 else " " + word
                emit("response.reasoning_summary_text.delta", **where, delta=delta)
            emit("response.reasoning_summary_text.done", **where, text=self.reasoning)
            emit("response.reasoning_summary_part.done", **where, part=_summary(self.reasoning))
            item = {"id": item_id, "type": "reasoning", "summary": [_summary(self.reasoning)]}
            emit("response.output_item.done", output_index=index, item=item)
            output.append(item)

        if self.reply:
            index, item_id = len(output), _id("msg")
            where = {"item_id": item_id, "output_index": index, "content_index": 0}
            message = {
                "id": item_id,
                "type": "message",
                "status": "in_progress",
                "content": [],
                "role": "assistant",
            }
            emit("response.output_item.added", output_index=index, item=copy.deepcopy(message))
            emit("response.content_part.added", **where, part=_output_text("", []))
            top = body.get("top_logprobs") or 0
            wants_logprobs = LOGPROBS in (body.get("include") or ())
            logprobs: list[dict[str, Any]] = []
            for i, piece in enumerate(self.reply):
                if self.error_event_after is not None and i == self.error_event_after:
                    emit("error", code="server_error", message="engine died", param=None)
                    return events
                lp = []
                if wants_logprobs:
                    alternatives = [(piece, -0.5), ("alt", -2.0)][:top]
                    lp = [
                        {
                            "token": piece,
                            "logprob": -0.5,
                            "top_logprobs": [{"token": t, "logprob": p} for t, p in alternatives],
                        }
                    ]
                    logprobs.append(
                        {
                            "token": piece,
                            "bytes": list(piece.encode()),
                            "logprob": -0.5,
                            "top_logprobs": [
                                {"token": t, "bytes": list(t.encode()), "logprob": p}
                                for t, p in alternatives
                            ],
                        }
                    )
                emit(
                    "response.output_text.delta",
                    **where,
                    delta=piece,
                    logprobs=lp,
                    obfuscation="x" * (4 - len(piece) % 4),
                )
            text = "".join(self.reply)
            emit("response.output_text.done", **where, text=text, logprobs=logprobs)
            part = _output_text(text, logprobs)
            emit("response.content_part.done", **where, part=part)
            message.update(status=status, content=[part])
            emit("response.output_item.done", output_index=index, item=message)
            output.append(message)

        for call in self.tool_calls or ():
            index, item_id = len(output), _id("fc")
            item = {
                "id": item_id,
                "type": "function_call",
                "status": "in_progress",
                "arguments": "",
                "call_id": call["id"],
                "name": call["name"],
            }
            where = {"item_id": item_id, "output_index": index}
            emit("response.output_item.added", output_index=index, item=dict(item))
            args = call["arguments"]
            half = len(args) // 2
            for delta in (args[:half], args[half:]):
                emit("response.function_call_arguments.delta", **where, delta=delta)
            emit("response.function_call_arguments.done", **where, arguments=args)
            item.update(status="completed", arguments=args)
            emit("response.output_item.done", output_index=index, item=item)
            output.append(item)

        response["status"] = status
        if incomplete:
            response["incomplete_details"] = {"reason": incomplete}
        else:
            response["completed_at"] = int(time.time())
        if self.send_usage:
            usage = self.usage
            response["usage"] = {
                "input_tokens": usage["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": usage["completion_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage["total_tokens"],
            }
        emit(f"response.{status}", response=response)
        return events


def _output_text(text: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": logprobs, "text": text}


def _summary(text: str) -> dict[str, Any]:
    return {"type": "summary_text", "text": text}


class FakeOpenAI(FakeServer, _ResponsesMixin):
    def __init__(self) -> None:
        super().__init__()
        self.reply: list[str] = ["Hello", " from", " upstream"]
        self.finish_reason = "stop"
        self.tool_calls: list[dict[str, Any]] | None = None
        self.usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        self.send_usage = True
        self.error_event_after: int | None = None  # send an error event after N chunks
        self.served_model = "upstream-model"
        self.reasoning: str | None = None  # /v1/responses: a reasoning summary first
        # embeddings: at most this many inputs per request; data in reverse order (with
        # the right indexes); usage left out
        self.max_embedding_inputs = 2048
        self.reverse_embeddings = False
        self.embedding_usage = True

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/completions", self.completions),
            web.post("/v1/embeddings", self.embeddings),
            web.post("/v1/responses", self.responses),
            web.get("/v1/models", self.models),
        ]

    async def embeddings(self, request: web.Request) -> web.Response:
        """vLLM's /v1/embeddings: OpenAI's request and answer (floats or base64)."""
        rec = await self.record(request)
        body = rec.json
        if self.behaviour.status != 200:
            return self.error_response()
        if body.get("model") != self.served_model:
            return web.json_response(
                {
                    "error": {
                        "message": f"The model `{body.get('model')}` does not exist.",
                        "type": "NotFoundError",
                        "param": None,
                        "code": 404,
                    }
                },
                status=404,
            )
        inputs = as_inputs(body.get("input"))
        if not inputs or len(inputs) > self.max_embedding_inputs:
            message = f"{len(inputs)} inputs: between 1 and {self.max_embedding_inputs} allowed"
            error = {"message": message, "type": "BadRequestError", "param": None, "code": 400}
            return web.json_response({"error": error}, status=400)
        answer = openai_answer(
            inputs,
            self.served_model,
            dimensions=body.get("dimensions"),
            reverse=self.reverse_embeddings,
            encoding=body.get("encoding_format") or "float",
            usage=self.embedding_usage,
        )
        return web.json_response(answer)

    async def models(self, request: web.Request) -> web.Response:
        await self.record(request)
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": self.served_model, "object": "model", "created": 0, "owned_by": "vllm"}
                ],
            }
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=False)

    async def _answer(self, request: web.Request, chat: bool) -> web.StreamResponse:
        rec = await self.record(request)
        body = rec.json
        if self.behaviour.status != 200:
            if self.behaviour.delay_first_byte:
                await asyncio.sleep(self.behaviour.delay_first_byte)
            return self.error_response()
        if body.get("stream_options") and not body.get("stream"):
            return web.json_response(
                {
                    "error": {
                        "message": "Stream options can only be defined when `stream=True`.",
                        "type": "BadRequestError",
                        "param": None,
                        "code": 400,
                    }
                },
                status=400,
            )
        if body.get("model") != self.served_model:
            return web.json_response(
                {
                    "error": {
                        "message": f"The model `{body.get('model')}` does not exist.",
                        "type": "NotFoundError",
                        "param": None,
                        "code": 404,
                    }
                },
                status=404,
            )
        if body.get("stream"):
            include_usage = (body.get("stream_options") or {}).get("include_usage", False)
            return await self.write_stream(
                request, self._chunks(chat, include_usage), "text/event-stream"
            )
        if self.behaviour.delay_first_byte:
            await asyncio.sleep(self.behaviour.delay_first_byte)
        return web.json_response(self._full(chat))

    def _head(self, chat: bool) -> dict[str, Any]:
        return {
            "id": "chatcmpl-up" if chat else "cmpl-up",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.served_model,
        }

    def _chunks(self, chat: bool, include_usage: bool) -> list[bytes]:
        head = self._head(chat)
        out = []
        if chat:
            out.append(
                sse(
                    {
                        **head,
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ],
                    }
                )
            )
        for i, piece in enumerate(self.reply):
            if self.error_event_after is not None and i == self.error_event_after:
                out.append(
                    sse(
                        {
                            "error": {
                                "message": "engine died",
                                "type": "InternalServerError",
                                "param": None,
                                "code": 500,
                            }
                        }
                    )
                )
                return out
            choice = (
                {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
            )
            out.append(
                sse({**head, "choices": [{**choice, "logprobs": None, "finish_reason": None}]})
            )
        if chat and self.tool_calls:
            for k, call in enumerate(self.tool_calls):
                args = call["arguments"]
                half = len(args) // 2
                first = {
                    "index": k,
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": args[:half]},
                }
                second = {"index": k, "function": {"arguments": args[half:]}}
                for tc in (first, second):
                    out.append(
                        sse(
                            {
                                **head,
                                "choices": [
                                    {
                                        "index": 0,
                                        "delta": {"tool_calls": [tc]},
                                        "logprobs": None,
                                        "finish_reason": None,
                                    }
                                ],
                            }
                        )
                    )
        final = {"index": 0, "logprobs": None, "finish_reason": self.finish_reason}
        final.update({"delta": {}} if chat else {"text": ""})
        out.append(sse({**head, "choices": [final]}))
        if include_usage and self.send_usage:
            out.append(sse({**head, "choices": [], "usage": self.usage}))
        out.append(b"data: [DONE]\n\n")
        return out

    def _full(self, chat: bool) -> dict[str, Any]:
        head = self._head(chat)
        head["object"] = "chat.completion" if chat else "text_completion"
        text = "".join(self.reply)
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self.tool_calls:
                message["tool_calls"] = [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": c["name"], "arguments": c["arguments"]},
                    }
                    for c in self.tool_calls
                ]
            choice: dict[str, Any] = {"index": 0, "message": message}
        else:
            choice = {"index": 0, "text": text}
        choice.update({"logprobs": None, "finish_reason": self.finish_reason})
        out = {**head, "choices": [choice]}
        if self.send_usage:
            out["usage"] = self.usage
        return out
