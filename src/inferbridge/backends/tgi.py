"""The `tgi` backend: Hugging Face text-generation-inference's native API.

Chat requests are rendered with the entry's chat template (without the leading BOS: TGI's
tokenizer adds it) and sent as `inputs` to `POST /generate` (non-streaming) or
`POST /generate_stream` (SSE); legacy completions send their prompt as given. OpenAI
parameters are translated into TGI's `parameters` object by `tgi_params`, mapping every
value TGI would reject with a 422 to what it means (temperature 0 -> greedy, top_p 1 -> no
nucleus, ...), and always asking for `details: true` (finish reason and token counts) and
`return_full_text: false`.

Without `prompt_template` / `chat_template_file` (and with `use_server_template`, the
default) chats are rendered with the model's own template by TGI itself: `POST
/chat_tokenize` answers `{"tokenize_response": [...], "templated_text": ...}` for a chat
request (TGI publishes the template nowhere else, so this is one short call per chat
request). TGI's chat path tokenizes that text without adding special tokens while
/generate adds them, so the BOS the template wrote is cut off: the token TGI's tokenizer
puts before every input is read once per deployment from `POST /tokenize` (a token with an
empty span at 0), and dropped from the front of the templated text when its first token is
that one. Start-up asks once: a TGI that answers "template not found" (or has no
/chat_tokenize) stops start-up with a message naming the entry; a TGI that cannot be asked
is asked again on the first chat request. See `prompting.check_server_template`.

Stop strings: TGI accepts at most `/info.max_stop_sequences` of them (read once per
deployment, 4 when /info is unavailable). What is sent (`tgi_params.stops_for_tgi`) is
their covering set (a stop that contains another one is dropped: generation halts at the
shorter one first), the client's first, then the template's, the template's EOS last (TGI
stops on EOS by itself). Every stop string, sent or not, is also enforced here with a
`StopCutter`, which decides where the text is cut. When the covering set is larger than the
limit, the request is streamed from TGI (even for a non-streamed answer) so that a cut at a
stop TGI was not sent can end the generation: the response is closed there instead of
being read to its end.

Usage: the backend's counts wherever it gives them: the final stream event's `details`
(`input_length`, `generated_tokens`), the `x-prompt-tokens` header and
`details.generated_tokens` (or `x-generated-tokens`) on /generate, and the number of token
events read when a stream is cut before its end (each event is one generated token). A
part TGI does not give (the prompt side of a cut stream, counts of an answer without
details) is estimated (`inferbridge.usage`) and the `Usage` is marked `estimated`. TGI errors
(`{"error", "error_type"}` bodies, and the same object as an SSE event at HTTP 200) become
`UpstreamError`s: validation -> 400, overloaded -> 429, generation failures -> 502.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import orjson
from pydantic import Field

from inferbridge.backends.base import Backend
from inferbridge.backends.http import (
    HttpUpstream,
    ItemParser,
    error_message,
    load_json,
    status_error,
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
from inferbridge.backends.tgi_params import TGIInfo, stops_for_tgi, translate_params
from inferbridge.config import DeploymentConfig
from inferbridge.decoders import ServerSentEvent, SSEDecoder
from inferbridge.errors import InvalidRequest, UpstreamError, UpstreamRejected
from inferbridge.events import Event, Finish, TextDelta, Usage, normalize_finish
from inferbridge.request import InferenceRequest
from inferbridge.stops import StopCutter
from inferbridge.templates import merge_stops
from inferbridge.usage import estimate_tokens

log = logging.getLogger("inferbridge.tgi")

INFO_RETRY_SECONDS = 30.0

# HTTP status TGI gives each `error_type` (server.rs `impl From<InferError>`); SSE error
# events carry only the type, so they are mapped through the same table.
ERROR_TYPE_STATUS = {
    "validation": 422,
    "template_error": 422,
    "missing_template_variable": 422,
    "tool_error": 422,
    "overloaded": 429,
    "generation": 424,
    "healthcheck": 503,
}


class TGISettings(PromptSettings):
    url: str  # type: ignore[assignment]  # required: TGI's base URL (no /v1)
    use_server_template: bool = Field(
        default=True,
        description="Without prompt_template/chat_template_file, render chats with the "
        "model's own template through TGI's POST /chat_tokenize.",
    )


# -- errors -------------------------------------------------------------------------------
def tgi_error(label: str, status: int, body: bytes, headers: Any = None) -> UpstreamError:
    """Map a TGI error answer (`{"error": "...", "error_type": "..."}`) to inferbridge's."""
    if status == 424 or (status >= 500 and status not in (503, 504)):
        message = error_message(body)
        return UpstreamError(f"{label} failed (HTTP {status}): {message}", backend=label)
    err = status_error(label, status, body, headers)
    if status == 422 and ("must be <=" in err.message or "must have less than" in err.message):
        err.code = "context_length_exceeded"
    return err


def event_error(label: str, event: dict[str, Any]) -> UpstreamError:
    """The exception for an SSE error event (sent at HTTP 200)."""
    status = ERROR_TYPE_STATUS.get(str(event.get("error_type")), 500)
    return tgi_error(label, status, orjson.dumps(event))


# -- response translation ------------------------------------------------------------------
class _Logprobs:
    """Builds OpenAI logprobs for the tokens whose text was actually emitted."""

    def __init__(self, chat: bool, top: int) -> None:
        self.chat, self.top = chat, top
        self.pending: list[tuple[int, str, float, list[tuple[str, float]]]] = []
        self.fed = self.emitted = 0

    def add(self, token: dict[str, Any], tops: Any) -> None:
        text = token.get("text") or ""
        alts = [(a.get("text") or "", _lp(a)) for a in (tops or [])[: self.top]]
        self.pending.append((self.fed, text, _lp(token), alts))
        self.fed += len(text)

    def take(self, emitted: int, everything: bool = False) -> Any:
        self.emitted += emitted
        ready = [e for e in self.pending if everything or e[0] < self.emitted]
        self.pending = self.pending[len(ready) :]
        if not ready:
            return None
        if self.chat:
            return {"content": [_chat_entry(t, lp, alts) for _, t, lp, alts in ready]}
        return {
            "tokens": [e[1] for e in ready],
            "token_logprobs": [e[2] for e in ready],
            "top_logprobs": [dict(e[3]) for e in ready],
            "text_offset": [e[0] for e in ready],
        }


def _chat_entry(text: str, lp: float, alts: list[tuple[str, float]]) -> dict[str, Any]:
    entry: dict[str, Any] = {"token": text, "logprob": lp, "bytes": list(text.encode())}
    entry["top_logprobs"] = [{"token": a, "logprob": x, "bytes": list(a.encode())} for a, x in alts]
    return entry


def _lp(token: Any) -> float:
    value = token.get("logprob") if isinstance(token, dict) else None
    return float(value) if isinstance(value, int | float) else -9999.0


class TokenReader:
    """Turns TGI tokens (or a whole generated text) into events, cutting at stop strings.

    `prompt_chars` (the length of the prompt sent) is what the prompt side of usage is
    estimated from when TGI does not count it."""

    def __init__(self, stops: list[str], logprobs: _Logprobs | None, prompt_chars: int = 0) -> None:
        self.cutter = StopCutter(stops)
        self.stops = frozenset(stops)
        self.logprobs = logprobs
        self.prompt_chars = prompt_chars
        self.stopped = False
        self.finished = False
        self.cut = False
        """A stream was cut at a stop string before TGI's final event: TGI is still
        generating, and the stream must be closed rather than read to its end."""
        self.tokens = 0  # token events read (TGI streams one event per generated token)
        self.chars = 0  # text emitted

    def _emit(self, text: str, out: list[Event], everything: bool = False) -> None:
        lp = self.logprobs.take(len(text), everything) if self.logprobs else None
        if text or lp:
            self.chars += len(text)
            out.append(TextDelta(text, logprobs=lp))

    def token(self, token: dict[str, Any], tops: Any, out: list[Event]) -> None:
        self.tokens += 1
        text = token.get("text") or ""
        if token.get("special"):
            if text in self.stops:  # a special token named as a stop string
                self.stopped = True
                self._emit(self.cutter.flush(), out)
            return
        if self.logprobs:
            self.logprobs.add(token, tops)
        self._emit(self.cutter.feed(text), out)
        self.stopped = self.cutter.stopped

    def text(self, text: str, out: list[Event]) -> None:
        self._emit(self.cutter.feed(text), out)
        self.stopped = self.cutter.stopped

    def finish(self, reason: str | None, out: list[Event]) -> None:
        if not self.stopped:
            self._emit(self.cutter.flush(), out, everything=True)
        self.finished = True
        out.append(Finish("stop" if self.stopped else normalize_finish(reason)))

    def usage(self, prompt: Any, completion: Any) -> Usage:
        """Usage from the counts TGI gave (`None` or a non-count: not given); what is
        missing is estimated, from the prompt sent and the text emitted."""
        estimated = False
        if not _is_count(prompt):
            prompt, estimated = estimate_tokens(self.prompt_chars), True
        if not _is_count(completion):
            completion, estimated = estimate_tokens(self.chars), True
        return Usage(prompt, completion, estimated=estimated)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _header_count(headers: Any, name: str) -> int | None:
    value = headers.get(name) if headers is not None else None
    return int(value) if isinstance(value, str) and value.isdigit() else None


def generated_events(
    label: str, data: Any, reader: TokenReader
) -> tuple[list[Event], dict[str, Any]]:
    """Events of one non-streamed TGI answer (`{"generated_text", "details"}`), and its
    `details` (`{}` without). Shared with the SageMaker adapter."""
    if not isinstance(data, dict) or not isinstance(data.get("generated_text"), str):
        raise UpstreamError(f"{label} answered without generated_text", backend=label)
    details = data.get("details") or {}
    out: list[Event] = []
    if reader.logprobs is not None:
        tops = details.get("top_tokens") or []
        for i, token in enumerate(details.get("tokens") or ()):
            if not token.get("special"):
                reader.logprobs.add(token, tops[i] if i < len(tops) else [])
    reader.text(data["generated_text"], out)
    reader.finish(details.get("finish_reason"), out)
    return out, details


class TGIBackend(Backend):
    Settings = TGISettings
    supported_params = frozenset(
        {"max_tokens", "temperature", "top_p", "stop", "seed", "frequency_penalty"}
        | {"response_format", "logprobs", "top_logprobs"}
    )
    supported_extras = frozenset(
        {"top_k", "repetition_penalty", "typical_p", "truncate", "watermark", "do_sample"}
        | {"adapter_id", "grammar"}
    )

    def __init__(self, config: DeploymentConfig) -> None:
        super().__init__(config)
        assert isinstance(config, TGISettings)
        self.settings = config
        self.prompts = PromptBuilder(config, strip_bos=True)
        self.http = HttpUpstream.for_deployment(config, self.label, error_mapper=tgi_error)
        self._info: TGIInfo | None = None
        self._info_retry_at = 0.0
        self._info_lock: asyncio.Lock | None = None
        self._info_timeout = min(config.timeout, 10.0)
        self._prefix_lock = asyncio.Lock()
        self._prefix: int | None = None  # the token id TGI puts before every input (BOS)
        self._prefix_known = False

    @property
    def uses_server_template(self) -> bool:
        """Chats are rendered by TGI with the model's own template (no template in the entry)."""
        return self.prompts.template is None and self.settings.use_server_template

    async def start(self) -> None:
        self._info_lock = asyncio.Lock()
        await self.http.start()
        if self.uses_server_template:
            await check_server_template(
                self.label,
                lambda: self.server_prompt(PROBE_MESSAGES, timeout=STARTUP_CHECK_SECONDS),
            )

    async def close(self) -> None:
        await self.http.close()

    async def health(self) -> None:
        """Raise an UpstreamError unless TGI's `/health` answers 200 (model loaded)."""
        async with self.http.request("GET", "/health", timeout=self._info_timeout):
            pass

    async def probe(self) -> dict[str, Any]:
        """`check --probe`: health, and where chat templates come from (the model's own,
        rendered by TGI, is asked for)."""
        found = await super().probe()
        template = self.prompts.template
        if template is not None:
            found["template"] = template.name
        elif not self.settings.use_server_template:
            found["template"] = "none: set prompt_template (use_server_template is false)"
        else:
            try:
                await self.server_prompt(PROBE_MESSAGES)
            except UpstreamRejected as exc:
                if exc.retryable:
                    raise
            found["template"] = "from server"
        return found

    # -- the model's own chat template, applied by TGI --------------------------------------
    async def prompt(self, request: InferenceRequest) -> tuple[str, list[str]]:
        """The `inputs` for `request` and the stop strings to enforce: a chat rendered with
        the entry's template, or by TGI with the model's own; a completion's prompt as given."""
        if request.kind == "chat" and self.uses_server_template:
            return await self.server_prompt(request.messages or []), merge_stops((), request.stop)
        return self.prompts.build(request)

    async def server_prompt(self, messages: Any, *, timeout: float | None = None) -> str:
        """`messages` rendered by TGI with the model's chat template (`POST /chat_tokenize`),
        without the BOS /generate adds itself. Raises `DeploymentMisconfigured` when TGI has
        no template (or no /chat_tokenize); a conversation the template refuses is TGI's 422,
        a 400."""
        msgs, marker = server_messages(messages)
        body = {"model": "tgi", "messages": msgs}  # any other model is taken as a LoRA id
        try:
            async with self.http.post("/chat_tokenize", body, timeout=timeout) as resp:
                data = await self.http.read_json(resp)
        except UpstreamRejected as exc:
            if exc.status == 404:
                raise no_template(
                    self.label,
                    "TGI answered 404 to POST /chat_tokenize, which applies it: an older TGI "
                    "without that route, a model without a fast tokenizer, or a `url` that "
                    "is not TGI's base URL",
                ) from None
            if "template not found" in exc.message.lower():
                raise no_template(self.label, "TGI reports none for this model") from None
            raise
        text = data.get("templated_text") if isinstance(data, dict) else None
        if not isinstance(text, str):
            raise UpstreamError(
                f"{self.label} sent an unexpected /chat_tokenize answer: {str(data)[:200]}",
                backend=self.label,
            )
        tokens = data.get("tokenize_response")
        first = tokens[0] if isinstance(tokens, list) and tokens else None
        if isinstance(first, dict) and first.get("start") == 0:
            prefix = await self.added_prefix(timeout=timeout)
            piece = first.get("text")
            if (
                prefix is not None
                and first.get("id") == prefix
                and isinstance(piece, str)
                and piece
                and text.startswith(piece)
            ):
                text = text[len(piece) :]
        return cut_continuation(text, marker, self.label)

    async def added_prefix(self, *, timeout: float | None = None) -> int | None:
        """The id of the special token TGI's tokenizer puts before every /generate input
        (BOS), None when it adds none: read once per deployment from `POST /tokenize`, where
        such a token has an empty span at 0."""
        if self._prefix_known:
            return self._prefix
        async with self._prefix_lock:
            if not self._prefix_known:
                payload = {"inputs": "Hi"}
                async with self.http.post("/tokenize", payload, timeout=timeout) as resp:
                    data = await self.http.read_json(resp)
                first = data[0] if isinstance(data, list) and data else None
                added = (
                    isinstance(first, dict)
                    and first.get("start") == first.get("stop") == 0
                    and isinstance(first.get("id"), int)
                )
                self._prefix = first["id"] if added else None  # type: ignore[index]
                self._prefix_known = True
        return self._prefix

    # -- /info ----------------------------------------------------------------------------
    async def info(self) -> TGIInfo:
        """The router limits, read from /info once (defaults while it cannot be read)."""
        if self._info is not None:
            return self._info
        if time.monotonic() < self._info_retry_at:
            return TGIInfo()
        lock = self._info_lock or asyncio.Lock()
        async with lock:
            if self._info is not None:
                return self._info
            try:
                async with self.http.request("GET", "/info", timeout=self._info_timeout) as resp:
                    self._info = TGIInfo.parse(await self.http.read_json(resp))
                return self._info
            except UpstreamError as exc:
                log.warning("%s: cannot read /info (%s); using defaults", self.label, exc)
                self._info_retry_at = time.monotonic() + INFO_RETRY_SECONDS
                return TGIInfo()

    def forget_info(self) -> None:
        """Read /info again on the next request (the server may have restarted)."""
        self._info = None
        self._info_retry_at = 0.0

    async def count_tokens(self, request: InferenceRequest) -> int | None:
        """The prompt's token count from `POST /tokenize` (one entry per token): the prompt
        rendered as `stream` sends it, tokenized as TGI does for generation."""
        prompt, _ = self.prompts.build(request)
        async with self.http.post("/tokenize", {"inputs": prompt}) as resp:
            data = await self.http.read_json(resp)
        return len(data) if isinstance(data, list) else None

    # -- generation -----------------------------------------------------------------------
    async def stream(self, request: InferenceRequest) -> AsyncIterator[list[Event]]:
        prompt, stops = await self.prompt(request)
        if not prompt:
            param = "prompt" if request.kind == "completion" else "messages"
            raise InvalidRequest("TGI cannot generate from an empty prompt.", param=param)
        if request.max_tokens == 0:  # legacy completions allow it: nothing to generate
            yield [Finish("length")]
            return
        info = await self.info()
        parameters = translate_params(request, info)
        template = self.prompts.template
        eos = template.eos_token if template is not None and request.kind == "chat" else None
        sent, unsent = stops_for_tgi(stops, request.stop, eos, info.max_stop_sequences)
        parameters.update(details=True, return_full_text=False)
        if sent:
            parameters["stop"] = sent
        payload = {"inputs": prompt, "parameters": parameters}
        top = parameters.get("top_n_tokens", 0)
        wants = request.params.get("logprobs")
        logprobs = _Logprobs(request.kind == "chat", top) if wants else None
        reader = TokenReader(stops, logprobs, len(prompt))
        try:
            # Stops TGI was not sent are cut here; only a stream can then be closed, which
            # ends the generation (/generate would run on to max_new_tokens or EOS).
            if request.stream or unsent:
                async for batch in self._generate_stream(payload, reader):
                    yield batch
            else:
                yield await self._generate(payload, reader)
        except UpstreamError as exc:
            if not isinstance(exc, UpstreamRejected):
                self.forget_info()
            raise

    async def _generate(self, payload: dict[str, Any], reader: TokenReader) -> list[Event]:
        async with self.http.post("/generate", payload) as resp:
            data = await self.http.read_json(resp)
            headers = resp.headers
        out, details = generated_events(self.label, data, reader)
        completion = details.get("generated_tokens")
        if not _is_count(completion):
            completion = _header_count(headers, "x-generated-tokens")
        out.append(reader.usage(_header_count(headers, "x-prompt-tokens"), completion))
        return out

    async def _generate_stream(
        self, payload: dict[str, Any], reader: TokenReader
    ) -> AsyncIterator[list[Event]]:
        def take(event: ServerSentEvent, batch: list[Event]) -> bool:
            # a cut is not the protocol's end: the response must not be read on to it
            return self._event(event.data, reader, batch) and not reader.cut

        parser = ItemParser(self.label, SSEDecoder(), take)
        async with (
            self.http.post("/generate_stream", payload) as resp,
            aclosing(self.http.events(resp, parser)) as batches,
        ):
            async for batch in batches:
                yield batch
                if reader.cut:
                    # Cut at a stop string before TGI's end: leaving now closes the
                    # response unread, which ends the request, and TGI stops generating.
                    return

    def _event(self, data: bytes, reader: TokenReader, out: list[Event]) -> bool:
        """Handle one SSE event; True when no more are wanted: the answer is complete, or
        was cut at a stop string before TGI's final event (then `reader.cut`)."""
        if reader.finished:
            return True
        event = load_json(self.label, data)
        if not isinstance(event, dict):
            raise UpstreamError(f"{self.label} sent an invalid stream event", backend=self.label)
        if event.get("error") is not None:
            raise event_error(self.label, event)
        reader.token(event.get("token") or {}, event.get("top_tokens"), out)
        final = event.get("generated_text") is not None
        if not final and not reader.stopped:
            return False
        details = (event.get("details") or {}) if final else {}
        reader.finish(details.get("finish_reason"), out)
        reader.cut = not final
        completion = details.get("generated_tokens")
        if not _is_count(completion):
            completion = reader.tokens  # one event per token: those read (all, if cut)
        out.append(reader.usage(details.get("input_length"), completion))
        return True
