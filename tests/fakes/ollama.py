"""A fake Ollama server speaking the native API byte for byte (docs/protocols/ollama.md).

Routes: `GET /`, `GET /api/version`, `GET /api/tags`, `POST /api/chat`, `POST /api/generate`,
`POST /api/embed` (`input` a string or a list of strings, `dimensions`, `truncate`; the
vectors are `tests.fakes.embeddings.fake_vector`, `prompt_eval_count` counts words).
The JSON is written the way Go's encoding/json writes Ollama's structs: compact, fields in
struct order (`done_reason` before `done` on chat, after it on generate), `omitempty`
metrics left out when zero, HTML characters escaped as `\\u003c`, non-ASCII as raw UTF-8,
RFC 3339 timestamps with nanoseconds. Streams are NDJSON (`application/x-ndjson`), one line
per token; tool calls arrive whole in one line with empty content.

What the model "generates" (echo of the last user message or the prompt by default) and
how it fails are set through `behaviour.extra`:
    reply: str              text to generate instead of the echo (split into word tokens)
    thinking: str           sent as `thinking` before the text
    tool_calls: list        [{"name", "arguments": {...}, "id"?}] sent as one line
    done_reason: str | None override ("" and None: field left out)
    no_counts: bool         leave prompt_eval_count / eval_count out (omitempty zero)
    no_done: bool           end the stream cleanly without its `done: true` line
    error_after: int        after this many token lines, write `{"error": ...}` and stop
    error_message: str
`behaviour.status` != 200 answers every generation request with that status and
`behaviour.error_body` (default `{"error":"fake failure"}`); `split_every` and
`drop_after_chunks` apply to streams (see tests/fakes/base.py). Requests are validated the
way Ollama's Go decoder would (content must be a string, tool arguments an object, images
base64, keep_alive a duration) and answered with 400 otherwise.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tests.fakes.base import FakeServer
from tests.fakes.embeddings import FAKE_DIMENSIONS, count_tokens, fake_vector

DEFAULT_MODELS = ("llama3.2:latest", "qwen3:8b")
_DURATION = re.compile(r"[-+]?((\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))+")


def go_json(obj: Any) -> bytes:
    """JSON as Go's encoding/json writes it (compact, HTML-escaped, UTF-8)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text.encode()


def created_at() -> str:
    ns = time.time_ns()
    stamp = datetime.fromtimestamp(ns // 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{ns % 1_000_000_000:09d}Z"


def tokens_of(text: str) -> list[str]:
    """Word tokens that keep their leading whitespace, so they join back to `text`."""
    return re.findall(r"\s*\S+", text) or ([text] if text else [])


def _metrics(prompt_tokens: int, eval_tokens: int, no_counts: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"total_duration": 4883583458, "load_duration": 1334875}
    if prompt_tokens and not no_counts:
        out["prompt_eval_count"] = prompt_tokens
    out["prompt_eval_duration"] = 342546000
    if eval_tokens and not no_counts:
        out["eval_count"] = eval_tokens
    out["eval_duration"] = 4535599000
    return out


class BadRequest(Exception):
    pass


class FakeOllama(FakeServer):
    def __init__(self, models: tuple[str, ...] = DEFAULT_MODELS) -> None:
        super().__init__()
        self.models = list(models)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.root),
            web.get("/api/version", self.version),
            web.get("/api/tags", self.tags),
            web.post("/api/chat", self.chat),
            web.post("/api/generate", self.generate),
            web.post("/api/embed", self.embed),
        ]

    async def embed(self, request: web.Request) -> web.Response:
        """`/api/embed` as routes.go EmbedHandler answers it (`EmbedResponse` field order)."""
        rec = await self.record(request)
        try:
            body = rec.json
        except ValueError as exc:
            return self._error(400, str(exc))
        if not isinstance(body, dict):
            return self._error(400, "missing request body")
        model = body.get("model") or ""
        if self._resolve(model) is None:
            return self._error(404, f'model "{model}" not found, try pulling it first')
        if self.behaviour.status != 200:
            return self.error_response()
        raw = body.get("input")
        if isinstance(raw, str):
            inputs = [raw] if raw else []
        elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            inputs = raw
        elif raw is None:
            inputs = []
        else:
            return self._error(400, "invalid input type")
        keep_alive = body.get("keep_alive")
        if isinstance(keep_alive, str) and not _DURATION.fullmatch(keep_alive):
            return self._error(400, f'time: invalid duration "{keep_alive}"')
        if "truncate" in body and not isinstance(body["truncate"], bool):
            return self._error(400, "json: cannot unmarshal into Go struct field .truncate")
        dims = body.get("dimensions") or FAKE_DIMENSIONS
        vectors = [fake_vector(text, dims) for text in inputs]
        answer: dict[str, Any] = {
            "model": model,
            "embeddings": vectors,
            "total_duration": 14143917,
            "load_duration": 1019500,
        }
        tokens = sum(count_tokens(text) for text in inputs)
        if tokens:
            answer["prompt_eval_count"] = tokens
        return self._json(answer)

    # -- simple endpoints -----------------------------------------------------------------
    async def root(self, request: web.Request) -> web.Response:
        await self.record(request)
        return web.Response(text="Ollama is running")

    async def version(self, request: web.Request) -> web.Response:
        await self.record(request)
        return self._json({"version": "0.12.6"})

    async def tags(self, request: web.Request) -> web.Response:
        await self.record(request)
        if self.behaviour.status != 200:
            return self.error_response()
        models = [
            {
                "name": name,
                "model": name,
                "modified_at": "2025-06-01T10:00:00.123456789Z",
                "size": 2019393189,
                "digest": f"{i:x}" * 64,
                "details": {
                    "parent_model": "",
                    "format": "gguf",
                    "family": "llama",
                    "families": ["llama"],
                    "parameter_size": "3.2B",
                    "quantization_level": "Q4_K_M",
                },
            }
            for i, name in enumerate(self.models, start=10)
        ]
        return self._json({"models": models})

    def _json(self, obj: Any, status: int = 200) -> web.Response:
        return web.Response(
            status=status, body=go_json(obj), content_type="application/json", charset="utf-8"
        )

    def _error(self, status: int, message: str) -> web.Response:
        return self._json({"error": message}, status)

    # -- generation -----------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, chat=True)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, chat=False)

    async def _generation(self, request: web.Request, chat: bool) -> web.StreamResponse:
        rec = await self.record(request)
        b = self.behaviour
        try:
            body = rec.json
        except ValueError as exc:
            return self._error(400, str(exc))
        if not isinstance(body, dict):
            return self._error(400, "missing request body")
        model = body.get("model") or ""
        if self._resolve(model) is None:
            return self._error(404, f'model "{model}" not found, try pulling it first')
        try:
            source = self._validate(body, chat)
        except BadRequest as exc:
            return self._error(400, str(exc))
        if b.status != 200:
            return self.error_response()
        lines = self._answer(body, chat, source)
        stream = body.get("stream", True)
        if lines[-1].startswith(b'{"error"') and (len(lines) == 1 or not stream):
            # Nothing written yet: Ollama sends the error as a plain HTTP error.
            return self._json(json.loads(lines[-1]), 500)
        if stream:
            return await self.write_stream(request, lines, "application/x-ndjson")
        return self._json(self._merge(lines, chat))

    def _resolve(self, model: str) -> str | None:
        name = model if ":" in model else model + ":latest"
        return name if name in self.models else None

    def _validate(self, body: dict[str, Any], chat: bool) -> str:
        """Check the body as Ollama's decoder would; return the text to echo."""
        keep_alive = body.get("keep_alive")
        if isinstance(keep_alive, str) and not _DURATION.fullmatch(keep_alive):
            raise BadRequest(f'time: invalid duration "{keep_alive}"')
        options = body.get("options", {})
        if not isinstance(options, dict):
            raise BadRequest("json: cannot unmarshal options")
        if "stop" in options and not isinstance(options["stop"], list):
            raise BadRequest('option "stop" must be of type array')
        if not chat:
            if body.get("raw") and (body.get("system") or body.get("template")):
                raise BadRequest("raw mode does not support template, system, or context")
            prompt = body.get("prompt", "")
            if not isinstance(prompt, str):
                raise BadRequest(
                    "json: cannot unmarshal into Go struct field .prompt of type string"
                )
            return prompt
        echo = ""
        for i, msg in enumerate(body.get("messages") or ()):
            if not isinstance(msg.get("content", ""), str):
                raise BadRequest(
                    "json: cannot unmarshal array into Go struct field Message.messages.content "
                    "of type string"
                )
            for image in msg.get("images") or ():
                try:
                    base64.b64decode(image, validate=True)
                except (binascii.Error, ValueError):
                    raise BadRequest(f"illegal base64 data in messages[{i}].images") from None
            for call in msg.get("tool_calls") or ():
                if not isinstance((call.get("function") or {}).get("arguments"), dict):
                    raise BadRequest(
                        "json: cannot unmarshal string into Go struct field "
                        "ToolCallFunction.messages.tool_calls.function.arguments of type "
                        "api.ToolCallFunctionArguments"
                    )
            if msg.get("role") == "user":
                echo = msg.get("content", "")
        return echo

    def _answer(self, body: dict[str, Any], chat: bool, source: str) -> list[bytes]:
        """The NDJSON lines of the answer (the whole stream, final line included)."""
        extra = self.behaviour.extra
        options = body.get("options") or {}
        model = body["model"]
        tokens = tokens_of(extra.get("reply", source))
        reason = "stop"
        limit = options.get("num_predict", -1)
        if isinstance(limit, int) and limit >= 0 and len(tokens) > limit:
            tokens, reason = tokens[:limit], "length"
        stops = [s for s in options.get("stop") or () if s]
        if stops:
            text, kept = "", []
            for tok in tokens:
                text += tok
                cut = min((p for p in (text.find(s) for s in stops) if p >= 0), default=-1)
                if cut >= 0:
                    kept.append(tok[: len(tok) - (len(text) - cut)])
                    reason = "stop"
                    break
                kept.append(tok)
            tokens = [t for t in kept if t]
        if "done_reason" in extra:
            reason = extra["done_reason"]
        prompt_tokens = len(tokens_of(json.dumps(body.get("messages") or body.get("prompt"))))

        def line(text: str = "", **fields: Any) -> dict[str, Any]:
            obj: dict[str, Any] = {"model": model, "created_at": created_at()}
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                for key in ("thinking", "tool_calls"):
                    if key in fields:
                        message[key] = fields.pop(key)
                obj["message"] = message
            else:
                obj["response"] = text
                if "thinking" in fields:
                    obj["thinking"] = fields.pop("thinking")
            obj.update(fields)
            return obj

        out: list[bytes] = []
        if extra.get("thinking"):
            out.append(go_json({**line(thinking=extra["thinking"]), "done": False}) + b"\n")
        for n, tok in enumerate(tokens):
            if extra.get("error_after") == n:
                message = extra.get(
                    "error_message", "an error was encountered while running the model"
                )
                return [*out, go_json({"error": message}) + b"\n"]
            out.append(go_json({**line(tok), "done": False}) + b"\n")
        calls = extra.get("tool_calls")
        if calls:
            wire = []
            for k, call in enumerate(calls):
                fn = {"index": k, "name": call["name"], "arguments": call.get("arguments", {})}
                wire.append(
                    {"id": call["id"], "function": fn} if call.get("id") else {"function": fn}
                )
            out.append(go_json({**line(tool_calls=wire), "done": False}) + b"\n")
        metrics = _metrics(
            prompt_tokens, len(tokens) + len(calls or ()), extra.get("no_counts", False)
        )
        final = line()
        if chat:
            if reason:
                final["done_reason"] = reason
            final["done"] = True
        else:
            final["done"] = True
            if reason:
                final["done_reason"] = reason
        final.update(metrics)
        if not extra.get("no_done"):
            out.append(go_json(final) + b"\n")
        return out

    @staticmethod
    def _merge(lines: list[bytes], chat: bool) -> dict[str, Any]:
        """The `stream: false` answer: the streamed lines folded into one object."""
        objs = [json.loads(x) for x in lines]
        final = objs[-1]
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": ""}
            for obj in objs:
                part = obj["message"]
                message["content"] += part.get("content", "")
                if part.get("thinking"):
                    message["thinking"] = message.get("thinking", "") + part["thinking"]
                if part.get("tool_calls"):
                    message.setdefault("tool_calls", []).extend(part["tool_calls"])
            final["message"] = message
        else:
            head = {k: final.pop(k) for k in ("model", "created_at", "response")}
            head["response"] = "".join(obj.get("response", "") for obj in objs)
            thinking = "".join(obj.get("thinking", "") for obj in objs)
            if thinking:
                head["thinking"] = thinking
            final = {**head, **final}
        return final
