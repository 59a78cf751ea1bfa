"""A fake OpenAI-compatible server (vLLM-like) on a real socket.

Serves `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings` and `/v1/models`.
Replies are scripted with `reply` (text split into the given chunks) or `tool_calls`;
streams are written as real SSE (`data: {...}\\n\\n` ... `data: [DONE]\\n\\n`), optionally
split at awkward byte boundaries, delayed, or cut off. Errors use vLLM's envelope
(`{"error": {..., "code": 400}}`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from tests.fakes.base import FakeServer, sse
from tests.fakes.embeddings import as_inputs, openai_answer


class FakeOpenAI(FakeServer):
    def __init__(self) -> None:
        super().__init__()
        self.reply: list[str] = ["Hello", " from", " upstream"]
        self.finish_reason = "stop"
        self.tool_calls: list[dict[str, Any]] | None = None
        self.usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        self.send_usage = True
        self.error_event_after: int | None = None  # send an error event after N chunks
        self.served_model = "upstream-model"
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
