"""Amazon SageMaker endpoints through boto3 (InvokeEndpoint / InvokeEndpointWithResponseStream).

The container behind the endpoint is the Hugging Face LLM container (TGI). Two payloads:

- `payload: tgi` (default): TGI's generate format `{"inputs", "parameters", "stream"}`. This
  is the `tgi` adapter over another transport: `SageMakerBackend` subclasses `TGIBackend` and
  only replaces its transport hooks, so prompts (chat templates), parameter translation, stop
  strings, logprobs, token events and usage are handled by the same code. The reply is
  `[{"generated_text", "details"}]`, or SSE `data:{token...}` events when streaming. Usage
  is the container's counts (`details.generated_tokens`, and on streams the final event's
  `details.input_length`); what it does not give is estimated and marked so: the prompt
  side of non-streamed answers (TGI gives it only in the `x-prompt-tokens` header, which
  SageMaker drops), the prompt side of streams from containers whose final event has no
  `input_length` or that were cut at a stop string, everything without `details`.
- `payload: messages`: the container's Messages API (`{"messages", ...}`, or `{"prompt", ...}`
  for completions); replies are OpenAI-shaped and decoded with the openai_compat helpers.

Embeddings (`mode: embeddings`): endpoints running the Hugging Face TEI container (Text
Embeddings Inference). InvokeEndpoint with `{"inputs": [texts or token ids]}` (and the
request's `truncate`, `normalize`, `truncation_direction`, `prompt_name`) answers a list of
vectors; batches default to 32 inputs (TEI's `--max-client-batch-size`); TEI counts no
tokens in the body, so usage is estimated.

boto3 is synchronous, so every call runs in a dedicated thread pool (one pooled connection
per thread). A streamed call is read in its worker thread: each `PayloadPart` is handed to the
event loop through an asyncio queue as it arrives and the bytes are reassembled into SSE lines
there (a part may end in the middle of a line). When the client goes away, or the total
`timeout` passes, the reader's socket is shut down so the upstream call ends.

Credentials come from the standard AWS chain (environment, `aws_profile`, instance or task
role); `api_key` is not used.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, suppress
from functools import partial
from typing import Any, Literal

import orjson
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.session import Session
from pydantic import Field, model_validator

from inferbridge.backends.base import Backend
from inferbridge.backends.embedding import float_vectors
from inferbridge.backends.http import load_json, status_error
from inferbridge.backends.openai_compat import chunk_events, response_events
from inferbridge.backends.prompting import PromptBuilder, PromptSettings
from inferbridge.backends.tgi import (
    TGIBackend,
    TokenReader,
    event_error,
    generated_events,
    tgi_error,
)
from inferbridge.backends.tgi_params import DEFAULT_MAX_STOP_SEQUENCES, TGIInfo
from inferbridge.decoders import ServerSentEvent, SSEDecoder
from inferbridge.errors import UpstreamError, UpstreamTimeout
from inferbridge.events import Embeddings, Event
from inferbridge.request import InferenceRequest

ENDPOINT_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
MESSAGES_PARAMS = frozenset(
    {"max_tokens", "temperature", "top_p", "stop", "seed", "frequency_penalty"}
    | {"presence_penalty", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice"}
)


class SageMakerSettings(PromptSettings):
    """Entry fields of the `sagemaker` backend (`url` is an endpoint_url override)."""

    endpoint_name: str | None = Field(
        default=None, description="The SageMaker endpoint (default: upstream_model, else name)."
    )
    region: str | None = Field(default=None, description="AWS region (default: AWS config).")
    aws_profile: str | None = Field(default=None, description="A profile of ~/.aws/config.")
    payload: Literal["tgi", "messages"] = "tgi"
    custom_attributes: str | None = Field(default=None, max_length=1024)
    inference_component: str | None = Field(default=None, max_length=63)
    target_variant: str | None = None
    max_stop_sequences: int = Field(default=DEFAULT_MAX_STOP_SEQUENCES, ge=0)
    max_concurrency: int = Field(default=64, ge=1, description="Worker threads / connections.")
    retries: int = Field(default=0, ge=0, le=10, description="botocore retries per call.")

    @model_validator(mode="after")
    def _check_sagemaker(self) -> SageMakerSettings:
        if self.api_key:
            raise ValueError(
                "api_key is not used by the sagemaker backend: requests are signed with AWS "
                "credentials (environment, aws_profile, or the instance/task role)"
            )
        if not ENDPOINT_NAME.fullmatch(self.endpoint):
            raise ValueError(
                f"'{self.endpoint}' is not a valid SageMaker endpoint name (letters, digits "
                "and hyphens, at most 63 characters): set endpoint_name"
            )
        return self

    @property
    def endpoint(self) -> str:
        return self.endpoint_name or self.target_model

    def describe(self) -> str:
        where = f" in {self.region}" if self.region else ""
        return f"backend '{self.backend}' (model {self.name}, endpoint {self.endpoint}{where})"


# -- errors -------------------------------------------------------------------------------------
_AUTH_CODES = "UnrecognizedClient InvalidSignature IncompleteSignature AccessDenied ExpiredToken"
_STATUS_OF_CODE = (
    dict.fromkeys(("Throttling", "ModelNotReady", "TooManyRequests"), 429)
    | dict.fromkeys(("InternalFailure", "InternalDependency"), 502)
    | dict.fromkeys((*_AUTH_CODES.split(), "MissingAuthenticationToken"), 403)
)


def aws_error(label: str, exc: BaseException) -> UpstreamError:
    """Map a boto3/botocore exception to the error inferbridge returns."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, ClientError):
        response: dict[str, Any] = exc.response
        code = response.get("Error", {}).get("Code") or ""
        message = response.get("Error", {}).get("Message") or str(exc)
        if code == "ModelError":  # the container answered 4xx/5xx (SageMaker says 424)
            original = response.get("OriginalStatusCode")
            body = str(response.get("OriginalMessage") or message).encode()
            return tgi_error(label, original if isinstance(original, int) else 502, body)
        if code in ("ModelStreamError", "InternalStreamFailure"):
            return UpstreamError(f"{label} broke the stream ({code}): {message}", backend=label)
        if code == "ValidationError" and re.match(r"Endpoint \S+ .*not found", message):
            text = f"{label}: {message} Check endpoint_name and region."
            return UpstreamError(text, backend=label)
        status = _STATUS_OF_CODE.get(code.removesuffix("Exception"))
        status = status or response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 502
        if status < 400 or status == 500 or status > 504:
            status = 502  # 500 InternalFailure, 530 InternalDependencyException...
        text = f"{code}: {message}" if code and not code.isdigit() else message
        return status_error(label, status, orjson.dumps({"message": text}))
    if isinstance(exc, ReadTimeoutError | ConnectTimeoutError):
        return UpstreamTimeout(f"{label} did not answer in time", backend=label)
    if isinstance(exc, EndpointConnectionError):
        return UpstreamError(f"{label} is unreachable: {exc}", backend=label)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return UpstreamError(f"{label}: no usable AWS credentials ({exc})", backend=label)
    return UpstreamError(f"{label} failed: {type(exc).__name__}: {exc}", backend=label)


def container_error(label: str, obj: Any) -> UpstreamError:
    """An error the container reported at HTTP 200 (TGI `{"error", "error_type"}`, or an
    OpenAI-style `{"error": {"message", "http_status_code"}}` from the Messages API)."""
    if not isinstance(obj, dict):
        return UpstreamError(f"{label} sent an unexpected event: {obj!r:.200}", backend=label)
    err = obj.get("error")
    status = err.get("http_status_code") or err.get("code") if isinstance(err, dict) else None
    if isinstance(status, int) and 400 <= status < 600:
        return tgi_error(label, status, orjson.dumps(obj))
    return event_error(label, obj)


# -- the streaming reader -----------------------------------------------------------------------
_END = object()
_SESSIONS: dict[str | None, Session] = {}
_SESSIONS_LOCK = threading.Lock()


class _StreamReader:
    """One InvokeEndpointWithResponseStream call, read in a worker thread.

    Each PayloadPart's bytes go to `queue` as they arrive; then `_END`, or the mapped error.
    `stop()` (from the loop) ends the call: the socket is shut down under the blocked read.
    After `detach()` (the answer is complete) it is read to its end instead, so that its
    connection goes back to the pool.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, label: str) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self._loop = loop
        self._label = label
        self._lock = threading.Lock()
        self._stopped = self._detached = False
        self._body: Any = None

    def _put(self, item: Any) -> None:
        if not self._stopped:
            with suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                self._loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def run(self, client: Any, args: dict[str, Any]) -> None:
        body = None
        try:
            body = client.invoke_endpoint_with_response_stream(**args)["Body"]
            with self._lock:
                self._body = body
                if self._stopped:  # the client left while the call was starting
                    return
            for event in body:
                if self._stopped and not self._detached:
                    return
                part = event.get("PayloadPart")
                if part and part.get("Bytes"):
                    self._put(part["Bytes"])
            self._put(_END)
        except Exception as exc:
            self._put(aws_error(self._label, exc))
        finally:
            if body is not None:
                with suppress(Exception):
                    body.close()

    def detach(self) -> None:
        self._detached = True

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            body = None if self._detached else self._body
        raw = getattr(body, "_raw_stream", None)  # the urllib3 response
        with suppress(Exception):
            raw.shutdown()  # type: ignore[union-attr]

    def expire(self) -> None:
        error = UpstreamTimeout(f"{self._label} did not answer in time", backend=self._label)
        self.queue.put_nowait(error)
        self.stop()


class SageMakerBackend(TGIBackend):
    """The TGI adapter's request translation and token handling, over boto3 instead of HTTP
    (`info`, `_generate` and `_generate_stream` are the transport hooks overridden here)."""

    Settings = SageMakerSettings
    health = None  # type: ignore[assignment]  # no runtime ping: judged by its requests
    embedding_extras = frozenset({"truncate", "normalize", "truncation_direction", "prompt_name"})
    default_embedding_batch_size = 32  # TEI's default --max-client-batch-size

    def __init__(self, config: SageMakerSettings) -> None:  # type: ignore[override]
        Backend.__init__(self, config)  # not TGIBackend's: there is no HTTP pool to build
        self.settings = config
        self.messages_api = config.payload == "messages"
        if self.messages_api:  # the container's own OpenAI layer takes OpenAI parameters
            self.supported_params = MESSAGES_PARAMS  # type: ignore[misc]
            self.supported_extras = frozenset()  # type: ignore[misc]
        self.prompts = PromptBuilder(config, strip_bos=True)  # TGI adds BOS itself
        self._tgi_info = TGIInfo(max_stop_sequences=config.max_stop_sequences)
        self._executor: ThreadPoolExecutor | None = None
        self._client: Any = None

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.settings
        self._executor = ThreadPoolExecutor(cfg.max_concurrency, f"sagemaker-{cfg.endpoint}")
        try:  # creating a boto3 client reads files and builds models: slow, off the loop
            loop = asyncio.get_running_loop()
            self._client = await loop.run_in_executor(self._executor, self._make_client)
        except (BotoCoreError, ValueError) as exc:
            msg = f"{self.label}: cannot create the SageMaker client: {exc}"
            raise UpstreamError(msg, backend=self.label) from exc

    def _make_client(self) -> Any:
        cfg = self.settings
        config = BotoConfig(
            connect_timeout=cfg.connect_timeout,
            read_timeout=cfg.timeout,
            max_pool_connections=cfg.max_concurrency,
            retries={"mode": "standard", "total_max_attempts": cfg.retries + 1},
            user_agent_extra="inferbridge",
        )
        with _SESSIONS_LOCK:  # one session per profile (they are not thread-safe), which
            if cfg.aws_profile not in _SESSIONS:  # loads the service model once for all
                _SESSIONS[cfg.aws_profile] = Session(profile=cfg.aws_profile)
            client = _SESSIONS[cfg.aws_profile].create_client(
                "sagemaker-runtime", region_name=cfg.region, endpoint_url=cfg.url, config=config
            )
        if cfg.headers:  # extra headers, added before SigV4 signs the request

            def add_headers(request: Any, **_: Any) -> None:
                for key, value in cfg.headers.items():
                    request.headers[key] = value

            client.meta.events.register("before-sign.sagemaker-runtime", add_headers)
        return client

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def info(self) -> TGIInfo:
        return self._tgi_info  # no /info behind SageMaker: the entry's max_stop_sequences

    # -- requests -------------------------------------------------------------------------
    def _call_args(self, body: dict[str, Any], stream: bool) -> dict[str, Any]:
        if self._client is None:
            raise UpstreamError(f"{self.label}: client not started", backend=self.label)
        cfg = self.settings
        args: dict[str, Any] = {
            "EndpointName": cfg.endpoint,
            "Body": orjson.dumps(body),
            "ContentType": "application/json",
            "Accept": "text/event-stream" if stream else "application/json",
        }
        if cfg.custom_attributes:  # X-Amzn-SageMaker-Custom-Attributes, e.g. accept_eula=true
            args["CustomAttributes"] = cfg.custom_attributes
        if cfg.inference_component:
            args["InferenceComponentName"] = cfg.inference_component
        if cfg.target_variant:
            args["TargetVariant"] = cfg.target_variant
        return args

    def stream(self, request: InferenceRequest) -> AsyncIterator[list[Event]]:
        return self._messages(request) if self.messages_api else super().stream(request)

    async def _generate(self, payload: dict[str, Any], reader: TokenReader) -> list[Event]:
        data = await self._invoke(self._call_args({**payload, "stream": False}, stream=False))
        item = data[0] if isinstance(data, list) and data else data  # [{"generated_text"...}]
        if isinstance(item, dict) and item.get("error"):
            raise container_error(self.label, item)
        out, details = generated_events(self.label, item, reader)
        # TGI's non-streamed details have no prompt count (it is in a header SageMaker
        # drops): estimated unless a container adds one
        out.append(reader.usage(details.get("input_length"), details.get("generated_tokens")))
        return out

    def _generate_stream(
        self, payload: dict[str, Any], reader: TokenReader
    ) -> AsyncIterator[list[Event]]:
        def handle(events: list[ServerSentEvent], out: list[Event]) -> bool:
            return any(self._event(event.data, reader, out) for event in events)

        args = self._call_args({**payload, "stream": True}, stream=True)
        return self._drive(args, handle, cut=lambda: reader.cut)

    async def _messages(self, request: InferenceRequest) -> AsyncIterator[list[Event]]:
        body = dict(request.params)
        if body.get("top_p", 0) >= 1:
            del body["top_p"]  # TGI rejects 1.0 (it means "off")
        chat = request.kind == "chat"
        body["messages" if chat else "prompt"] = request.messages if chat else request.prompt
        body["stream"] = request.stream
        if request.stream and request.include_usage:
            body["stream_options"] = {"include_usage": True}
        args = self._call_args(body, request.stream)
        if not request.stream:
            data = await self._invoke(args)
            if not isinstance(data, dict) or data.get("error"):
                raise container_error(self.label, data)
            yield response_events(data, chat)
            return
        async with aclosing(self._drive(args, partial(self._chunks, chat))) as batches:
            async for batch in batches:
                yield batch

    def _chunks(self, chat: bool, events: list[ServerSentEvent], out: list[Event]) -> bool:
        """OpenAI-shaped stream events -> `out`; True at `[DONE]`."""
        for event in events:
            if event.data == b"[DONE]":
                return True
            obj = load_json(self.label, event.data)
            if not isinstance(obj, dict) or obj.get("error"):
                raise container_error(self.label, obj)
            out.extend(chunk_events(obj, chat))
        return False

    async def embed(self, request: InferenceRequest) -> Embeddings:
        """A TEI container's `/invocations`: `{"inputs": [...]}` -> `[[...], ...]`."""
        body: dict[str, Any] = {"inputs": request.input or []}
        for key in self.embedding_extras.intersection(request.extras):
            body[key] = request.extras[key]
        data = await self._invoke(self._call_args(body, stream=False))
        if isinstance(data, dict) and data.get("error"):
            raise container_error(self.label, data)
        return Embeddings(float_vectors(self.label, data), None)

    # -- boto3 calls, off the event loop ----------------------------------------------------
    async def _invoke(self, args: dict[str, Any]) -> Any:
        """InvokeEndpoint in a worker thread; the parsed JSON reply."""

        def call() -> bytes:
            try:
                return self._client.invoke_endpoint(**args)["Body"].read()
            except Exception as exc:
                raise aws_error(self.label, exc) from exc

        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._executor, call)
            raw = await asyncio.wait_for(future, self.settings.timeout)
        except TimeoutError:
            msg = f"{self.label} did not answer in time"
            raise UpstreamTimeout(msg, backend=self.label) from None
        return load_json(self.label, raw, "answer")

    async def _drive(
        self,
        args: dict[str, Any],
        handle: Callable[[list[ServerSentEvent], list[Event]], bool],
        cut: Callable[[], bool] = lambda: False,
    ) -> AsyncIterator[list[Event]]:
        """InvokeEndpointWithResponseStream: `handle` turns the SSE events of each arrival of
        PayloadParts into events, and says when the answer is complete (`cut`: before its
        end). Parts may end anywhere, even inside a UTF-8 character: SSEDecoder only decodes
        complete lines."""
        loop = asyncio.get_running_loop()
        reader = _StreamReader(loop, self.label)
        timer = loop.call_later(self.settings.timeout, reader.expire)
        loop.run_in_executor(self._executor, reader.run, self._client, args)
        decoder, queue = SSEDecoder(), reader.queue
        try:
            while True:
                item = await queue.get()
                data: list[bytes] = []
                while isinstance(item, bytes):
                    data.append(item)
                    item = queue.get_nowait() if not queue.empty() else None
                events = decoder.feed(b"".join(data)) if data else []
                if item is _END:
                    events += decoder.flush()
                batch: list[Event] = []
                done = bool(events) and handle(events, batch)
                if batch:
                    yield batch
                if done:
                    if not cut():
                        reader.detach()
                    return
                if item is _END:
                    raise UpstreamError.truncated(self.label)
                if isinstance(item, BaseException):
                    raise item
        finally:
            timer.cancel()
            reader.stop()
