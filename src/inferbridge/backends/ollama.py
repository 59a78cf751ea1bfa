"""Ollama through its native API: `/api/chat`, `/api/generate` (raw) and `/api/tags`.

Native rather than Ollama's `/v1` shim because only the native API can set `num_ctx`: the
shim always runs with the server's default context window and silently truncates longer
prompts. Chat requests go to `/api/chat` (Ollama applies the model's own template), legacy
completions to `/api/generate` with `raw: true`, so the prompt is used exactly as given.

Request translation (see docs/backends/ollama.md for the table):
- messages: content parts joined into one string, base64 data-URI images moved to `images`,
  assistant tool-call arguments parsed from JSON strings into objects, and tool results
  given the `tool_name` of the call they answer;
- sampling parameters go into `options` (only those the client or the entry set), on top of
  the entry's `options:` and `num_ctx:`; `keep_alive` and `format` are top-level fields;
- `stream` is always sent, since Ollama streams unless told not to.

The answer is NDJSON (one JSON object a line, the last with `done: true`) or one JSON
object; an `{"error": ...}` line after the stream started is raised as an UpstreamError.

Embeddings (`mode: embeddings` or `both`) go to `/api/embed` (`{"model", "input": [texts]}`
-> `{"embeddings": [[...]], "prompt_eval_count"}`), with `dimensions`, the entry's and the
request's `options` / `num_ctx`, `keep_alive` and `truncate`. Token-id inputs are refused:
Ollama takes text.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from pydantic import Field, field_validator

from inferbridge.backends.base import Backend
from inferbridge.backends.embedding import float_vectors, text_inputs
from inferbridge.backends.http import HttpUpstream, ItemParser, load_json, status_error
from inferbridge.config import DeploymentConfig
from inferbridge.decoders import NDJSONDecoder
from inferbridge.errors import InvalidRequest, UnsupportedParameter, UpstreamError, UpstreamRejected
from inferbridge.events import (
    Embeddings,
    Event,
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    Usage,
    normalize_finish,
)
from inferbridge.request import InferenceRequest

# A Go duration (time.ParseDuration), the only string form Ollama's keep_alive accepts.
_GO_DURATION = re.compile(r"[-+]?((\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))+")
_DATA_URI = re.compile(r"data:[^,;]*(?:;[^,;]*)*;base64,(.*)", re.IGNORECASE | re.DOTALL)

# OpenAI parameter -> Ollama option.
_PARAM_OPTIONS = {
    "max_tokens": "num_predict",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
# Extra field -> (Ollama option, must be an integer). Later rows win: Ollama's own
# `repeat_penalty` over the vLLM/TGI spelling `repetition_penalty`.
_EXTRA_OPTIONS = {
    "top_k": ("top_k", True),
    "min_p": ("min_p", False),
    "typical_p": ("typical_p", False),
    "repetition_penalty": ("repeat_penalty", False),
    "repeat_penalty": ("repeat_penalty", False),
    "repeat_last_n": ("repeat_last_n", True),
    "num_ctx": ("num_ctx", True),
}


def keep_alive_value(value: Any) -> str | int | float:
    """Validate a keep_alive: seconds as a number, or a Go duration such as "5m".

    A string of digits is turned into a number of seconds (Ollama rejects "300")."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError("keep_alive must be a number of seconds or a duration such as '5m'")
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"[-+]?\d+", text):
            return int(text)
        if not _GO_DURATION.fullmatch(text):
            raise ValueError(
                f"keep_alive {value!r} is not a duration: use seconds or a value such as "
                "'30s', '5m', '1h' (negative keeps the model loaded)"
            )
        return text
    return value


class OllamaSettings(DeploymentConfig):
    url: str = "http://127.0.0.1:11434"  # type: ignore[assignment]
    keep_alive: str | int | float | None = Field(
        default=None, description="How long Ollama keeps the model loaded ('5m', seconds)."
    )
    num_ctx: int | None = Field(default=None, gt=0, description="Context window in tokens.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Extra Ollama options sent with every request."
    )

    @field_validator("keep_alive")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return None if value is None else keep_alive_value(value)


# -- request translation ------------------------------------------------------------------
def _content(content: Any, where: str) -> tuple[str, list[str]]:
    """A message's content as Ollama wants it: one string, and its images as base64."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts: list[str] = []
    images: list[str] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text"):
            texts.append(part.get("text") or "")
        elif kind == "refusal":
            texts.append(part.get("refusal") or "")
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url") or ""
            match = _DATA_URI.fullmatch(url.strip())
            if match is None:
                raise InvalidRequest(
                    "Ollama takes images only inline: send a base64 data URI "
                    "(data:image/png;base64,...); image URLs are not supported.",
                    param=f"{where}.content[{j}].image_url.url",
                    code="unsupported_parameter",
                )
            images.append(re.sub(r"\s+", "", match.group(1)))
        else:
            raise InvalidRequest(
                f"Content parts of type {kind!r} are not supported by Ollama.",
                param=f"{where}.content[{j}].type",
                code="unsupported_parameter",
            )
    return "".join(texts), images


def _arguments(raw: Any, where: str) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}
    try:
        value = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError):
        value = None
    if not isinstance(value, dict):
        raise InvalidRequest(
            "Tool call arguments must be a JSON object (Ollama takes them as an object).",
            param=where,
        )
    return value


def ollama_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat messages -> Ollama `/api/chat` messages."""
    out: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name, for tool results
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role")
        text, images = _content(message.get("content"), where)
        msg: dict[str, Any] = {
            "role": {"developer": "system", "function": "tool"}.get(role, role),  # type: ignore[arg-type]
            "content": text,
        }
        if images:
            msg["images"] = images
        if role == "assistant":
            calls = list(message.get("tool_calls") or ())
            if message.get("function_call"):
                calls.append({"function": message["function_call"]})
            converted = []
            for k, call in enumerate(calls):
                fn = call.get("function") or {}
                args = _arguments(
                    fn.get("arguments"), f"{where}.tool_calls[{k}].function.arguments"
                )
                wire = {"function": {"index": k, "name": fn.get("name") or "", "arguments": args}}
                if call.get("id"):
                    wire["id"] = call["id"]
                    call_names[call["id"]] = wire["function"]["name"]
                converted.append(wire)
            if converted:
                msg["tool_calls"] = converted
            reasoning = message.get("reasoning_content")
            if isinstance(reasoning, str) and reasoning:
                msg["thinking"] = reasoning
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if call_id:
                msg["tool_call_id"] = call_id
                if call_id in call_names:
                    msg["tool_name"] = call_names[call_id]
        elif role == "function" and message.get("name"):
            msg["tool_name"] = message["name"]
        out.append(msg)
    return out


def ollama_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for tool in tools:
        fn = tool.get("function") or {}
        keep = {k: fn[k] for k in ("name", "description", "parameters") if k in fn}
        out.append({"type": tool.get("type", "function"), "function": keep})
    return out


def ollama_format(response_format: dict[str, Any] | None) -> Any:
    """OpenAI response_format -> Ollama `format` ("json" or a JSON schema; None: omit)."""
    kind = (response_format or {}).get("type")
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")  # type: ignore[union-attr]
        return schema if isinstance(schema, dict) else "json"
    return None


def _number(key: str, value: Any, integer: bool) -> Any:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok:
        kind = "an integer" if integer else "a number"
        raise InvalidRequest(f"Invalid value for '{key}': expected {kind}.", param=key)
    return value


# -- response translation -----------------------------------------------------------------
class ResponseReader:
    """Turns Ollama answer objects (stream lines, or one whole answer) into events."""

    __slots__ = ("calls", "chat", "done", "label")

    def __init__(self, label: str, chat: bool) -> None:
        self.label = label
        self.chat = chat
        self.calls = 0
        self.done = False

    def parse(self, line: bytes) -> Any:
        return load_json(self.label, line, "stream line")

    def line(self, line: bytes, out: list[Event]) -> bool:
        """The events of one stream line; True once the answer is complete."""
        out += self.events(self.parse(line))
        return self.done

    def events(self, obj: Any, *, last: bool = False) -> list[Event]:
        if not isinstance(obj, dict):
            raise UpstreamError(
                f"{self.label} sent an unexpected answer: {obj!r:.200}", backend=self.label
            )
        if obj.get("error"):
            raise UpstreamError(
                f"{self.label} reported an error: {obj['error']}", backend=self.label
            )
        out: list[Event] = []
        source = (obj.get("message") or {}) if self.chat else obj
        thinking = source.get("thinking")
        if thinking:
            out.append(ReasoningDelta(thinking))
        text = source.get("content") if self.chat else source.get("response")
        if text:
            out.append(TextDelta(text))
        for call in source.get("tool_calls") or ():
            fn = call.get("function") or {}
            args = fn.get("arguments")
            if not isinstance(args, str):
                args = orjson.dumps(args if args is not None else {}).decode()
            call_id = call.get("id") or f"call_{uuid.uuid4().hex[:24]}"
            out.append(
                ToolCallDelta(self.calls, id=call_id, name=fn.get("name") or "", arguments=args)
            )
            self.calls += 1
        if obj.get("done") or last:
            self.done = True
            # "length" is the only truncation; "stop", "" (connection closed), a missing
            # reason (older servers), "load"/"unload" (nothing was generated) are "stop".
            out.append(Finish(normalize_finish(obj.get("done_reason"))))
            if "prompt_eval_count" in obj or "eval_count" in obj:
                out.append(
                    Usage(int(obj.get("prompt_eval_count") or 0), int(obj.get("eval_count") or 0))
                )
        return out


def _error_mapper(label: str, status: int, body: bytes, headers: Any) -> UpstreamError:
    err = status_error(label, status, body, headers)
    if status == 404 and isinstance(err, UpstreamRejected) and "model" in err.message:
        err.code, err.param = "model_not_found", "model"
    return err


# -- the adapter ----------------------------------------------------------------------------
class OllamaBackend(Backend):
    Settings = OllamaSettings
    supported_params = frozenset({*_PARAM_OPTIONS, "response_format", "tools", "tool_choice"})
    supported_extras = frozenset({*_EXTRA_OPTIONS, "keep_alive", "options", "think"})
    embedding_params = frozenset({"dimensions"})
    embedding_extras = frozenset({"keep_alive", "options", "truncate", "num_ctx"})

    def __init__(self, config: DeploymentConfig) -> None:
        super().__init__(config)
        assert isinstance(config, OllamaSettings)
        self.settings = config
        self.http = HttpUpstream.for_deployment(config, self.label, error_mapper=_error_mapper)

    async def start(self) -> None:
        await self.http.start()

    async def close(self) -> None:
        await self.http.close()

    # -- request --------------------------------------------------------------------------
    def options(self, request: InferenceRequest) -> dict[str, Any]:
        """Ollama `options`: the entry's, then the request's, then the mapped parameters."""
        options = dict(self.settings.options)
        if self.settings.num_ctx is not None:
            options["num_ctx"] = self.settings.num_ctx
        extra = request.extras.get("options")
        if extra is not None:
            if not isinstance(extra, dict):
                raise InvalidRequest(
                    "'options' must be an object of Ollama options.", param="options"
                )
            options.update(extra)
        for key, option in _PARAM_OPTIONS.items():
            if key in request.params:
                value = request.params[key]
                options[option] = [value] if option == "stop" and isinstance(value, str) else value
        for key, (option, integer) in _EXTRA_OPTIONS.items():
            if key in request.extras:
                options[option] = _number(key, request.extras[key], integer)
        return options

    def build(self, request: InferenceRequest) -> tuple[str, dict[str, Any]]:
        """The Ollama path and JSON body for `request`."""
        params, extras = request.params, request.extras
        body: dict[str, Any] = {"model": self.config.target_model}
        if request.kind == "chat":
            path = "/api/chat"
            body["messages"] = ollama_messages(request.messages or [])
            tools = params.get("tools")
            choice = params.get("tool_choice", "auto")
            if choice not in ("auto", "none"):
                # Ollama always decides by itself: it cannot be made to call a tool.
                if not self.drop_unsupported:
                    raise UnsupportedParameter("tool_choice", request.model, "ollama")
                choice = "auto"
            if tools and choice != "none":  # "none": offer no tools at all
                body["tools"] = ollama_tools(tools)
        else:
            path = "/api/generate"
            if not isinstance(request.prompt, str):
                raise InvalidRequest("'prompt' must be a string for this model.", param="prompt")
            body["prompt"] = request.prompt
            body["raw"] = True
        body["stream"] = request.stream
        fmt = ollama_format(params.get("response_format"))
        if fmt is not None:
            body["format"] = fmt
        self.add_options(body, request)
        if "think" in extras:
            think = extras["think"]
            if not isinstance(think, bool | str):
                raise InvalidRequest(
                    "'think' must be true, false or a level such as 'high'.", param="think"
                )
            body["think"] = think
        return path, body

    # -- response -------------------------------------------------------------------------
    async def stream(self, request: InferenceRequest) -> AsyncIterator[list[Event]]:
        path, body = self.build(request)
        reader = ResponseReader(self.label, request.kind == "chat")
        async with self.http.post(path, body) as resp:
            if not request.stream:
                yield reader.events(await self.http.read_json(resp), last=True)
                return
            parser = ItemParser(self.label, NDJSONDecoder(), reader.line)
            async for batch in self.http.events(resp, parser):
                yield batch

    # -- embeddings -----------------------------------------------------------------------
    def embed_body(self, request: InferenceRequest) -> dict[str, Any]:
        """The `/api/embed` body for one batch of `request.input`."""
        extras = request.extras
        body: dict[str, Any] = {
            "model": self.config.target_model,
            "input": text_inputs(request, "ollama"),
        }
        if "dimensions" in request.params:
            body["dimensions"] = request.params["dimensions"]
        if "truncate" in extras:
            if not isinstance(extras["truncate"], bool):
                raise InvalidRequest("'truncate' must be true or false.", param="truncate")
            body["truncate"] = extras["truncate"]
        self.add_options(body, request)
        return body

    def add_options(self, body: dict[str, Any], request: InferenceRequest) -> None:
        """The entry's and the request's `options` and `keep_alive`, as every Ollama call
        takes them."""
        options = self.options(request)
        if options:
            body["options"] = options
        keep_alive = self.settings.keep_alive
        extras = request.extras
        if "keep_alive" in extras:
            try:
                keep_alive = keep_alive_value(extras["keep_alive"])
            except ValueError as exc:
                raise InvalidRequest(str(exc), param="keep_alive") from None
        if keep_alive is not None:
            body["keep_alive"] = keep_alive

    async def embed(self, request: InferenceRequest) -> Embeddings:
        async with self.http.post("/api/embed", self.embed_body(request)) as resp:
            data = await self.http.read_json(resp)
        if not isinstance(data, dict) or data.get("error"):
            error = data.get("error") if isinstance(data, dict) else data
            raise UpstreamError(f"{self.label} reported an error: {error}", backend=self.label)
        tokens = data.get("prompt_eval_count")
        vectors = float_vectors(self.label, data.get("embeddings"))
        return Embeddings(vectors, tokens if isinstance(tokens, int) else None)

    # -- readiness ------------------------------------------------------------------------
    async def list_models(self) -> list[str]:
        """The models the Ollama server has pulled (`GET /api/tags`), as `name:tag`."""
        cfg = self.config
        timeout = min(cfg.timeout, 10.0)
        async with self.http.request("GET", "/api/tags", timeout=timeout) as resp:
            data = await self.http.read_json(resp)
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, list):
            raise UpstreamError(
                f"{self.label} answered /api/tags without a model list", backend=self.label
            )
        names = (m.get("name") or m.get("model") for m in models if isinstance(m, dict))
        return [n for n in names if isinstance(n, str) and n]

    async def health(self) -> None:
        """Return when the server answers `/api/tags`; raise UpstreamError otherwise."""
        await self.list_models()
