"""A fake Replicate API on a real socket: predictions created, polled, streamed, cancelled.

Routes (under `/v1`, as the official client calls them):

- `POST /v1/models/{owner}/{name}/predictions`, `POST /v1/deployments/{owner}/{name}/predictions`,
  `POST /v1/predictions` (with `version`): 201 with the prediction (`status: starting`), or,
  with `Prefer: wait`, the finished prediction when `wait_completes`.
- `GET /v1/predictions/{id}`: each poll advances the prediction; after `polls_to_finish`
  polls it is terminal (partial `output` lists before that).
- `POST /v1/predictions/{id}/cancel`: recorded in `cancelled`; status becomes canceled.
- `GET /stream/v1/predictions/{id}` (the `urls.stream` given out when the create asked for
  `stream: true` and `streaming` is on): SSE with `event:`/`id:`/`data:` lines, `output`
  events in plain text (multi-line tokens as several `data:` lines), a `logs` event, a
  keep-alive comment, then `done` (`{}` or `{"reason": ...}`), or `error` then `done`.

Errors use Replicate's problem-details body (`{"title", "detail", "status"}`): 401 without
the right `Authorization: Bearer` token, 404 for an unknown model or version, 422 when an
input field is not in the model's input schema (`schema`).

The output is `reply` (one item per token), cut by `max_tokens`/`max_new_tokens` and by
`stop_sequences` (a comma-separated string). `fail_with` makes the prediction fail after
`fail_after` tokens. `metrics` carry token counts when `report_tokens` is on.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

from aiohttp import web

from tests.fakes.base import FakeServer

LLAMA3 = "meta/meta-llama-3-8b-instruct"
LLAMA2 = "meta/llama-2-70b-chat"
LLAMA3_VERSION = "5a6809ca6288247d06daf6365557e5e429063f32a21146b2a807c682652136b8"
LLAMA2_VERSION = "2d19859030ff705a87c746f7e96eea03aefb71f166725aee39692f1476566d48"
LLAMA3_INPUTS = frozenset({
    "prompt", "system_prompt", "max_tokens", "min_tokens", "temperature", "top_p", "top_k",
    "presence_penalty", "frequency_penalty", "stop_sequences", "prompt_template", "seed",
    "messages",
})  # fmt: skip
LLAMA2_INPUTS = frozenset({
    "prompt", "system_prompt", "max_new_tokens", "min_new_tokens", "temperature", "top_p",
    "top_k", "repetition_penalty", "stop_sequences", "seed",
})  # fmt: skip
TERMINAL = ("succeeded", "failed", "canceled")


def _problem(status: int, title: str, detail: str) -> web.Response:
    return web.json_response({"title": title, "detail": detail, "status": status},
                             status=status)  # fmt: skip


def _sse(event: str, data: str, event_id: str) -> bytes:
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"event: {event}\nid: {event_id}\n{lines}\n".encode()


class FakeReplicate(FakeServer):
    def __init__(self, token: str = "r8_test") -> None:
        super().__init__()
        self.token = token
        self.models = {LLAMA3: (LLAMA3_VERSION, LLAMA3_INPUTS),
                       LLAMA2: (LLAMA2_VERSION, LLAMA2_INPUTS)}  # fmt: skip
        self.deployments = {"acme/prod-llm": LLAMA3}
        self._ids = itertools.count(1)
        self._script_defaults()

    def reset(self) -> None:
        super().reset()
        self._script_defaults()

    def _script_defaults(self) -> None:
        self.reply: list[str] = ["Hello", " world", ",", " how", " are", " you", "?"]
        self.streaming = True  # hand out urls.stream when asked
        self.polls_to_finish = 2
        self.wait_completes = True
        self.fail_with: str | None = None
        self.fail_after = 2
        self.report_tokens = True
        self.output_as_string = False
        self.done_reason: str | None = None  # e.g. "canceled" on the SSE done event
        self.predictions: dict[str, dict[str, Any]] = {}
        self.cancelled: list[str] = []
        self.url_origin: str | None = None  # the origin of the urls handed out (default: ours)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/models/{owner}/{name}/predictions", self.create_for_model),
            web.post("/v1/deployments/{owner}/{name}/predictions", self.create_for_deployment),
            web.post("/v1/predictions", self.create_for_version),
            web.get("/v1/predictions/{id}", self.get),
            web.post("/v1/predictions/{id}/cancel", self.cancel),
            web.get("/stream/v1/predictions/{id}", self.stream),
        ]

    # -- helpers ----------------------------------------------------------------------
    def _unauthorized(self, request: web.Request) -> web.Response | None:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _problem(401, "Unauthenticated",
                            "You did not pass a valid authentication token")  # fmt: skip
        return None

    def _plan(self, inp: dict[str, Any]) -> list[str]:
        limit = inp.get("max_tokens") or inp.get("max_new_tokens")
        stops = [s for s in str(inp.get("stop_sequences") or "").split(",") if s]
        out: list[str] = []
        text = ""
        for piece in self.reply:
            if limit is not None and len(out) >= limit:
                break
            if any(s in text + piece for s in stops):
                break
            out.append(piece)
            text += piece
        return out

    def public(self, p: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in p.items() if not k.startswith("_")}

    def _finish(self, p: dict[str, Any]) -> None:
        if p["status"] in TERMINAL:
            return
        tokens = p["_tokens"]
        if self.fail_with:
            p.update(status="failed", error=self.fail_with, output=tokens[: self.fail_after])
        else:
            p.update(status="succeeded",
                     output="".join(tokens) if self.output_as_string else list(tokens))  # fmt: skip
        p["completed_at"] = "2025-01-01T00:00:02.000000Z"
        if self.report_tokens and not self.fail_with:
            prompt = str(p["input"].get("prompt") or "")
            p["metrics"] = {"predict_time": 0.42, "input_token_count": len(prompt.split()),
                            "output_token_count": len(tokens)}  # fmt: skip

    # -- routes -----------------------------------------------------------------------
    async def create_for_model(self, request: web.Request) -> web.Response:
        ref = f"{request.match_info['owner']}/{request.match_info['name']}"
        return await self._create(request, ref)

    async def create_for_deployment(self, request: web.Request) -> web.Response:
        ref = f"{request.match_info['owner']}/{request.match_info['name']}"
        return await self._create(request, self.deployments.get(ref, "?"))

    async def create_for_version(self, request: web.Request) -> web.Response:
        return await self._create(request, None)

    async def _create(self, request: web.Request, model: str | None) -> web.Response:
        rec = await self.record(request)
        refused = self._unauthorized(request)
        if refused is not None:
            return refused
        if self.behaviour.status != 200:
            return self.error_response()
        body = rec.json or {}
        if model is None:
            found = [m for m, (v, _) in self.models.items() if v == body.get("version")]
            model = found[0] if found else "?"
        if model not in self.models:
            return _problem(404, "Not found", "The requested resource could not be found.")
        version, schema = self.models[model]
        inp = body.get("input") or {}
        extra = sorted(set(inp) - schema)
        if extra:
            return _problem(422, "Input validation failed",
                            f"- input: Additional property {extra[0]} is not allowed")  # fmt: skip
        pid = f"fakepred{next(self._ids):04d}"
        origin = self.url_origin or self.url
        base = f"{origin}/v1/predictions/{pid}"
        urls = {"get": base, "cancel": base + "/cancel", "web": f"https://replicate.com/p/{pid}"}
        if body.get("stream") and self.streaming:
            urls["stream"] = f"{origin}/stream/v1/predictions/{pid}"
        p = {"id": pid, "model": model, "version": version, "input": inp, "logs": "",
             "output": None, "error": None, "status": "starting", "data_removed": False,
             "created_at": "2025-01-01T00:00:00.000000Z", "started_at": None,
             "completed_at": None, "metrics": {}, "urls": urls,
             "_tokens": self._plan(inp), "_polls": 0}  # fmt: skip
        self.predictions[pid] = p
        if request.headers.get("Prefer", "").startswith("wait") and self.wait_completes:
            self._finish(p)
        return web.json_response(self.public(p), status=201)

    async def get(self, request: web.Request) -> web.Response:
        await self.record(request)
        refused = self._unauthorized(request)
        if refused is not None:
            return refused
        p = self.predictions.get(request.match_info["id"])
        if p is None:
            return _problem(404, "Not found", "The requested resource could not be found.")
        if p["status"] not in TERMINAL:
            p["_polls"] += 1
            if p["_polls"] >= self.polls_to_finish:
                self._finish(p)
            else:
                shown = len(p["_tokens"]) * p["_polls"] // self.polls_to_finish
                p.update(status="processing", output=p["_tokens"][:shown])
        return web.json_response(self.public(p))

    async def cancel(self, request: web.Request) -> web.Response:
        await self.record(request)
        p = self.predictions.get(request.match_info["id"])
        if p is None:
            return _problem(404, "Not found", "The requested resource could not be found.")
        self.cancelled.append(p["id"])
        if p["status"] not in TERMINAL:
            p["status"] = "canceled"
        return web.json_response(self.public(p))

    async def stream(self, request: web.Request) -> web.StreamResponse:
        await self.record(request)
        refused = self._unauthorized(request)
        if refused is not None:
            return refused
        p = self.predictions[request.match_info["id"]]
        ts = int(time.time())
        seq = itertools.count()
        pieces = [b": keep-alive\n\n", _sse("logs", "Loading model...", f"{ts}:{next(seq)}")]
        tokens = p["_tokens"][: self.fail_after] if self.fail_with else p["_tokens"]
        pieces += [_sse("output", tok, f"{ts}:{next(seq)}") for tok in tokens]
        if self.fail_with:
            pieces.append(_sse("error", json.dumps({"detail": self.fail_with}),
                               f"{ts}:{next(seq)}"))  # fmt: skip
            done = {"reason": "error"}
        else:
            done = {"reason": self.done_reason} if self.done_reason else {}
        pieces.append(_sse("done", json.dumps(done), f"{ts}:{next(seq)}"))
        # The client may fetch the prediction as soon as it reads `done`: the next poll
        # finishes it (a cancel before that, on a disconnect, cancels it instead).
        p["status"] = "canceled" if self.done_reason == "canceled" else "processing"
        p["_polls"] = max(p["_polls"], self.polls_to_finish - 1)
        try:
            resp = await self.write_stream(request, pieces, "text/event-stream")
        except ConnectionResetError:
            # Clients hang up as soon as they read `done` (the official one does): a closed
            # connection here is normal, not a server error to log.
            raise asyncio.CancelledError from None
        if self.behaviour.drop_after_chunks is None:
            self._finish(p)
        return resp
