"""A fake SageMaker Runtime endpoint hosting the Hugging Face LLM container (TGI).

It speaks the wire protocol byte for byte (see the sagemaker protocol page):

- `POST /endpoints/{name}/invocations` answers like InvokeEndpoint: the container's JSON body,
  or an AWS rest-json error (`x-amzn-ErrorType` header + JSON body; a container 4xx/5xx
  becomes `ModelError` 424 with `OriginalStatusCode` / `OriginalMessage`).
- `POST /endpoints/{name}/invocations-response-stream` answers like
  InvokeEndpointWithResponseStream: an AWS event stream (binary framing with CRC32s) of
  `PayloadPart` events carrying the container's raw SSE bytes, optionally re-cut into parts
  of `part_size` bytes (so a `data:` line is split across parts), optionally ending with a
  modelled exception event (`ModelStreamError`, `InternalStreamFailure`).

The "container" behind it is a small TGI: generate payloads (`inputs` / `parameters`) with
TGI's validation rules, stop sequences (included in the text, as TGI does), `max_new_tokens`,
`details`, and the Messages API (`messages`, or `prompt` for completions) answering in
OpenAI shapes. It generates `tokens` then the EOS token.

With `container = "tei"` it is the Text Embeddings Inference container instead: `{"inputs":
text | [texts or token ids], "truncate", "normalize"}` -> a list of vectors
(`tests.fakes.embeddings.fake_vector`), at most `max_client_batch_size` inputs (else TEI's
422 validation error).
"""

from __future__ import annotations

import asyncio
import json
import struct
import zlib
from typing import Any

from aiohttp import web

from tests.fakes.base import FakeServer
from tests.fakes.embeddings import fake_vector

ACCOUNT = "123456789012"
EVENTSTREAM = "application/vnd.amazon.eventstream"


# -- AWS event-stream framing ---------------------------------------------------------------
def _string_header(name: str, value: str) -> bytes:
    raw_name, raw_value = name.encode(), value.encode()
    return (
        struct.pack(">B", len(raw_name))
        + raw_name
        + b"\x07"
        + struct.pack(">H", len(raw_value))
        + raw_value
    )


def event_message(headers: list[tuple[str, str]], payload: bytes) -> bytes:
    """One event-stream message: prelude (lengths + CRC), string headers, payload, CRC."""
    encoded = b"".join(_string_header(k, v) for k, v in headers)
    prelude = struct.pack(">II", 16 + len(encoded) + len(payload), len(encoded))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def payload_part(data: bytes) -> bytes:
    return event_message(
        [
            (":event-type", "PayloadPart"),
            (":content-type", "application/octet-stream"),
            (":message-type", "event"),
        ],
        data,
    )


def stream_exception(kind: str, message: str, error_code: str | None = None) -> bytes:
    body: dict[str, str] = {"Message": message}
    if error_code:
        body["ErrorCode"] = error_code
    return event_message(
        [
            (":exception-type", kind),
            (":content-type", "application/json"),
            (":message-type", "exception"),
        ],
        json.dumps(body).encode(),
    )


def aws_error(status: int, code: str, body: dict[str, Any]) -> web.Response:
    return web.json_response(
        body,
        status=status,
        headers={
            "x-amzn-ErrorType": f"{code}:http://internal.amazon.com/coral/com.amazon.sagemaker/",
            "x-amzn-RequestId": "0d1e2f3a-fake",
        },
    )


def model_error(endpoint: str, status: int, container_body: Any) -> web.Response:
    original = container_body if isinstance(container_body, str) else json.dumps(container_body)
    kind = "client" if status < 500 else "server"
    return aws_error(
        424,
        "ModelError",
        {
            "ErrorCode": f"{kind.upper()}_ERROR_FROM_MODEL",
            "Message": f'Received {kind} error ({status}) from primary with message "{original}". '
            f"See the CloudWatch log group /aws/sagemaker/Endpoints/{endpoint} in account "
            f"{ACCOUNT} for more information.",
            "OriginalStatusCode": status,
            "OriginalMessage": original,
            "LogStreamArn": f"arn:aws:logs:us-east-1:{ACCOUNT}:log-group:/aws/sagemaker/Endpoints/"
            f"{endpoint}",
        },
    )


def _sse(obj: Any) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data:{data}\n\n".encode()  # axum style: no space after "data:"


class ContainerError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status, self.body = status, body


class FakeSageMaker(FakeServer):
    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.open_streams = self.closed_streams = 0
        self.peers: list[Any] = []  # the client's (host, port) per request: connection reuse
        self.transports: list[Any] = []  # per streamed request: is_closing() once the client left
        self.endpoints = {"my-endpoint"}
        self.tokens = [" Hello", " there", ",", " friend", "."]
        self.eos = "</s>"
        self.input_length = 7
        self.stream_input_length = True  # False: a final stream event without input_length
        self.details = True  # False: a container that ignores `details` (no counts, no reason)
        self.part_size: int | None = None  # re-cut the container's stream into parts this big
        self.stream_error: tuple[str, str] | None = None  # (exception type, message)
        self.stream_error_after = 1  # ...sent after this many PayloadParts
        self.aws_error: tuple[int, str, str] | None = None  # (status, code, message)
        self.container_error: tuple[int, Any] | None = None  # the container answers this
        self.container_stream_error: dict[str, Any] | None = None  # TGI error event mid-stream
        self.container = "tgi"  # or "tei": an embeddings container
        self.max_client_batch_size = 32

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/endpoints/{name}/invocations", self.invoke),
            web.post("/endpoints/{name}/invocations-response-stream", self.invoke_stream),
        ]

    # -- SageMaker ------------------------------------------------------------------------
    async def _check(self, request: web.Request) -> tuple[str, dict[str, Any]] | web.Response:
        rec = await self.record(request)
        self.peers.append(request.transport and request.transport.get_extra_info("peername"))
        name = request.match_info["name"]
        if self.aws_error:
            status, code, message = self.aws_error
            return aws_error(status, code, {"message": message})
        if name not in self.endpoints:
            return aws_error(
                400,
                "ValidationError",
                {"message": f"Endpoint {name} of account {ACCOUNT} not found."},
            )
        if self.container_error:
            return model_error(name, *self.container_error)
        try:
            return name, rec.json
        except ValueError:
            return model_error(name, 400, "Failed to deserialize the JSON body")

    async def invoke(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.behaviour.delay_first_byte)
        checked = await self._check(request)
        if isinstance(checked, web.Response):
            return checked
        name, body = checked
        try:
            answer = self.answer(body)
        except ContainerError as exc:
            return model_error(name, exc.status, exc.body)
        return web.json_response(
            answer, headers={"x-Amzn-Invoked-Production-Variant": "AllTraffic"}
        )

    async def invoke_stream(self, request: web.Request) -> web.StreamResponse:
        checked = await self._check(request)
        if isinstance(checked, web.Response):
            return checked
        name, body = checked
        self.transports.append(request.transport)
        try:
            events = self.stream_events(body)
        except ContainerError as exc:
            return model_error(name, exc.status, exc.body)
        parts = events
        if self.part_size:
            blob = b"".join(events)
            parts = [blob[i : i + self.part_size] for i in range(0, len(blob), self.part_size)]
        frames = [payload_part(p) for p in parts]
        if self.stream_error:
            frames = [*frames[: self.stream_error_after], stream_exception(*self.stream_error)]
        return await self.write_stream(request, frames, EVENTSTREAM)

    # -- the container --------------------------------------------------------------------
    def _generate(self, params: dict[str, Any]) -> tuple[list[tuple[str, bool]], str]:
        """Validate TGI parameters; the tokens produced (text, special) and finish reason."""

        def invalid(message: str) -> ContainerError:
            return ContainerError(
                422, {"error": f"Input validation error: {message}", "error_type": "validation"}
            )

        if "temperature" in params and params["temperature"] <= 0:
            raise invalid("`temperature` must be strictly positive")
        if "top_p" in params and not 0 < params["top_p"] < 1:
            raise invalid("`top_p` must be > 0.0 and < 1.0")
        if "top_k" in params and params["top_k"] <= 0:
            raise invalid("`top_k` must be strictly positive")
        if params.get("max_new_tokens") == 0:
            raise invalid("`max_new_tokens` must be strictly positive")
        stops = params.get("stop") or []
        if len(stops) > 4:
            raise invalid(f"`stop` supports up to 4 stop sequences. Given: {len(stops)}")
        limit = params.get("max_new_tokens")
        out: list[tuple[str, bool]] = []
        text = ""
        for token in self.tokens:
            if limit is not None and len(out) >= limit:
                return out, "length"
            out.append((token, False))
            text += token
            if any(s in text for s in stops):
                return out, "stop_sequence"
        if limit is not None and len(out) >= limit:
            return out, "length"
        out.append((self.eos, True))
        return out, "eos_token"

    def embed(self, body: dict[str, Any]) -> Any:
        """TEI's `/invocations` for an embedding model (its `/embed`)."""
        raw = body.get("inputs")
        single = isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int))
        inputs = [raw] if single else raw
        if not isinstance(inputs, list) or not inputs:
            raise ContainerError(
                422, {"error": "`inputs` cannot be empty", "error_type": "validation"}
            )
        if len(inputs) > self.max_client_batch_size:
            message = (
                f"batch size {len(inputs)} > maximum allowed batch size "
                f"{self.max_client_batch_size}"
            )
            raise ContainerError(422, {"error": message, "error_type": "validation"})
        return [fake_vector(item) for item in inputs]

    def answer(self, body: dict[str, Any]) -> Any:
        if self.container == "tei":
            return self.embed(body)
        if "inputs" in body:
            params = body.get("parameters") or {}
            tokens, reason = self._generate(params)
            text = "".join(t for t, special in tokens if not special)
            if params.get("return_full_text"):
                text = body["inputs"] + text
            out: dict[str, Any] = {"generated_text": text}
            if params.get("details") and self.details:
                out["details"] = {
                    "finish_reason": reason,
                    "generated_tokens": len(tokens),
                    "seed": params.get("seed"),
                    "prefill": [],
                    "tokens": [],
                }
            return [out]
        tokens, reason = self._openai_tokens(body)
        text = "".join(tokens)
        usage = {
            "prompt_tokens": self.input_length,
            "completion_tokens": len(tokens) + 1,
            "total_tokens": self.input_length + len(tokens) + 1,
        }
        if "messages" in body:
            return {
                "object": "chat.completion",
                "id": "",
                "created": 1,
                "model": "tgi",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": reason,
                        "logprobs": None,
                    }
                ],
                "usage": usage,
            }
        return {
            "object": "text_completion",
            "id": "",
            "created": 1,
            "model": "tgi",
            "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}],
            "usage": usage,
        }

    def _openai_tokens(self, body: dict[str, Any]) -> tuple[list[str], str]:
        params = {"max_new_tokens": body.get("max_tokens"), "stop": body.get("stop")}
        if body.get("top_p") is not None:
            params["top_p"] = body["top_p"]
        tokens, reason = self._generate({k: v for k, v in params.items() if v is not None})
        reason = {"eos_token": "stop", "stop_sequence": "stop_sequence"}.get(reason, reason)
        return [t for t, special in tokens if not special], reason

    def stream_events(self, body: dict[str, Any]) -> list[bytes]:
        """The container's SSE stream, one event per item."""
        if "inputs" not in body:
            return self._openai_stream(body)
        params = body.get("parameters") or {}
        tokens, reason = self._generate(params)
        events: list[bytes] = []
        text = ""
        for i, (token, special) in enumerate(tokens, 1):
            if not special:
                text += token
            last = i == len(tokens)
            event: dict[str, Any] = {
                "index": i,
                "token": {"id": 100 + i, "text": token, "logprob": -0.1, "special": special},
                "generated_text": text if last else None,
                "details": None,
            }
            if last and params.get("details") and self.details:
                event["details"] = {
                    "finish_reason": reason,
                    "generated_tokens": len(tokens),
                    "seed": None,
                }
                if self.stream_input_length:
                    event["details"]["input_length"] = self.input_length
            events.append(_sse(event))
            if i == 1 and self.container_stream_error:
                events.append(_sse(self.container_stream_error))
                break
        return events

    def _openai_stream(self, body: dict[str, Any]) -> list[bytes]:
        tokens, reason = self._openai_tokens(body)
        chat = "messages" in body
        head = {
            "object": "chat.completion.chunk" if chat else "text_completion",
            "id": "",
            "created": 1,
            "model": "tgi",
        }
        events = []
        for i, token in enumerate(tokens):
            last = i == len(tokens) - 1
            choice: dict[str, Any] = {
                "index": 0,
                "finish_reason": reason if last else None,
                "logprobs": None,
            }
            if chat:
                choice["delta"] = {"role": "assistant", "content": token}
            else:
                choice["text"] = token
            events.append(_sse({**head, "choices": [choice], "usage": None}))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "prompt_tokens": self.input_length,
                "completion_tokens": len(tokens) + 1,
                "total_tokens": self.input_length + len(tokens) + 1,
            }
            events.append(_sse({**head, "choices": [], "usage": usage}))
        events.append(_sse("[DONE]"))
        return events
