"""A fake llama.cpp `llama-server` speaking its native API, byte for byte.

Serves `POST /completion`, `GET /health`, `GET /props` and `POST /apply-template` as
described in docs/protocols/llamacpp.md (and as llama-server writes them: compact JSON, raw
UTF-8). `/props` reports `chat_template` (None: left out, like builds before it) with
`bos_token`/`eos_token`; `/apply-template` renders `{"messages"}` with it into
`{"prompt"}` as llama-server's chat layer does: a Jinja template with `trim_blocks` and
`lstrip_blocks`, the leading BOS removed (the server adds it when tokenizing), a trailing
assistant message appended to the rendering of the others (prefill); the built-in name
"llama3" (given with `--chat-template llama3`) in llama.cpp's own format.
`apply_template_route = False` answers 404 like builds before that endpoint.
The generation is scripted with `tokens` (one string per token); the fake applies
`n_predict` (stop_type `limit`), the request's `stop` list (`word`, the stop string left
out of `content`) and otherwise ends with `eos`. Streams are `data: {...}\\n\\n` events,
the last one with `"stop": true`, then the connection closes (no `[DONE]`).

Knobs: `dialect` "stop_type" (builds since Dec 2024) or "booleans" (older builds:
`stopped_eos`/`stopped_word`/`stopped_limit`, no `stop_type`, no `tokens_*` in partials);
`stream_error` "data" (`data: {"error": {...}}`) or "legacy" (an `error: {...}` line, as
builds before Sept 2025 wrote) after `stream_error_after` tokens; `n_ctx` (a longer prompt
gets HTTP 400 `exceed_context_size_error`); `loading` (503 everywhere, like a server still
loading its model). `behaviour.status` answers every /completion with that status and
llama.cpp's error envelope. Split/drop/delay come from the `Behaviour` harness.

`POST /embedding` (and `/embeddings`) take `content` as llama-server's
`tokenize_input_prompts` does (a text, token ids, or a list of them) and answer
`[{"index", "embedding": [[...]]}]` (`embedding_dialect` "current"), `{"embedding": [...]}`
for a single content ("legacy", builds before Dec 2024; a list is a 500 there), or one
vector per token ("pooling_none"); `embeddings_enabled` False answers 501 as a server
started without `--embeddings` does.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import jinja2
from aiohttp import web
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tests.fakes.base import FakeServer
from tests.fakes.embeddings import fake_vector

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    500: "server_error",
    501: "not_supported_error",
    503: "unavailable_error",
}

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


_ENV.globals["raise_exception"] = _raise


def dumps(obj: Any) -> bytes:
    """JSON as llama-server writes it (nlohmann `dump(-1)`): compact, UTF-8 unescaped."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def error_body(status: int, message: str, type_: str | None = None, **extra: Any) -> bytes:
    err = {"code": status, "message": message, "type": type_ or _ERROR_TYPES.get(status, "")}
    return dumps({"error": {**err, **extra}})


def _partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    for k in range(min(len(text), max((len(s) for s in stops), default=0)), 0, -1):
        if any(s.startswith(text[-k:]) and s != text[-k:] for s in stops):
            return k
    return 0


class FakeLlamaCpp(FakeServer):
    def __init__(self) -> None:
        super().__init__()
        self._defaults()

    def reset(self) -> None:
        """Forget recorded requests and restore every knob (the server keeps running)."""
        super().reset()
        self._defaults()

    def _defaults(self) -> None:
        self.tokens: list[str] = ["Hello", ",", " wor", "ld", "!", " Bye", "."]
        self.dialect = "stop_type"
        self.stream_error: str | None = None
        self.stream_error_after = 2
        self.n_ctx = 4096
        self.loading = False
        self.alias = "fake-model.gguf"
        self.chat_template: str | None = CHATML
        self.bos_token = "<s>"
        self.eos_token = "</s>"
        self.embedding_dialect = "current"
        self.embeddings_enabled = True
        self.apply_template_route = True

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/completion", self.completion),
            web.post("/embedding", self.embedding),
            web.post("/embeddings", self.embedding),
            web.get("/health", self.health),
            web.get("/props", self.props),
            web.post("/apply-template", self.apply_template),
        ]

    # -- endpoints -----------------------------------------------------------------------
    def _json(self, body: bytes, status: int = 200) -> web.Response:
        return web.Response(
            status=status, body=body, headers={"Content-Type": "application/json; charset=utf-8"}
        )

    def _loading(self) -> web.Response:
        return self._json(error_body(503, "Loading model"), 503)

    async def health(self, request: web.Request) -> web.Response:
        await self.record(request)
        return self._loading() if self.loading else self._json(dumps({"status": "ok"}))

    async def props(self, request: web.Request) -> web.Response:
        await self.record(request)
        if self.loading:
            return self._loading()
        data: dict[str, Any] = {
            "default_generation_settings": {"n_ctx": self.n_ctx, "params": {}},
            "total_slots": 1,
            "model_path": self.alias,
            "modalities": {"vision": False, "audio": False},
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "build_info": "b0-fake",
        }
        if self.chat_template is not None:
            data["chat_template"] = self.chat_template
        return self._json(dumps(data))

    async def apply_template(self, request: web.Request) -> web.Response:
        rec = await self.record(request)
        if not self.apply_template_route:
            return self._json(error_body(404, "File Not Found"), 404)
        if self.loading:
            return self._loading()
        messages = (rec.json or {}).get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return self._json(error_body(400, "'messages' must be a list of messages"), 400)
        messages = [{**m, "content": m.get("content") or ""} for m in messages]
        prefill = ""
        if messages and messages[-1].get("role") == "assistant":
            *messages, last = messages
            prefill = last["content"]
        try:
            prompt = self.render(messages) + prefill
        except jinja2.TemplateError as exc:
            return self._json(error_body(500, str(exc)), 500)
        return self._json(dumps({"prompt": prompt}))

    def render(self, messages: list[dict[str, Any]]) -> str:
        template = self.chat_template or ""
        if template == "llama3":  # llama.cpp's built-in LLM_CHAT_TEMPLATE_LLAMA_3
            turns = "".join(
                f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
                f"{m['content'].strip()}<|eot_id|>"
                for m in messages
            )
            return turns + "<|start_header_id|>assistant<|end_header_id|>\n\n"
        if "{{" not in template and "{%" not in template:
            raise jinja2.TemplateError(f"this custom template is not supported: {template}")
        text = _ENV.from_string(template).render(
            messages=messages,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            add_generation_prompt=True,
        )
        return text[len(self.bos_token) :] if text.startswith(self.bos_token) else text

    async def embedding(self, request: web.Request) -> web.Response:
        rec = await self.record(request)
        if self.loading:
            return self._loading()
        if not self.embeddings_enabled:
            message = "This server does not support embeddings. Start it with `--embeddings`"
            return self._json(error_body(501, message), 501)
        status = self.behaviour.status
        if status != 200:
            return self._json(error_body(status, "fake failure"), status)
        body = rec.json or {}
        content = body.get("content", body.get("input"))
        if content is None:
            return self._json(error_body(400, '"input" or "content" must be provided'), 400)
        single = isinstance(content, str) or (
            isinstance(content, list) and bool(content) and isinstance(content[0], int)
        )
        prompts = [content] if single else list(content)
        if self.embedding_dialect == "legacy":
            if not single:
                return self._json(error_body(500, "[json.exception.type_error.302]"), 500)
            return self._json(dumps({"embedding": fake_vector(content)}))
        results = []
        for i, prompt in enumerate(prompts):
            if not prompt:
                return self._json(error_body(400, "Input content cannot be empty"), 400)
            rows = [fake_vector(prompt)]
            if self.embedding_dialect == "pooling_none":
                rows = [fake_vector(f"{prompt}#{k}") for k in range(3)]
            results.append({"index": i, "embedding": rows})
        return self._json(dumps(results))

    async def completion(self, request: web.Request) -> web.StreamResponse:
        rec = await self.record(request)
        b = self.behaviour
        if self.loading:
            return self._loading()
        if b.status != 200:
            if b.error_body is not None:
                return self.error_response()
            return self._json(error_body(b.status, "fake failure"), b.status)
        body = rec.json
        prompt = body.get("prompt", "")
        n_prompt = len(prompt) if isinstance(prompt, list) else len(prompt.split()) + 1
        if n_prompt > self.n_ctx:
            return self._json(
                error_body(
                    400,
                    "the request exceeds the available context size, try increasing it",
                    "exceed_context_size_error",
                    n_prompt_tokens=n_prompt,
                    n_ctx=self.n_ctx,
                ),
                400,
            )
        pieces, final = self._generate(body, n_prompt)
        if body.get("stream"):
            events = [b"data: " + dumps(p) + b"\n\n" for p in pieces]
            if self.stream_error:
                err = {"code": 500, "message": "fake generation failure", "type": "server_error"}
                line = (
                    b"error: " + dumps(err)
                    if self.stream_error == "legacy"
                    else b"data: " + dumps({"error": err})
                )
                events = [*events[: self.stream_error_after], line + b"\n\n"]
            else:
                events.append(b"data: " + dumps(final) + b"\n\n")
            return await self.write_stream(request, events, "text/event-stream")
        if b.delay_first_byte:
            await asyncio.sleep(b.delay_first_byte)
        return self._json(dumps(final))

    # -- the scripted generation -----------------------------------------------------------
    def _generate(
        self, body: dict[str, Any], n_prompt: int
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        n_predict = body.get("n_predict", body.get("max_tokens", -1))
        stops = body.get("stop") if isinstance(body.get("stop"), list) else []
        n_probs = int(body.get("n_probs") or 0)
        stream = bool(body.get("stream"))
        text, sent, decoded, stop_type, word = "", 0, 0, "eos", ""
        partials: list[dict[str, Any]] = []
        probs: list[dict[str, Any]] = []
        for i, token in enumerate(self.tokens):
            if n_predict is not None and 0 <= n_predict <= decoded:
                stop_type = "limit"
                break
            decoded += 1
            text += token
            hit = next((s for s in stops if s in text), None)
            if hit:
                text, stop_type, word = text[: text.index(hit)], "word", hit
            # Like llama-server, hold back a tail that may still become a stop string.
            last = hit or i == len(self.tokens) - 1
            hold = 0 if last else _partial_stop(text[sent:], stops)
            prob = self._prob(i, token, n_probs) if n_probs else None
            if prob:
                probs.append(prob)
            partials.append(self._partial(text[sent : len(text) - hold], decoded, n_prompt, prob))
            sent = len(text) - hold
            if hit:
                break
        else:
            if n_predict is not None and 0 <= n_predict <= decoded:
                stop_type = "limit"  # llama.cpp checks the budget before seeing EOS
        final = self._final(body, text, stream, decoded, n_prompt, stop_type, word)
        if probs and not stream:
            final["completion_probabilities"] = probs
        return partials, final

    @staticmethod
    def _prob(i: int, token: str, n: int) -> dict[str, Any]:
        top = [
            {
                "id": 100 + i * 10 + k,
                "token": token if k == 0 else f"alt{k}",
                "bytes": list((token if k == 0 else f"alt{k}").encode()),
                "logprob": math.log(0.5 / (k + 1)),
            }
            for k in range(n)
        ]
        return {
            "id": 100 + i * 10,
            "token": token,
            "bytes": list(token.encode()),
            "logprob": math.log(0.5),
            "top_logprobs": top,
        }

    def _partial(
        self, content: str, decoded: int, n_prompt: int, prob: dict[str, Any] | None
    ) -> dict[str, Any]:
        if self.dialect == "booleans":
            event: dict[str, Any] = {
                "content": content,
                "stop": False,
                "id_slot": 0,
                "multimodal": False,
                "index": 0,
            }
        else:
            event = {
                "index": 0,
                "content": content,
                "tokens": [],
                "stop": False,
                "id_slot": -1,
                "tokens_predicted": decoded,
                "tokens_evaluated": n_prompt,
            }
        if prob:
            event["completion_probabilities"] = [prob]
        return event

    def _final(
        self,
        body: dict[str, Any],
        text: str,
        stream: bool,
        decoded: int,
        n_prompt: int,
        stop_type: str,
        word: str,
    ) -> dict[str, Any]:
        settings = {
            "n_predict": body.get("n_predict", -1),
            "temperature": body.get("temperature", 0.8),
            "top_k": body.get("top_k", 40),
            "seed": body.get("seed", 4294967295),
            "stop": body.get("stop", []),
        }
        timings = {
            "cache_n": 0,
            "prompt_n": n_prompt,
            "prompt_ms": 1.5,
            "prompt_per_token_ms": 0.1,
            "prompt_per_second": 1000.0,
            "predicted_n": decoded,
            "predicted_ms": 2.5,
            "predicted_per_token_ms": 0.2,
            "predicted_per_second": 500.0,
        }
        final: dict[str, Any] = {
            "index": 0,
            "content": "" if stream else text,
            "tokens": [],
            "id_slot": 0,
            "stop": True,
            "model": self.alias,
            "tokens_predicted": decoded,
            "tokens_evaluated": n_prompt,
            "generation_settings": settings,
            "prompt": body.get("prompt"),
            "has_new_line": "\n" in text,
            "truncated": False,
        }
        if self.dialect == "booleans":
            final.update(
                stopped_eos=stop_type == "eos",
                stopped_word=stop_type == "word",
                stopped_limit=stop_type == "limit",
            )
        else:
            final["stop_type"] = stop_type
        final.update(stopping_word=word, tokens_cached=n_prompt + decoded, timings=timings)
        return final
