"""OpenAI-compatible upstreams: vLLM, OpenAI, TGI's Messages API, llama.cpp's and Ollama's /v1.

The client's body is relayed as it came (every OpenAI field and every extra), with `model`
rewritten to the entry's `upstream_model`, the entry's `params:` defaults filled in, and the
stream options set for what the client asked: `stream_options` is only sent on streaming
requests (vLLM rejects it otherwise), with `include_usage` when the client wants usage.

The upstream's SSE stream is decoded incrementally and every chunk is turned into events as
soon as it arrives. Upstream quirks handled here: empty `choices` chunks (Azure's prompt
filter results), `finish_reason: "stop_sequence"` (TGI), `reasoning_content`, flat vLLM
error objects, and error events in the middle of a stream.

Other adapters for OpenAI-shaped services (Azure) subclass `OpenAICompatBackend` and
override `endpoint` / `upstream_headers` instead of copying the stream handling.

`/v1/responses` requests, with `responses_api: native`: the client's Responses body (see
`ResponsesCall.native_body`: the stored conversation spelled out, `store: false`) goes to
`POST {url}/responses` with `model` rewritten and the entry's `params:` in the Responses
API's names; its answer (a `response` object or the typed event stream) is read by
`backends.responses_events` into the same events as a chat answer. Without the setting,
or for another adapter, such a request is the chat request it also carries.

Embeddings (`mode: embeddings` or `both`): `POST {url}/embeddings` with the client's body
(its extras too), `input` set to one batch and `encoding_format` left out, so the upstream
answers floats (the OpenAI layer encodes base64 itself).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal

import orjson
from pydantic import Field

from inferbridge.backends.base import OPENAI_PARAMS, Backend
from inferbridge.backends.embedding import openai_embeddings
from inferbridge.backends.http import (
    HttpUpstream,
    ItemParser,
    error_message,
    load_json,
    status_error,
)
from inferbridge.backends.responses_events import ResponsesStreamParser, response_object_events
from inferbridge.backends.urls import join_url
from inferbridge.config import DeploymentConfig
from inferbridge.decoders import ServerSentEvent, SSEDecoder
from inferbridge.errors import UpstreamError
from inferbridge.events import (
    Embeddings,
    Event,
    Finish,
    ReasoningDelta,
    SystemFingerprint,
    TextDelta,
    ToolCallDelta,
    Usage,
    normalize_finish,
)
from inferbridge.request import InferenceRequest

# The entry's `params:` on a native Responses request: a chat parameter goes in the
# Responses API's name for it (a path into the body), or is left out when that API has
# none (`stop`, `seed`, `n`...); a field that is no OpenAI parameter (`top_k`) goes as it is.
RESPONSES_PARAMS: dict[str, tuple[str, ...]] = {
    "max_tokens": ("max_output_tokens",),
    "max_completion_tokens": ("max_output_tokens",),
    "reasoning_effort": ("reasoning", "effort"),
    "verbosity": ("text", "verbosity"),
    **{
        key: (key,)
        for key in (
            "temperature",
            "top_p",
            "top_logprobs",
            "parallel_tool_calls",
            "user",
            "metadata",
            "service_tier",
            "safety_identifier",
            "prompt_cache_key",
        )
    },
}


class OpenAICompatSettings(DeploymentConfig):
    url: str  # type: ignore[assignment]  # required: the base URL ending in /v1
    organization: str | None = None
    project: str | None = None
    quirks: Literal["tgi"] | None = Field(
        default=None,
        description="Adapt to a server's known deviations; 'tgi' (TGI's Messages API, the "
        "default when upstream_model is 'tgi'): top_p >= 1 is omitted, logit_bias is "
        "unsupported.",
    )

    responses_api: Literal["chat", "native"] = Field(
        default="chat",
        description="How /v1/responses requests reach this upstream: 'chat' (translated "
        "into a chat request, the default) or 'native' (passed through to the upstream's "
        "own POST {url}/responses).",
    )


class OpenAISettings(OpenAICompatSettings):
    url: str = "https://api.openai.com/v1"


def usage_event(usage: dict[str, Any]) -> Usage:
    details = {k: v for k, v in usage.items() if k.endswith("_details") and isinstance(v, dict)}
    return Usage(
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
        details or None,
    )


def _tool_call_events(calls: list[dict[str, Any]], index: int, out: list[Event]) -> None:
    for pos, call in enumerate(calls):
        fn = call.get("function") or {}
        out.append(
            ToolCallDelta(
                call.get("index", pos),
                id=call.get("id"),
                name=fn.get("name"),
                arguments=fn.get("arguments") or "",
                index=index,
            )
        )


def matched_stop(choice: dict[str, Any], reason: str | None) -> str | None:
    """The stop string that ended a choice, when the server says: vLLM's `stop_reason` (a
    stop string; a token id is not one), `""` for TGI's `finish_reason: "stop_sequence"`
    (a stop string did, not which)."""
    matched = choice.get("stop_reason")
    if isinstance(matched, str) and matched:
        return matched
    return "" if reason == "stop_sequence" else None


def _events(data: dict[str, Any], chat: bool, whole: bool) -> list[Event]:
    """Events of one OpenAI object: a stream chunk (`delta`s, finish only when given) or a
    whole response (`message`s, every choice finished)."""
    out: list[Event] = []
    part = "message" if whole else "delta"
    for choice in data.get("choices") or ():
        index = choice.get("index") or 0
        if chat:
            body = choice.get(part) or {}
            reasoning = body.get("reasoning_content") or body.get("reasoning")
            if reasoning:
                out.append(ReasoningDelta(reasoning, index))
            text = body.get("content")
            calls = body.get("tool_calls")
        else:
            text = choice.get("text")
            calls = None
        if text or choice.get("logprobs"):
            out.append(TextDelta(text or "", index, choice.get("logprobs")))
        if calls:
            _tool_call_events(calls, index, out)
        reason = choice.get("finish_reason")
        if reason or whole:
            out.append(Finish(normalize_finish(reason), index, matched_stop(choice, reason)))
    usage = data.get("usage")
    if usage:
        out.append(usage_event(usage))
    fingerprint = data.get("system_fingerprint")
    if fingerprint and isinstance(fingerprint, str):
        out.append(SystemFingerprint(fingerprint))
    return out


def chunk_events(chunk: dict[str, Any], chat: bool) -> list[Event]:
    """Events carried by one OpenAI stream chunk (chat.completion.chunk or text_completion)."""
    return _events(chunk, chat, whole=False)


def response_events(data: dict[str, Any], chat: bool) -> list[Event]:
    """Events carried by one whole (non-streamed) OpenAI response."""
    return _events(data, chat, whole=True)


class ChunkParser(ItemParser):
    """An OpenAI SSE stream -> events. `data: [DONE]` ends it; a stream that ends without
    it is whole once a finish reason was seen (some servers omit the marker)."""

    __slots__ = ("backend", "chat", "saw_finish")

    def __init__(self, backend: OpenAICompatBackend, chat: bool) -> None:
        super().__init__(backend.label, SSEDecoder())
        self.backend = backend
        self.chat = chat
        self.saw_finish = False

    def complete_without_marker(self) -> bool:
        return self.saw_finish

    def take(self, event: ServerSentEvent, batch: list[Event]) -> bool:
        data = event.data
        if data == b"[DONE]":
            return True
        backend = self.backend
        chunk = load_json(backend.label, data)
        if type(chunk) is not dict:
            raise UpstreamError(
                f"{backend.label} sent a stream event that is not a JSON object: {data[:200]!r}",
                backend=backend.label,
            )
        if "error" in chunk or chunk.get("object") == "error":
            backend._raise_if_error(chunk)
        events = _events(chunk, self.chat, whole=False)
        if events:
            batch += events
            if not self.saw_finish:
                self.saw_finish = any(type(e) is Finish for e in events)
        return False


class OpenAICompatBackend(Backend):
    Settings: type[DeploymentConfig] = OpenAICompatSettings
    supported_params = OPENAI_PARAMS
    forwards_extras = True
    native_n = True
    accepts_token_prompts = True
    embedding_params = frozenset({"dimensions", "user"})
    default_embedding_batch_size = 2048  # OpenAI's limit of inputs per request

    def __init__(self, config: DeploymentConfig) -> None:
        super().__init__(config)
        quirks = getattr(config, "quirks", None)
        self.tgi_quirks = quirks == "tgi" or (quirks is None and config.upstream_model == "tgi")
        if self.tgi_quirks:  # TGI types logit_bias as a list: an OpenAI map gets a 422
            self.supported_params = OPENAI_PARAMS - {"logit_bias"}  # type: ignore[misc]
        self.native_responses = getattr(config, "responses_api", "chat") == "native"
        """`/v1/responses` requests go to the upstream's own `/responses`."""
        self.http = HttpUpstream.for_deployment(
            config, self.label, base_url=self.base_url(), headers=self.upstream_headers()
        )

    # -- what subclasses for OpenAI-shaped services override --------------------------------
    def base_url(self) -> str:
        assert self.config.url is not None
        return self.config.url

    def upstream_headers(self) -> dict[str, str]:
        cfg = self.config
        headers: dict[str, str] = {}
        if cfg.api_key:
            headers["Authorization"] = f"Bearer {cfg.api_key}"
        if getattr(cfg, "organization", None):
            headers["OpenAI-Organization"] = cfg.organization  # type: ignore[attr-defined]
        if getattr(cfg, "project", None):
            headers["OpenAI-Project"] = cfg.project  # type: ignore[attr-defined]
        return headers

    def endpoint(self, request: InferenceRequest) -> tuple[str, dict[str, str] | None]:
        """The path (and query) for this request."""
        if request.kind == "embedding":
            return "/embeddings", None
        return ("/chat/completions" if request.kind == "chat" else "/completions"), None

    def upstream_body(self, request: InferenceRequest) -> dict[str, Any]:
        body = dict(request.body)
        body["model"] = self.config.target_model
        if request.kind == "embedding":
            body["input"] = request.input
            body.pop("encoding_format", None)  # floats: base64 is encoded on the way out
            return body
        body.pop("stream_options", None)
        if self.tgi_quirks and (body.get("top_p") or 0) >= 1:
            del body["top_p"]  # TGI rejects 1.0 with a 422; it means "no nucleus cut"
        if request.stream:
            body["stream"] = True
            if request.include_usage:
                body["stream_options"] = {"include_usage": True}
        else:
            body["stream"] = False
        return body

    # -- the Responses API, passed through (`responses_api: native`) -------------------------
    def responses_endpoint(self) -> tuple[str, dict[str, str] | None]:
        """The path (and query) of the upstream's Responses API."""
        return "/responses", None

    def responses_upstream_body(self, request: InferenceRequest) -> dict[str, Any]:
        """The client's Responses body (as the route prepared it, see
        `ResponsesCall.native_body`) with `model` rewritten, the entry's `params:` where
        the client set nothing (in the Responses API's names, see RESPONSES_PARAMS) and
        `stream` as the client asked."""
        body = dict(request.responses_body or {})
        body["model"] = self.config.target_model
        for key, value in self.config.params.items():
            path = RESPONSES_PARAMS.get(key) if key in OPENAI_PARAMS else (key,)
            if path is None:
                continue
            *parents, last = path
            target = body
            for name in parents:
                child = dict(target.get(name) or {})
                target[name] = child
                target = child
            if target.get(last) is None:
                target[last] = value
        body["stream"] = request.stream
        if not request.stream:
            body.pop("stream_options", None)
        return body

    async def responses_stream(self, request: InferenceRequest) -> AsyncIterator[list[Event]]:
        """A `/v1/responses` request at `POST {url}/responses`: its JSON answer or typed
        event stream as events (`backends.responses_events`)."""
        path, query = self.responses_endpoint()
        body = self.responses_upstream_body(request)
        async with self.http.post(path, body, params=query) as resp:
            if not request.stream:
                data = await self.http.read_json(resp)
                if not isinstance(data, dict) or not (
                    data.get("object") == "response" or isinstance(data.get("output"), list)
                ):
                    self._raise_if_error(data)
                    raise UpstreamError(
                        f"{self.label} sent an answer that is not a response object: "
                        f"{orjson.dumps(data)[:200]!r}",
                        backend=self.label,
                    )
                yield response_object_events(data, self.label)
                return
            parser = ResponsesStreamParser(self.label, self._raise_if_error)
            async for batch in self.http.events(resp, parser):
                yield batch

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        await self.http.start()

    async def close(self) -> None:
        await self.http.close()

    async def health(self) -> None:
        """Ready when the upstream lists its models (`GET {url}/models`)."""
        async with self.http.request("GET", self.health_path()) as resp:
            await resp.read()

    def health_path(self) -> str:
        return "/models"

    async def count_tokens(self, request: InferenceRequest) -> int | None:
        """vLLM only: the chat's token count from `POST /tokenize` (at the server's root),
        rendered with the model's chat template and its generation prompt."""
        if self.config.backend != "vllm":
            return None
        body: dict[str, Any] = {
            "model": self.config.target_model,
            "messages": request.messages or [],
            "add_generation_prompt": True,
        }
        if request.params.get("tools"):
            body["tools"] = request.params["tools"]
        tokenize = join_url(self.base_url(), "/tokenize", strip="/v1")
        async with self.http.post(tokenize, body) as resp:
            data = await self.http.read_json(resp)
        count = data.get("count") if isinstance(data, dict) else None
        return count if isinstance(count, int) else None

    async def list_models(self) -> list[str]:
        """The model ids the upstream lists (`GET {url}/models`)."""
        async with self.http.request("GET", self.health_path()) as resp:
            data = await self.http.read_json(resp)
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list):
            return []
        return [m["id"] for m in items if isinstance(m, dict) and isinstance(m.get("id"), str)]

    async def stream(self, request: InferenceRequest) -> AsyncIterator[list[Event]]:
        if self.native_responses and request.responses_body is not None:
            async for batch in self.responses_stream(request):
                yield batch
            return
        chat = request.kind == "chat"
        path, query = self.endpoint(request)
        async with self.http.post(path, self.upstream_body(request), params=query) as resp:
            if not request.stream:
                data = await self.http.read_json(resp)
                self._raise_if_error(data)
                yield response_events(data, chat)
                return
            parser = ChunkParser(self, chat)
            async for batch in self.http.events(resp, parser):
                yield batch

    async def embed(self, request: InferenceRequest) -> Embeddings:
        path, query = self.endpoint(request)
        async with self.http.post(path, self.upstream_body(request), params=query) as resp:
            data = await self.http.read_json(resp)
        self._raise_if_error(data)
        return openai_embeddings(self.label, data)

    def _raise_if_error(self, data: Any) -> None:
        """An error object in a response or stream event: raise it with its real status when
        it carries one (vLLM's `code: 400`, TGI's `http_status_code: 422`)."""
        if not isinstance(data, dict) or not (data.get("error") or data.get("object") == "error"):
            return
        err = data.get("error")
        info = err if isinstance(err, dict) else data
        status = info.get("http_status_code") or info.get("code")
        body = orjson.dumps(data)
        if isinstance(status, int) and 400 <= status < 600:
            raise status_error(self.label, status, body)
        message = error_message(body)
        raise UpstreamError(f"{self.label} reported an error: {message}", backend=self.label)


class OpenAIBackend(OpenAICompatBackend):
    """OpenAI itself: the same protocol, with the public API as the default URL."""

    Settings = OpenAISettings
