"""Fake OpenAI-shaped upstreams on a real socket: Azure OpenAI, and OpenAI's own API.

`FakeAzure` serves both Azure URL forms and checks what Azure checks:

- classic: `POST /openai/deployments/{deployment}/chat/completions?api-version=...` (and
  `/completions`): no api-version -> 404 "Resource not found"; a wrong `api-key` (or Entra
  `Authorization: Bearer` token) -> 401; an unknown deployment -> 404 DeploymentNotFound.
- v1: `POST /openai/v1/chat/completions` (and `/completions`) with `model` = deployment and
  the key as `Authorization: Bearer`.
- embeddings at both forms' `/embeddings`, with the same checks (the vectors are
  `tests.fakes.embeddings.fake_vector`).

Its streams look like Azure's: a first chunk with `choices: []`, `id: ""` and only
`prompt_filter_results`, then chunks whose choices carry `content_filter_results`. A prompt
containing a word of `blocked_words` gets Azure's content-filter 400 body; `finish_reason`
may be scripted to "content_filter".

`FakeOpenAIPlatform` is the same generator at OpenAI's own paths (`/v1/chat/completions`,
`/v1/completions`) with OpenAI's auth check and error bodies.

Replies are scripted with `reply` (pieces, one per "token"); `max_tokens` (in pieces) and
`stop` are honoured so tests can see finish_reason "length" and "stop" come from upstream.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from tests.fakes.base import FakeServer, sse
from tests.fakes.embeddings import as_inputs, openai_answer

SAFE = {"filtered": False, "severity": "safe"}
FILTER_RESULTS = {"hate": SAFE, "self_harm": SAFE, "sexual": SAFE, "violence": SAFE}
FILTERED = {**FILTER_RESULTS, "violence": {"filtered": True, "severity": "medium"}}
PROMPT_FILTER = [
    {
        "prompt_index": 0,
        "content_filter_results": {
            **FILTER_RESULTS,
            "jailbreak": {"filtered": False, "detected": False},
        },
    }
]

CONTENT_FILTER_ERROR = {
    "error": {
        "message": "The response was filtered due to the prompt triggering Azure OpenAI's content "
        "management policy. Please modify your prompt and retry.",
        "type": None,
        "param": "prompt",
        "code": "content_filter",
        "status": 400,
        "innererror": {
            "code": "ResponsibleAIPolicyViolation",
            "content_filter_result": {
                **FILTER_RESULTS,
                "violence": {"filtered": True, "severity": "high"},
            },
        },
    }
}


def _prompt_text(body: dict[str, Any]) -> str:
    if "messages" in body:
        return " ".join(str(m.get("content") or "") for m in body["messages"])
    return str(body.get("prompt") or "")


class FakeOpenAIShaped(FakeServer):
    """Scripted OpenAI-protocol answers; subclasses add the routes and the auth checks."""

    azure_style = False

    def __init__(self) -> None:
        super().__init__()
        self._script_defaults()

    def reset(self) -> None:
        super().reset()
        self._script_defaults()

    def _script_defaults(self) -> None:
        self.reply: list[str] = ["Hello", " from", " upstream"]
        self.finish_reason: str | None = None  # force one (e.g. "content_filter")
        self.tool_calls: list[dict[str, Any]] | None = None  # {id, name, fragments: [...]}
        self.usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
        self.reported_model = "gpt-4o-2024-08-06"
        self.error_event_after: int | None = None  # an error event after N content chunks
        self.blocked_words: tuple[str, ...] = ("forbidden",)

    # -- subclass hooks -----------------------------------------------------------------
    def check(self, request: web.Request, body: dict[str, Any]) -> web.Response | None:
        return None

    # -- answering --------------------------------------------------------------------
    async def _answer(self, request: web.Request, chat: bool) -> web.StreamResponse:
        rec = await self.record(request)
        body = rec.json or {}
        refused = self.check(request, body)
        if refused is not None:
            return refused
        if self.behaviour.status != 200:
            return self.error_response()
        if self.azure_style and any(w in _prompt_text(body) for w in self.blocked_words):
            return web.json_response(CONTENT_FILTER_ERROR, status=400)
        pieces, finish = self._script(body)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            chunks = self._chunks(chat, pieces, finish, include_usage)
            return await self.write_stream(request, chunks, "text/event-stream")
        return web.json_response(self._full(chat, pieces, finish))

    def _script(self, body: dict[str, Any]) -> tuple[list[str], str]:
        """The pieces to send and the finish reason, honouring max_tokens and stop."""
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else stops
        out: list[str] = []
        text = ""
        finish = "tool_calls" if self.tool_calls else "stop"
        for piece in self.reply:
            if limit is not None and len(out) >= limit:
                finish = "length"
                break
            hits = [(text + piece).find(s) for s in stops if s in text + piece]
            if hits:
                cut = min(hits) - len(text)
                if cut > 0:
                    out.append(piece[:cut])
                finish = "stop"
                break
            out.append(piece)
            text += piece
        return out, self.finish_reason or finish

    def _head(self, chat: bool) -> dict[str, Any]:
        return {
            "id": "chatcmpl-fake1" if chat else "cmpl-fake1",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.reported_model,
            "system_fingerprint": "fp_fake",
        }

    def _choice(
        self, chat: bool, delta: dict[str, Any], finish: str | None = None, filtered: bool = False
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta.get("content", "")
        if self.azure_style:
            choice["content_filter_results"] = (
                FILTERED if filtered else (FILTER_RESULTS if delta.get("content") else {})
            )
        return choice

    def _chunks(
        self, chat: bool, pieces: list[str], finish: str, include_usage: bool
    ) -> list[bytes]:
        head = self._head(chat)
        out: list[bytes] = []
        if self.azure_style:  # Azure's prompt-filter chunk: no choices, empty id/model
            out.append(
                sse(
                    {
                        "choices": [],
                        "created": 0,
                        "id": "",
                        "model": "",
                        "object": "",
                        "prompt_filter_results": PROMPT_FILTER,
                    }
                )
            )
        if chat:
            out.append(
                sse({**head, "choices": [self._choice(chat, {"role": "assistant", "content": ""})]})
            )
        for i, piece in enumerate(pieces):
            if self.error_event_after is not None and i == self.error_event_after:
                out.append(
                    sse(
                        {
                            "error": {
                                "message": "The server had an error while processing your request.",
                                "type": "server_error",
                                "param": None,
                                "code": None,
                            }
                        }
                    )
                )
                return out
            out.append(sse({**head, "choices": [self._choice(chat, {"content": piece})]}))
        for k, call in enumerate(self.tool_calls or ()):
            for j, fragment in enumerate(call["fragments"]):
                tc: dict[str, Any] = {"index": k, "function": {"arguments": fragment}}
                if j == 0:
                    tc.update(id=call["id"], type="function")
                    tc["function"]["name"] = call["name"]
                out.append(sse({**head, "choices": [self._choice(chat, {"tool_calls": [tc]})]}))
        out.append(
            sse(
                {
                    **head,
                    "choices": [
                        self._choice(chat, {}, finish, filtered=finish == "content_filter")
                    ],
                }
            )
        )
        if include_usage:
            out.append(sse({**head, "choices": [], "usage": self.usage}))
        out.append(b"data: [DONE]\n\n")
        return out

    def _full(self, chat: bool, pieces: list[str], finish: str) -> dict[str, Any]:
        head = self._head(chat)
        head["object"] = "chat.completion" if chat else "text_completion"
        text = "".join(pieces)
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": text or None}
            if self.tool_calls:
                message["tool_calls"] = [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": c["name"], "arguments": "".join(c["fragments"])},
                    }
                    for c in self.tool_calls
                ]
            choice: dict[str, Any] = {"index": 0, "message": message}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=finish)
        if self.azure_style:
            choice["content_filter_results"] = (
                FILTERED if finish == "content_filter" else FILTER_RESULTS
            )
        out: dict[str, Any] = {**head, "choices": [choice], "usage": self.usage}
        if self.azure_style:
            out["prompt_filter_results"] = PROMPT_FILTER
        return out

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=False)

    async def embeddings(self, request: web.Request) -> web.Response:
        rec = await self.record(request)
        body = rec.json or {}
        refused = self.check(request, body)
        if refused is not None:
            return refused
        if self.behaviour.status != 200:
            return self.error_response()
        answer = openai_answer(
            as_inputs(body.get("input")),
            "text-embedding-3-small",
            dimensions=body.get("dimensions"),
            encoding=body.get("encoding_format") or "float",
        )
        return web.json_response(answer)


def _azure_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


class FakeAzure(FakeOpenAIShaped):
    azure_style = True

    def __init__(
        self,
        *,
        api_key: str = "azure-key",
        ad_token: str = "entra-token",
        deployments: tuple[str, ...] = ("gpt4o-prod",),
    ) -> None:
        super().__init__()
        self.api_key = api_key
        self.ad_token = ad_token
        self.deployments = deployments

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/openai/deployments/{deployment}/chat/completions", self.chat),
            web.post("/openai/deployments/{deployment}/completions", self.completions),
            web.post("/openai/v1/chat/completions", self.chat),
            web.post("/openai/v1/completions", self.completions),
            web.post("/openai/deployments/{deployment}/embeddings", self.embeddings),
            web.post("/openai/v1/embeddings", self.embeddings),
        ]

    def check(self, request: web.Request, body: dict[str, Any]) -> web.Response | None:
        v1 = request.path.startswith("/openai/v1/")
        if not v1 and not request.query.get("api-version"):
            return _azure_error(404, "404", "Resource not found")
        bearer = request.headers.get("Authorization", "")
        tokens = {self.ad_token, self.api_key} if v1 else {self.ad_token}
        if (
            request.headers.get("api-key") != self.api_key
            and bearer.removeprefix("Bearer ") not in tokens
        ):
            return _azure_error(
                401,
                "401",
                "Access denied due to invalid subscription key or "
                "wrong API endpoint. Make sure to provide a valid key for an "
                "active subscription and use a correct regional API endpoint "
                "for your resource.",
            )
        deployment = body.get("model") if v1 else request.match_info["deployment"]
        if deployment not in self.deployments:
            return _azure_error(
                404,
                "DeploymentNotFound",
                "The API deployment for this "
                "resource does not exist. If you created the deployment "
                "within the last 5 minutes, please wait a moment and try again.",
            )
        return None


class FakeOpenAIPlatform(FakeOpenAIShaped):
    """OpenAI's own API (`/v1/...`, Bearer key, OpenAI error bodies)."""

    def __init__(
        self, *, api_key: str = "sk-upstream", models: tuple[str, ...] = ("gpt-4o",)
    ) -> None:
        super().__init__()
        self.api_key = api_key
        self.models = models

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/completions", self.completions),
        ]

    def check(self, request: web.Request, body: dict[str, Any]) -> web.Response | None:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response(
                {
                    "error": {
                        "message": "Incorrect API key provided: sk-wr***. You can find your API "
                        "key at https://platform.openai.com/account/api-keys.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_api_key",
                    }
                },
                status=401,
            )
        if body.get("model") not in self.models:
            return web.json_response(
                {
                    "error": {
                        "message": f"The model `{body.get('model')}` does not exist or you do not "
                        "have access to it.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "model_not_found",
                    }
                },
                status=404,
            )
        return None
