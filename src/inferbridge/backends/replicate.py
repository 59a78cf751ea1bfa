"""Replicate: one prediction per request, streamed from its SSE URL or polled to the end.

Create with `POST {url}/models/{owner}/{name}/predictions` (`model:`), `/deployments/...`
(`deployment:`) or `/predictions` + `version` (`version:`). Streaming requests send
`"stream": true` and read `urls.stream`: `output` events are plain text (SSEDecoder strips
exactly one space after `data:`, so a token's own leading space survives), then `done` or
`error`; the prediction is fetched once afterwards for its `metrics`. Other requests (and
models without `urls.stream`) send `Prefer: wait` and poll `urls.get` until terminal.

Inputs are model-specific: `input_map` renames OpenAI parameters over `DEFAULT_INPUT_MAP`
(null = unsupported), `input:` adds static inputs. Chats are rendered with the entry's chat
template; without one, a single-turn chat goes out as `prompt` + `system_prompt`; with
`messages_input: true` the messages are sent as they are. Stop strings are sent comma-joined
and always enforced here too. Finish: "stop" on a stop string, "length" when the output
reached `max_tokens` (metrics, else output item count), else "stop"; usage from metrics.

A prediction still running when the request ends early (disconnect, stop string, broken
stream) is cancelled, shielded from the request's own cancellation and bounded in time.
See docs/backends/replicate.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
from pydantic import Field, model_validator

from inferbridge.backends.base import OPENAI_PARAMS, Backend
from inferbridge.backends.http import HttpUpstream
from inferbridge.backends.prompting import PromptBuilder, PromptSettings
from inferbridge.decoders import ServerSentEvent, SSEDecoder
from inferbridge.errors import InvalidRequest, UpstreamError, UpstreamTimeout
from inferbridge.events import Event, Finish, TextDelta, Usage
from inferbridge.request import InferenceRequest, message_text
from inferbridge.stops import StopCutter

log = logging.getLogger(__name__)

# OpenAI name (or "prompt"/"system"/"messages", or an extra like top_k) -> Replicate input.
DEFAULT_INPUT_MAP: dict[str, str | None] = {
    "prompt": "prompt",
    "system": "system_prompt",
    "messages": "messages",
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "stop": "stop_sequences",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "top_k": "top_k",
    "min_tokens": "min_tokens",
    "repetition_penalty": "repetition_penalty",
}
TRANSLATED_PARAMS = frozenset(
    {"max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty",
     "frequency_penalty"}
)  # fmt: skip
STRUCTURAL = frozenset({"prompt", "system", "messages"})
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
SSE_HEADERS = {"Accept": "text/event-stream", "Cache-Control": "no-store"}


class ReplicateSettings(PromptSettings):
    url: str = "https://api.replicate.com/v1"
    model: str | None = Field(default=None, description="An official model, 'owner/name'.")
    version: str | None = Field(
        default=None, description="A model version id (or 'owner/name:id')."
    )
    deployment: str | None = Field(default=None, description="A deployment, 'owner/name'.")
    input_map: dict[str, str | None] = Field(
        default_factory=dict,
        description="OpenAI parameter (or prompt/system/messages) -> the model's input name; "
        "null marks it unsupported. Merged over DEFAULT_INPUT_MAP.",
    )
    input: dict[str, Any] = Field(
        default_factory=dict, description="Static inputs sent with every prediction."
    )
    strip_bos: bool = Field(
        default=True,
        description="Drop the template's leading BOS (Replicate's LLMs add it when tokenizing).",
    )
    messages_input: bool = Field(
        default=False, description="The model takes the chat messages as an input."
    )
    wait: bool | int = Field(
        default=True,
        description="Prefer: wait on non-streaming creates (true = 60 s, N = 1..60 s, false).",
    )
    poll_interval: float = Field(default=0.5, gt=0)
    cancel_timeout: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> ReplicateSettings:
        targets = [t for t in (self.model, self.version, self.deployment) if t]
        if len(targets) > 1:
            raise ValueError("set one of model, version or deployment")
        if self.version and ":" in self.version:
            self.version = self.version.rsplit(":", 1)[1]
        if not targets and self.target_model.count("/") != 1:
            raise ValueError(
                "set model: OWNER/NAME (or version / deployment); the entry's name or "
                "upstream_model is used only when it has the form owner/name"
            )
        for key in ("model", "deployment"):
            value = getattr(self, key)
            if value and value.count("/") != 1:
                raise ValueError(f"{key} must have the form owner/name")
        unknown = set(self.input_map) & (OPENAI_PARAMS - TRANSLATED_PARAMS)
        if unknown:
            raise ValueError(f"input_map: cannot translate {', '.join(sorted(unknown))}")
        if not isinstance(self.wait, bool) and not 1 <= self.wait <= 60:
            raise ValueError("wait must be true, false or 1..60 seconds")
        return self


class _Run:
    """Output of one prediction so far: text through the stop cutter, counts, final events."""

    def __init__(self, stops: list[str], max_tokens: int | None) -> None:
        self.cutter = StopCutter(stops)
        self.max_tokens = max_tokens
        self.items: int | None = 0  # output items seen (None: output is one growing string)
        self.seen_text = 0
        self.terminal = False

    def feed(self, text: str) -> list[Event]:
        out = self.cutter.feed(text)
        return [TextDelta(out)] if out else []

    def item(self, text: str) -> list[Event]:
        """One streamed output event (usually one token)."""
        if self.items is not None:
            self.items += 1
        return self.feed(text)

    def snapshot(self, output: Any) -> list[Event]:
        """New output in a polled prediction's `output` (a list of pieces or one string)."""
        if isinstance(output, list):
            assert self.items is not None
            new, self.items = output[self.items :], len(output)
            return self.feed("".join(str(p) for p in new if p is not None))
        if isinstance(output, str):
            self.items = None
            new, self.seen_text = output[self.seen_text :], len(output)
            return self.feed(new)
        return []

    def finish(self, prediction: dict[str, Any] | None) -> list[Event]:
        out: list[Event] = []
        rest = self.cutter.flush()
        if rest:
            out.append(TextDelta(rest))
        metrics = (prediction or {}).get("metrics") or {}
        produced = metrics.get("output_token_count")
        if not isinstance(produced, int):
            produced = self.items
        if self.cutter.stopped:
            reason = "stop"
        elif self.max_tokens is not None and produced is not None and produced >= self.max_tokens:
            reason = "length"
        else:
            reason = "stop"
        out.append(Finish(reason))
        prompt_tokens = metrics.get("input_token_count")
        if isinstance(prompt_tokens, int) and isinstance(metrics.get("output_token_count"), int):
            out.append(Usage(prompt_tokens, metrics["output_token_count"]))
        return out


class ReplicateBackend(Backend):
    Settings = ReplicateSettings

    def __init__(self, config: ReplicateSettings) -> None:  # type: ignore[override]
        super().__init__(config)
        self.settings = config
        self.input_map = {**DEFAULT_INPUT_MAP, **config.input_map}
        mapped = {k for k, v in self.input_map.items() if v}
        # `stop` is always honoured: enforced here even when the model has no stop input.
        self.supported_params = frozenset((mapped & TRANSLATED_PARAMS) | {"stop"})  # type: ignore[misc]
        self.supported_extras = frozenset(mapped - TRANSLATED_PARAMS - STRUCTURAL)  # type: ignore[misc]
        self.prompts = PromptBuilder(config, strip_bos=config.strip_bos)
        self.http = HttpUpstream.for_deployment(config, self.label)
        self._cancels: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.http.start()

    async def close(self) -> None:
        if self._cancels:
            await asyncio.gather(*self._cancels, return_exceptions=True)
        await self.http.close()

    # -- request translation ------------------------------------------------------------
    def build_input(self, request: InferenceRequest) -> tuple[dict[str, Any], list[str]]:
        """The prediction's `input` and the stop strings to enforce."""
        cfg, names = self.settings, self.input_map
        inp = dict(cfg.input)
        stops = list(request.stop)
        if request.kind == "chat" and cfg.messages_input:
            inp[self._name("messages", request)] = request.messages
        elif request.kind == "chat" and self.prompts.template is None:
            system, prompt = self._single_turn(request)
            inp[self._name("prompt", request)] = prompt
            if system is not None:
                inp[self._name("system", request)] = system
        else:
            prompt, stops = self.prompts.build(request)
            inp[self._name("prompt", request)] = prompt
        for key, value in (*request.params.items(), *request.extras.items()):
            field = names.get(key)
            if field and key != "stop":
                inp[field] = value
        sendable = [s for s in stops if "," not in s]
        if names.get("stop") and sendable:
            inp[names["stop"]] = ",".join(sendable)  # Replicate LLMs: a comma-separated string
        return inp, stops

    def _name(self, key: str, request: InferenceRequest) -> str:
        name = self.input_map.get(key)
        if not name:
            param = "messages" if key in ("system", "messages") else "prompt"
            raise InvalidRequest(
                f"Model '{request.model}' has no '{key}' input (input_map.{key} is null).",
                param=param,
            )
        return name

    def _single_turn(self, request: InferenceRequest) -> tuple[str | None, str]:
        messages = request.messages or []
        system = [m for m in messages if m.get("role") in ("system", "developer")]
        rest = [m for m in messages if m.get("role") not in ("system", "developer")]
        if len(rest) != 1 or rest[0].get("role") != "user" or len(system) > 1:
            raise InvalidRequest(
                f"Model '{request.model}' applies its own prompt format to one user message "
                "(and an optional system message). For multi-turn chats set prompt_template "
                "or chat_template_file in its entry, or messages_input: true if the model "
                "takes messages.",
                param="messages",
            )
        sys_text = message_text(system[0].get("content")) if system else None
        return sys_text, message_text(rest[0].get("content"))

    def _create_path(self) -> str:
        cfg = self.settings
        if cfg.version:
            return "/predictions"
        if cfg.deployment:
            return f"/deployments/{segments(cfg.deployment)}/predictions"
        return f"/models/{segments(cfg.model or cfg.target_model)}/predictions"

    def followable(self, url: Any) -> str | None:
        """An upstream-supplied URL (`urls.get`, `urls.stream`, `urls.cancel`) that may be
        sent the Replicate token: the configured origin's scheme (https for the real API)
        and its host, or a subdomain of replicate.com when that is the configured host.
        None for anything else (it is not followed)."""
        if not isinstance(url, str) or not url:
            return None
        ours, theirs = urlsplit(self.http.base_url), urlsplit(url)
        if theirs.scheme != ours.scheme or theirs.username or theirs.password:
            return None
        host, home = theirs.hostname or "", ours.hostname or ""
        same = host == home and theirs.port == ours.port
        replicate = (
            home.endswith("replicate.com")
            and theirs.scheme == "https"
            and (host == "replicate.com" or host.endswith(".replicate.com"))
        )
        return url if same or replicate else None

    # -- the request ----------------------------------------------------------------------
    async def stream(self, request: InferenceRequest) -> AsyncIterator[list[Event]]:
        inp, stops = self.build_input(request)
        body: dict[str, Any] = {"input": inp}
        cfg = self.settings
        if cfg.version:
            body["version"] = cfg.version
        headers = None
        if request.stream:
            body["stream"] = True
        elif cfg.wait:
            headers = {"Prefer": "wait" if cfg.wait is True else f"wait={cfg.wait}"}
        async with self.http.post(self._create_path(), body, headers=headers) as resp:
            prediction = await self.http.read_json(resp)
        if not isinstance(prediction, dict) or not prediction.get("id"):
            raise UpstreamError(
                f"{self.label} returned no prediction: {prediction!r:.200}", backend=self.label
            )
        run = _Run(stops, request.max_tokens)
        try:
            url = self.followable((prediction.get("urls") or {}).get("stream"))
            if request.stream and url and prediction.get("status") not in TERMINAL:
                async for batch in self._follow_stream(url, prediction, run):
                    yield batch
            else:
                async for batch in self._poll(prediction, run):
                    yield batch
        finally:
            if not run.terminal:
                await self._cancel(prediction)

    async def _follow_stream(
        self, url: str, prediction: dict[str, Any], run: _Run
    ) -> AsyncIterator[list[Event]]:
        done: dict[str, Any] | None = None
        async with self.http.request("GET", url, headers=SSE_HEADERS) as resp:
            async for events in self._sse_reads(resp):
                batch: list[Event] = []
                for event in events:
                    if event.event == "output":
                        batch.extend(run.item(event.data.decode("utf-8", "replace")))
                    elif event.event == "error":
                        run.terminal = True
                        raise self._failed(prediction, _detail(event.data))
                    elif event.event == "done":
                        done = _json(event.data)
                        break
                if run.cutter.stopped:  # a stop string: end here (the prediction is cancelled)
                    yield [*batch, *run.finish(None)]
                    return
                if batch:
                    yield batch
                if done is not None:
                    break
        if done is None:
            raise UpstreamError(
                f"{self.label} ended the stream before the prediction was done", backend=self.label
            )
        run.terminal = True
        reason = done.get("reason")
        if reason in ("error", "canceled"):
            final = await self._get(prediction, quiet=True) or prediction
            if reason == "canceled":
                raise self._canceled(prediction)
            raise self._failed(prediction, final.get("error") or "unknown error")
        yield run.finish(await self._get(prediction, quiet=True))

    async def _poll(self, prediction: dict[str, Any], run: _Run) -> AsyncIterator[list[Event]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.timeout
        while True:
            batch = run.snapshot(prediction.get("output"))
            status = prediction.get("status")
            if status in TERMINAL:
                run.terminal = True
                if status == "failed":
                    raise self._failed(prediction, prediction.get("error") or "unknown error")
                if status == "canceled":
                    raise self._canceled(prediction)
                yield [*batch, *run.finish(prediction)]
                return
            if run.cutter.stopped:
                yield [*batch, *run.finish(None)]
                return
            if batch:
                yield batch
            if loop.time() > deadline:
                raise UpstreamTimeout(
                    f"{self.label}: prediction {prediction['id']} did not "
                    f"finish in {self.settings.timeout:g} s",
                    backend=self.label,
                )
            await asyncio.sleep(self.settings.poll_interval)
            prediction = await self._get(prediction) or prediction

    # -- helpers ----------------------------------------------------------------------------
    async def _sse_reads(self, resp: Any) -> AsyncIterator[list[ServerSentEvent]]:
        """The SSE events of each read, then any last event left unterminated at EOF."""
        decoder = SSEDecoder()
        async for raw in self.http.iter_chunks(resp):
            yield decoder.feed(raw)
        yield decoder.flush()

    def prediction_url(self, prediction: dict[str, Any], kind: str) -> str:
        url = self.followable((prediction.get("urls") or {}).get(kind))
        if url is not None:
            return url
        suffix = "/cancel" if kind == "cancel" else ""
        return f"/predictions/{quote(str(prediction['id']), safe='')}{suffix}"

    async def _get(self, prediction: dict[str, Any], quiet: bool = False) -> dict[str, Any] | None:
        try:
            async with self.http.request("GET", self.prediction_url(prediction, "get")) as resp:
                data = await self.http.read_json(resp)
        except UpstreamError:
            if not quiet:
                raise
            log.debug("%s: could not fetch prediction %s", self.label, prediction["id"])
            return None
        return data if isinstance(data, dict) else None

    def _failed(self, prediction: dict[str, Any], error: Any) -> UpstreamError:
        err = UpstreamError(
            f"{self.label}: prediction {prediction['id']} failed: {error}", backend=self.label
        )
        err.retryable = False  # the model failed on this input: a retry is billed again
        return err

    def _canceled(self, prediction: dict[str, Any]) -> UpstreamError:
        return UpstreamError(
            f"{self.label}: prediction {prediction['id']} was canceled", backend=self.label
        )

    async def _cancel(self, prediction: dict[str, Any]) -> None:
        """Cancel an unfinished prediction, even while the request itself is being cancelled."""
        task = asyncio.ensure_future(self._send_cancel(self.prediction_url(prediction, "cancel")))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)
        await asyncio.shield(task)

    async def _send_cancel(self, url: str) -> None:
        try:
            async with asyncio.timeout(self.settings.cancel_timeout):
                async with self.http.request("POST", url):
                    pass
        except (UpstreamError, TimeoutError) as exc:
            log.warning("%s: could not cancel prediction (%s): %s", self.label, url, exc)


def _json(data: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(data) if data.strip() else {}
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def segments(path: str) -> str:
    """A path from config (`owner/name`), each segment percent-encoded."""
    return "/".join(quote(part, safe="") for part in path.split("/"))


def _detail(data: bytes) -> str:
    value = _json(data)
    for key in ("detail", "error", "message"):
        if isinstance(value.get(key), str):
            return value[key]
    return data.decode("utf-8", "replace") or "unknown error"
