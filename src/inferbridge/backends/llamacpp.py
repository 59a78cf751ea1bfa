"""llama.cpp's `llama-server`, through its native `POST /completion` API.

Chat requests are rendered into one prompt with the entry's chat template
(`prompt_template` / `chat_template_file`), or, when neither is set and
`use_server_template` is on (the default), with the model's own template read once from
`GET /props` (`chat_template`, `bos_token`, `eos_token`) and rendered here with the Jinja
environment of Hugging Face chat templates. When that `chat_template` is not Jinja this
renderer can use (a llama.cpp built-in name given with `--chat-template`, or syntax only
llama.cpp's own engine takes), llama-server renders each chat itself: `POST
/apply-template` -> `{"prompt"}`. Start-up looks the template up once: a server that
answers but has none stops start-up with a message naming the entry; one that cannot be
asked (down, loading) is asked again on the first chat request
(`prompting.check_server_template`). A legacy completion's prompt (text or token ids) is
sent as given. Stop strings are always sent as a JSON list (llama.cpp silently ignores a
bare string) and enforced by the server, which leaves them out of `content`.

Streams are SSE `data: {"content": ..., "stop": false}` events ending with one
`"stop": true` event and no `[DONE]`. The finish reason comes from `stop_type`
(`eos`/`word`/`limit`/`none`, builds since Dec 2024) or the older `stopped_eos` /
`stopped_word` / `stopped_limit` booleans; usage from `tokens_evaluated` /
`tokens_predicted` (`timings` on builds without them). Errors: HTTP
`{"error": {"code": N, "message", "type"}}`, in-stream `data: {"error": {...}}` or the
legacy `error: {...}` line; `exceed_context_size_error` becomes a 400
`context_length_exceeded`. Parameters are mapped by `llamacpp_params`; see
docs/backends/llamacpp.md for the parameter table.

Embeddings (`mode: embeddings` or `both`; the server started with `--embeddings` and a
pooling type other than `none`) go to the native `POST /embedding` with `content`: the
text or token ids of a batch of one (every build), a list of them for larger batches
(builds since Dec 2024). Answers read: `[{"index", "embedding": [[...]]}]` (current),
`{"embedding": [...]}` (older builds), and OpenAI's shape. The native endpoint counts no
tokens: usage is estimated.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from pydantic import Field

from inferbridge.backends.base import Backend
from inferbridge.backends.embedding import float_vector, openai_embeddings
from inferbridge.backends.http import HttpUpstream, ItemParser, error_message, status_error
from inferbridge.backends.llamacpp_params import (
    NATIVE_EXTRAS,
    RENAMED_PARAMS,
    json_schema,
    logit_bias,
    top_logprobs,
)
from inferbridge.backends.prompting import (
    PROBE_MESSAGES,
    STARTUP_CHECK_SECONDS,
    PromptBuilder,
    PromptSettings,
    check_server_template,
    cut_continuation,
    no_template,
    server_messages,
)
from inferbridge.decoders import NDJSONDecoder
from inferbridge.errors import UpstreamError, UpstreamRejected, UpstreamUnavailable
from inferbridge.events import Embeddings, Event, Finish, TextDelta, Usage
from inferbridge.request import InferenceRequest
from inferbridge.templates import ChatTemplate, TemplateError, merge_stops
from inferbridge.templates.renderer import compile_template

log = logging.getLogger("inferbridge.llamacpp")


class LlamaCppSettings(PromptSettings):
    url: str  # type: ignore[assignment]  # required: the llama-server base URL
    cache_prompt: bool = Field(
        default=True, description="Reuse the KV cache of a common prompt prefix (sent always)."
    )
    slot_id: int | None = Field(
        default=None, description="Pin requests to this server slot (`id_slot`, old `slot_id`)."
    )
    use_server_template: bool = Field(
        default=True,
        description="Without prompt_template/chat_template_file, render chats with the "
        "model's own template, as llama-server reports it in GET /props.",
    )


_STOP_BOOLEANS = (("stopped_limit", "limit"), ("stopped_eos", "eos"), ("stopped_word", "word"))


def finish_reason(result: dict[str, Any]) -> str:
    """The normalized finish reason of a final (`"stop": true`) result, either dialect.

    `eos` and `word` are "stop"; `limit` and `none` are "length", as llama-server's own
    OpenAI layer maps them. `stopped_limit` is read before `stopped_word` because some 2024
    builds reported `stopped_word: true` on every stop (llama.cpp PR #7198).
    """
    kind = result.get("stop_type")
    if kind is None:
        kind = next((k for field, k in _STOP_BOOLEANS if result.get(field)), None)
        if kind is None and any(field in result for field, _ in _STOP_BOOLEANS):
            kind = "none"
    if kind in ("eos", "word"):
        return "stop"
    if kind in ("limit", "none"):
        return "length"
    return "length" if result.get("truncated") else "stop"


def stopping_word(result: dict[str, Any]) -> str | None:
    """The stop string that ended a final result (`stopping_word`, empty unless one did)."""
    word = result.get("stopping_word")
    return word if isinstance(word, str) and word else None


def usage_of(result: dict[str, Any]) -> Usage | None:
    """Token counts of a final result: `tokens_evaluated` / `tokens_predicted`, else `timings`."""
    timings = result.get("timings") if isinstance(result.get("timings"), dict) else {}
    prompt = result.get("tokens_evaluated")
    completion = result.get("tokens_predicted")
    if prompt is None and "prompt_n" in timings:
        prompt = int(timings["prompt_n"]) + int(timings.get("cache_n") or 0)
    if completion is None:
        completion = timings.get("predicted_n")
    if prompt is None and completion is None:
        return None
    details = None
    if timings.get("cache_n") is not None:
        details = {"prompt_tokens_details": {"cached_tokens": int(timings["cache_n"])}}
    return Usage(int(prompt or 0), int(completion or 0), details)


def _context_exceeded(label: str, err: dict[str, Any]) -> UpstreamRejected | None:
    message = str(err.get("message") or "")
    if err.get("type") != "exceed_context_size_error" and "context size" not in message:
        return None
    if "n_prompt_tokens" in err and "n_ctx" in err:
        message += f" (prompt: {err['n_prompt_tokens']} tokens, context: {err['n_ctx']})"
    return UpstreamRejected(
        f"{message} (from {label})", status=400, code="context_length_exceeded", backend=label
    )


class NoSuchEndpoint(UpstreamError):
    """llama-server answered 404: a wrong `url`, or a build without that endpoint."""


def llamacpp_error(label: str, status: int, body: bytes, headers: Any = None) -> UpstreamError:
    """HttpUpstream error mapper for llama-server's `{"error": {"code", "message", "type"}}`."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict) and (mapped := _context_exceeded(label, err)):
        return mapped
    if status == 404:
        return NoSuchEndpoint(
            f"{label} has no such endpoint (HTTP 404: {error_message(body)}): "
            "is `url` the llama-server base URL?",
            backend=label,
        )
    return status_error(label, status, body, headers)


def stream_error(label: str, err: Any) -> UpstreamError:
    """The error reported inside a 200 stream (`data: {"error": ...}` or `error: {...}`)."""
    if isinstance(err, dict) and isinstance(err.get("error"), dict):
        err = err["error"]  # `error:` lines of some builds carry the whole envelope
    if not isinstance(err, dict):
        return UpstreamError(f"{label} reported an error: {err}", backend=label)
    if mapped := _context_exceeded(label, err):
        return mapped
    code = err.get("code")
    if isinstance(code, int) and (400 <= code < 500 or code == 503):
        return llamacpp_error(label, code, orjson.dumps({"error": err}))
    message = err.get("message") or orjson.dumps(err).decode()
    return UpstreamError(f"{label} reported an error: {message}", backend=label)


class _ResultReader:
    """Turns /completion results (stream events or the whole answer) into events."""

    def __init__(self, label: str, chat: bool, top_logprobs: int | None) -> None:
        self.label = label
        self.chat = chat
        self.top_logprobs = top_logprobs  # None: logprobs not requested
        self.offset = 0  # legacy completions' text_offset
        self.done = False

    def line(self, line: bytes, out: list[Event]) -> bool:
        """The events of one complete SSE line (llama.cpp's events are one line each: only
        `data:` and legacy `error:` lines matter); True once the answer is complete."""
        name, _, value = line.rstrip(b"\r").partition(b":")
        value = value[1:] if value[:1] == b" " else value
        if name == b"data" and value != b"[DONE]":
            self.result(self._json(value), out)
        elif name == b"error":
            raise stream_error(self.label, self._json(value))
        return self.done

    def result(self, obj: Any, out: list[Event], final: bool = False) -> None:
        if not isinstance(obj, dict):
            raise UpstreamError(
                f"{self.label} sent an unexpected result: {obj!r:.200}", backend=self.label
            )
        if "error" in obj:
            raise stream_error(self.label, obj["error"])
        text = obj.get("content") or ""
        probs = obj.get("completion_probabilities")
        logprobs = self._logprobs(probs) if probs and self.top_logprobs is not None else None
        if text or logprobs is not None:
            out.append(TextDelta(text, 0, logprobs))
        if final or obj.get("stop"):
            self.done = True
            out.append(Finish(finish_reason(obj), stop_sequence=stopping_word(obj)))
            usage = usage_of(obj)
            if usage is not None:
                out.append(usage)

    def _json(self, raw: bytes) -> Any:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamError(
                f"{self.label} sent an invalid stream event: {raw[:200]!r}", backend=self.label
            ) from None

    def _logprobs(self, entries: list[dict[str, Any]]) -> Any:
        """llama.cpp's `completion_probabilities` in the OpenAI logprobs shape (the events
        carry logprobs that way, as OpenAI-compatible upstreams give them). Only the
        `logprob` format maps faithfully; `post_sampling_probs` / pre-2025 `probs` do not."""
        if not all(isinstance(e, dict) and "logprob" in e for e in entries):
            return None
        n = self.top_logprobs or 0
        if self.chat:
            return {
                "content": [
                    {
                        "token": e.get("token", ""),
                        "logprob": e["logprob"],
                        "bytes": e.get("bytes"),
                        "top_logprobs": [
                            {
                                "token": t.get("token", ""),
                                "logprob": t.get("logprob"),
                                "bytes": t.get("bytes"),
                            }
                            for t in (e.get("top_logprobs") or [])[:n]
                        ],
                    }
                    for e in entries
                ]
            }
        tokens = [e.get("token", "") for e in entries]
        offsets = []
        for token in tokens:
            offsets.append(self.offset)
            self.offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [
                {t.get("token", ""): t.get("logprob") for t in (e.get("top_logprobs") or [])[:n]}
                for e in entries
            ],
            "text_offset": offsets,
        }


SERVER_NAME = "the model's own (GET /props)"
"""The name of a chat template read from the server."""


class LlamaCppBackend(Backend):
    Settings = LlamaCppSettings
    supported_params = frozenset(
        {
            "max_tokens",
            "temperature",
            "top_p",
            "stop",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
            "logprobs",
            "top_logprobs",
            "response_format",
        }
    )
    supported_extras = NATIVE_EXTRAS | {"repetition_penalty"}
    accepts_token_prompts = True
    embedding_extras = frozenset({"embd_normalize"})

    def __init__(self, config: LlamaCppSettings) -> None:  # type: ignore[override]
        super().__init__(config)
        self.settings = config
        self.http = HttpUpstream.for_deployment(config, self.label, error_mapper=llamacpp_error)
        self.builder = PromptBuilder(config, strip_bos=True)  # /completion adds BOS itself
        self._template_lock = asyncio.Lock()
        # Set when the server renders chats (/apply-template): its BOS and EOS strings.
        self._server_tokens: tuple[str, str] | None = None

    @property
    def uses_server_template(self) -> bool:
        """Chats are rendered with the model's own template (no template in the entry)."""
        return (
            self.builder.template is None
            and self.settings.use_server_template
            and self.serves("chat")
        )

    async def start(self) -> None:
        await self.http.start()
        if self.uses_server_template:
            await check_server_template(
                self.label, lambda: self.load_server_template(timeout=STARTUP_CHECK_SECONDS)
            )

    async def close(self) -> None:
        await self.http.close()

    async def probe(self) -> dict[str, Any]:
        """`check --probe`: health, and where chat templates come from."""
        found = await super().probe()
        if not self.serves("chat"):
            return found
        template = self.builder.template
        if template is not None and template.name != SERVER_NAME:
            found["template"] = template.name
        elif not self.settings.use_server_template:
            found["template"] = "none: set prompt_template (use_server_template is false)"
        else:
            await self.load_server_template()
            how = " (rendered by llama-server)" if self._server_tokens is not None else ""
            found["template"] = "from server" + how
        return found

    # -- readiness and the server's template ------------------------------------------------
    async def health(self) -> None:
        """GET /health: returns when the model is loaded; raises UpstreamUnavailable while
        it loads (503) and UpstreamError when the server is down or broken."""
        async with self.http.request("GET", "/health"):
            pass

    async def load_server_template(self, *, timeout: float | None = None) -> None:
        """Find out once how chats are rendered with the model's own template: the
        `chat_template` of GET /props, rendered here, or (when it is not Jinja this renderer
        compiles) llama-server's POST /apply-template for every chat. Raises
        `DeploymentMisconfigured` when the server has no usable template."""
        async with self._template_lock:
            if self.builder.template is not None or self._server_tokens is not None:
                return
            try:
                async with self.http.request("GET", "/props", timeout=timeout) as resp:
                    props = await self.http.read_json(resp)
            except UpstreamUnavailable:
                raise
            except UpstreamError as exc:
                raise UpstreamError(
                    f"Cannot read the model's chat template from GET /props: {exc.message}",
                    backend=self.label,
                ) from exc
            props = props if isinstance(props, dict) else {}
            source = props.get("chat_template")
            bos = props.get("bos_token") if isinstance(props.get("bos_token"), str) else ""
            eos = props.get("eos_token") if isinstance(props.get("eos_token"), str) else ""
            if isinstance(source, str) and ("{{" in source or "{%" in source):
                try:
                    compile_template(source)
                except TemplateError as exc:
                    why = f"its chat template does not compile here ({exc.message})"
                else:
                    self.builder.template = ChatTemplate(
                        name=SERVER_NAME,
                        source=source,
                        bos_token=bos,
                        eos_token=eos,
                        stop=(eos,) if eos else (),
                        leading_bos=bool(bos),
                    )
                    return
            elif isinstance(source, str) and source.strip():
                why = f"its chat template is llama.cpp's built-in {source.strip()[:40]!r}"
            else:
                why = "GET /props reports none"
            try:  # can the server render chats itself?
                sample = await self._apply_template(PROBE_MESSAGES, bos, timeout=timeout)
            except NoSuchEndpoint:
                raise no_template(
                    self.label, f"{why}, and this llama-server has no POST /apply-template"
                ) from None
            except UpstreamRejected as exc:
                if exc.retryable:
                    raise
            else:
                if PROBE_MESSAGES[0]["content"] not in sample:
                    # e.g. `--jinja --chat-template llama3`: the name rendered as Jinja text
                    raise no_template(
                        self.label,
                        f"{why}, and llama-server's /apply-template renders no message with "
                        f"it ({sample[:40]!r}): is --jinja set with a built-in template name?",
                    )
            log.info("%s: %s; llama-server renders chats (/apply-template)", self.label, why)
            self._server_tokens = (bos, eos)

    async def _apply_template(
        self, messages: Any, bos: str, *, timeout: float | None = None
    ) -> str:
        """`messages` rendered by llama-server (`POST /apply-template`), one leading BOS
        removed (/completion adds it)."""
        msgs, marker = server_messages(messages)
        async with self.http.post("/apply-template", {"messages": msgs}, timeout=timeout) as resp:
            data = await self.http.read_json(resp)
        prompt = data.get("prompt") if isinstance(data, dict) else None
        if not isinstance(prompt, str):
            raise UpstreamError(
                f"{self.label} sent an unexpected /apply-template answer: {str(data)[:200]}",
                backend=self.label,
            )
        prompt = cut_continuation(prompt, marker, self.label)
        return prompt[len(bos) :] if bos and prompt.startswith(bos) else prompt

    # -- request translation ----------------------------------------------------------------
    async def prompt(self, request: InferenceRequest) -> tuple[str | list[int], list[str]]:
        """The /completion `prompt` (text, or token ids as given) and the stop strings."""
        if request.kind == "completion" and isinstance(request.prompt, list):
            return request.prompt, list(request.stop)
        if request.kind == "chat" and self.uses_server_template:
            await self.load_server_template()
            if self._server_tokens is not None:
                bos, eos = self._server_tokens
                prompt = await self._apply_template(request.messages or [], bos)
                return prompt, merge_stops((eos,) if eos else (), request.stop)
        return self.builder.build(request)

    def payload(
        self, request: InferenceRequest, prompt: str | list[int], stops: list[str]
    ) -> dict[str, Any]:
        """The /completion body: only what the client (or the entry's params) asked for."""
        params = request.params
        body: dict[str, Any] = {
            "prompt": prompt,
            "stream": request.stream,
            "cache_prompt": self.settings.cache_prompt,
        }
        if self.settings.slot_id is not None:  # `slot_id` before March 2024, `id_slot` since
            body["id_slot"] = body["slot_id"] = self.settings.slot_id
        if stops:
            body["stop"] = list(stops)
        for name, field in RENAMED_PARAMS.items():
            if name in params:
                body[field] = params[name]
        if "logit_bias" in params:
            body["logit_bias"] = logit_bias(params["logit_bias"])
        top = top_logprobs(request)
        if top is not None:
            body["n_probs"] = max(top, 1)
        if "response_format" in params:
            body["json_schema"] = json_schema(params["response_format"])
        extras = request.extras
        if "repetition_penalty" in extras:
            body["repeat_penalty"] = extras["repetition_penalty"]
        for key in NATIVE_EXTRAS.intersection(extras):
            body[key] = extras[key]
        if "id_slot" in extras:
            body["slot_id"] = extras["id_slot"]
        return body

    async def stream(self, request: InferenceRequest) -> AsyncIterator[list[Event]]:
        prompt, stops = await self.prompt(request)
        body = self.payload(request, prompt, stops)
        reader = _ResultReader(self.label, request.kind == "chat", top_logprobs(request))
        async with self.http.post("/completion", body) as resp:
            if not request.stream:
                data = await self.http.read_json(resp)
                if isinstance(data, list) and len(data) == 1:
                    data = data[0]
                batch: list[Event] = []
                reader.result(data, batch, final=True)
                yield batch
                return
            # llama.cpp sends one-line events: cutting lines is enough
            parser = ItemParser(self.label, NDJSONDecoder(), reader.line)
            async for batch in self.http.events(resp, parser):
                yield batch

    async def count_tokens(self, request: InferenceRequest) -> int | None:
        """The prompt's token count from `POST /tokenize`: the chat rendered as `stream`
        would send it, with the special tokens /completion adds (BOS)."""
        prompt, _ = await self.prompt(request)
        if isinstance(prompt, list):
            return len(prompt)
        async with self.http.post("/tokenize", {"content": prompt, "add_special": True}) as resp:
            data = await self.http.read_json(resp)
        tokens = data.get("tokens") if isinstance(data, dict) else None
        return len(tokens) if isinstance(tokens, list) else None

    # -- embeddings -----------------------------------------------------------------------
    async def embed(self, request: InferenceRequest) -> Embeddings:
        inputs = request.input or []
        body: dict[str, Any] = {"content": inputs[0] if len(inputs) == 1 else inputs}
        if "embd_normalize" in request.extras:
            body["embd_normalize"] = request.extras["embd_normalize"]
        async with self.http.post("/embedding", body) as resp:
            data = await self.http.read_json(resp)
        return llamacpp_embeddings(self.label, data)


def llamacpp_embeddings(label: str, data: Any) -> Embeddings:
    """The answer of llama-server's `/embedding`, in any of its shapes (see module doc)."""
    if isinstance(data, dict) and "data" in data:
        return openai_embeddings(label, data)
    if isinstance(data, dict) and "error" in data:
        raise stream_error(label, data["error"])
    items = data.get("results", [data]) if isinstance(data, dict) else data
    if not isinstance(items, list) or not all(
        isinstance(i, dict) and "embedding" in i for i in items
    ):
        raise UpstreamError(
            f"{label} sent an unexpected embeddings answer: {str(data)[:200]}", backend=label
        )
    items = sorted(items, key=lambda i: i["index"] if isinstance(i.get("index"), int) else 0)
    vectors = []
    for item in items:
        value = item["embedding"]
        if isinstance(value, list) and value and isinstance(value[0], list):
            if len(value) != 1:  # one vector per token
                err = UpstreamError(
                    f"{label} returned one vector per token: the server runs with "
                    "--pooling none; start it with --pooling mean (or cls, last) to serve "
                    "embeddings",
                    backend=label,
                )
                err.retryable = False
                raise err
            value = value[0]
        vectors.append(float_vector(label, value))
    counts = [i.get("tokens_evaluated", i.get("n_tokens")) for i in items]
    tokens = sum(counts) if all(isinstance(c, int) for c in counts) else None
    return Embeddings(vectors, tokens)
