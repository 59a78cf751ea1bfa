"""A fake Hugging Face text-generation-inference server (native API), byte for byte.

Speaks what TGI's router sends (docs/protocols/tgi.md, router/src/lib.rs and server.rs):

- `POST /generate`: `{"generated_text", "details": {...}}` plus the `x-prompt-tokens` /
  `x-generated-tokens` / `x-compute-*` headers; 422 `{"error","error_type":"validation"}`.
- `POST /generate_stream`: SSE `data:{...}\\n\\n` events (no space after `data:`, no
  `[DONE]`); the last token event carries `generated_text` and `details`. Validation errors
  arrive as an error event at HTTP 200, as in TGI.
- `POST /`: the compat route the `text-generation` client uses (`"stream"` in the body picks
  SSE; the non-streamed answer is a one-element JSON array).
- `GET /info`, `GET /health`.
- `POST /tokenize` (a `GenerateRequest`; tokens `{"id", "text", "start", "stop"}`, the BOS the
  tokenizer adds with an empty span at 0) and `POST /chat_tokenize` (a chat request ->
  `{"tokenize_response": [...], "templated_text": ...}`): the model's `chat_template` rendered
  like TGI's router does (minijinja: no trim_blocks; `bos_token`, `eos_token`,
  `add_generation_prompt: true`; `raise_exception` -> 422 `template_error`), tokenized
  without special tokens added. No template -> 422 "Template error: template not found";
  `chat_tokenize_route = False` answers 404 with an empty body, like a TGI without the route.

The "model" replies with `reply` (a list of tokens, see `tok`) followed by an EOS token, and
honours `max_new_tokens` (finish "length") and `stop` (finish "stop_sequence", the stop
string kept in the text like TGI) with TGI's own check order. Parameters are validated with
TGI's rules and messages, so a test fails if inferbridge forwards a value TGI would reject.
Knobs: `eos`, `prompt_tokens`, `error_event` (type/message after N tokens), `omit_final`,
`info` / `info_status`, `prompt_header`, `stream_input_length`, `chat_template` (None: the
model has none), `bos_token` / `eos_token`, `adds_bos` (the tokenizer puts BOS before every
input), `chat_tokenize_route`, and the base `Behaviour`
(HTTP status errors, `split_every`, `drop_after_chunks`, delays).
"""

from __future__ import annotations

import json
import re
from typing import Any

import jinja2
from aiohttp import web
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tests.fakes.base import FakeServer


def tok(text: str, id: int = 0, logprob: float = -0.25, special: bool = False) -> dict[str, Any]:
    """One TGI `Token`."""
    return {"id": id or 1000 + len(text), "text": text, "logprob": logprob, "special": special}


EOS = tok("</s>", id=2, logprob=-0.01, special=True)


MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
"""The fake model's default chat template (Mistral-Instruct v0.1's shape)."""


class _TemplateRaised(Exception):
    pass


def _raise(message: str) -> None:
    raise _TemplateRaised(message)


_ENV = ImmutableSandboxedEnvironment()  # minijinja's defaults: no trim_blocks/lstrip_blocks
_ENV.globals["raise_exception"] = _raise


def data(payload: Any) -> bytes:
    """One SSE event framed like axum's `Event::json_data` (`data:` without a space)."""
    return b"data:" + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class Invalid(Exception):
    """A TGI `ValidationError` (HTTP 422, or an error event on streams)."""


class FakeTGI(FakeServer):
    def __init__(
        self,
        reply: list[str | dict[str, Any]] | None = None,
        *,
        max_stop_sequences: int = 4,
        max_input_tokens: int = 1024,
        max_total_tokens: int = 2048,
        max_top_n_tokens: int = 5,
    ) -> None:
        super().__init__()
        self._defaults = (reply, max_stop_sequences, max_input_tokens, max_total_tokens)
        self.max_top_n_tokens = max_top_n_tokens
        self._configure()

    def _configure(self) -> None:
        reply, max_stop_sequences, max_input_tokens, max_total_tokens = self._defaults
        self.set_reply(*(reply or ["Hello", " world", "!"]))
        self.eos: dict[str, Any] | None = EOS
        self.prompt_tokens: int | None = None  # default: words in inputs + 1 (BOS)
        self.prompt_header = True  # False: no x-prompt-tokens header on /generate
        self.stream_input_length = True  # False: no input_length in the final stream details
        self.error_event: tuple[int, str, str] | None = None  # (after N tokens, type, message)
        self.omit_final = False
        self.info: dict[str, Any] = {
            "model_id": "fake/model",
            "model_sha": None,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": 128,
            "max_best_of": 2,
            "max_stop_sequences": max_stop_sequences,
            "max_input_tokens": max_input_tokens,
            "max_total_tokens": max_total_tokens,
            "validation_workers": 2,
            "max_client_batch_size": 4,
            "router": "text-generation-router",
            "version": "3.3.6-dev0",
            "sha": None,
            "docker_label": None,
        }
        self.info_status = 200
        self.chat_template: str | None = MISTRAL_TEMPLATE
        self.bos_token = "<s>"
        self.eos_token = "</s>"
        self.adds_bos = True
        self.chat_tokenize_route = True

    def reset(self) -> None:
        """Forget recorded requests and restore every knob (reply, errors, /info...)."""
        super().reset()
        self._configure()

    def set_reply(self, *tokens: str | dict[str, Any]) -> None:
        self.reply = [tok(t) if isinstance(t, str) else t for t in tokens]

    @property
    def generations(self) -> list[Any]:
        """Bodies of the generation requests received (not /info, /health, /tokenize...)."""
        paths = ("/generate", "/generate_stream", "/")
        return [r.json for r in self.requests if r.method == "POST" and r.path in paths]

    # -- routes -------------------------------------------------------------------------
    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/generate", self._generate),
            web.post("/generate_stream", self._generate_stream),
            web.post("/", self._compat),
            web.get("/info", self._info),
            web.get("/health", self._health),
            web.post("/tokenize", self._tokenize),
            web.post("/chat_tokenize", self._chat_tokenize),
        ]

    # -- tokenizer and chat template ---------------------------------------------------------
    def tokens(self, text: str, *, add_special_tokens: bool) -> list[dict[str, Any]]:
        """TGI `SimpleToken`s of `text`: special tokens whole, then runs of spaces, of other
        characters, and single `<` / `[`; offsets in characters, `text` the span's text."""
        specials = [self.bos_token, self.eos_token, "[INST]", "[/INST]"]
        pattern = "|".join(re.escape(t) for t in specials if t) + r"|\s+|[^\s<\[]+|."
        out = []
        if add_special_tokens and self.adds_bos:
            out.append({"id": 1, "text": "", "start": 0, "stop": 0})
        for m in re.finditer(pattern, text, flags=re.S):
            piece = m.group()
            ident = specials.index(piece) + 1 if piece in specials else 1000 + len(piece)
            out.append({"id": ident, "text": piece, "start": m.start(), "stop": m.end()})
        return out

    async def _tokenize(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        return _json(self.tokens(body["inputs"], add_special_tokens=True))

    async def _chat_tokenize(self, request: web.Request) -> web.Response:
        rec = await self.record(request)
        if not self.chat_tokenize_route:
            return web.Response(status=404)  # axum's answer to an unknown route
        if self.behaviour.status != 200:
            return self.error_response()
        try:
            body = json.loads(rec.body)
            messages = [
                {"role": m["role"], "content": _content(m["content"])} for m in body["messages"]
            ]
        except (ValueError, KeyError, TypeError) as exc:
            return web.Response(
                status=422,
                text=f"Failed to deserialize the JSON body into the target type: {exc}",
            )
        if self.chat_template is None:
            return _template_error("template not found")
        try:
            text = _ENV.from_string(self.chat_template).render(
                messages=messages,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                add_generation_prompt=True,
                tools=None,
                guideline=None,
            )
        except _TemplateRaised as exc:
            return _template_error(f"syntax error: {exc}")
        except jinja2.TemplateError as exc:
            return _template_error(str(exc))
        return _json(
            {
                "tokenize_response": self.tokens(text, add_special_tokens=False),
                "templated_text": text,
            }
        )

    async def _info(self, request: web.Request) -> web.Response:
        await self.record(request)
        if self.info_status != 200:
            return web.Response(status=self.info_status, text="Not Found")
        return web.json_response(self.info)

    async def _health(self, request: web.Request) -> web.Response:
        await self.record(request)
        if self.behaviour.status == 503:
            return web.json_response(
                {"error": "unhealthy", "error_type": "healthcheck"}, status=503
            )
        return web.Response(status=200)

    async def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        rec = await self.record(request)
        if self.behaviour.status != 200:
            return self.error_response()
        if "application/json" not in request.headers.get("Content-Type", ""):
            return web.Response(
                status=415, text="Expected request with `Content-Type: application/json`"
            )
        try:
            body = json.loads(rec.body)
        except ValueError as exc:
            return web.Response(status=400, text=f"Failed to parse the request body as JSON: {exc}")
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), str):
            return web.Response(
                status=422,
                text="Failed to deserialize the JSON body into the target type: "
                "missing field `inputs`",
            )
        return body

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        return body if isinstance(body, web.Response) else self._answer(body, wrap=False)

    async def _generate_stream(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        return await self._stream(request, body)

    async def _compat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        if body.get("stream"):
            return await self._stream(request, body)
        return self._answer(body, wrap=True)

    # -- generation ---------------------------------------------------------------------
    def _answer(self, body: dict[str, Any], *, wrap: bool) -> web.Response:
        params = _params(body)
        try:
            tokens, finish, text = self._simulate(body["inputs"], params, stream=False)
        except Invalid as exc:
            return _validation_error(exc)
        answer: dict[str, Any] = {"generated_text": text}
        if params.get("details") or params.get("decoder_input_details"):
            details: dict[str, Any] = {
                "finish_reason": finish,
                "generated_tokens": len(tokens),
                "seed": self._seed(params),
                "prefill": [],
                "tokens": [t for t, _ in tokens],
            }
            if params.get("top_n_tokens"):
                details["top_tokens"] = [tops for _, tops in tokens]
            answer["details"] = details
        prompt_tokens = self._prompt_tokens(body["inputs"])
        headers = {
            "x-compute-type": "gpu+optimized",
            "x-compute-time": "0.05",
            "x-compute-characters": str(len(body["inputs"])),
            "x-total-time": "50",
            "x-validation-time": "1",
            "x-queue-time": "1",
            "x-inference-time": "48",
            "x-time-per-token": "16",
            "x-generated-tokens": str(len(tokens)),
        }
        if self.prompt_header:
            headers["x-prompt-tokens"] = str(prompt_tokens)
        return web.json_response([answer] if wrap else answer, headers=headers)

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        params = _params(body)
        try:
            tokens, finish, text = self._simulate(body["inputs"], params, stream=True)
        except Invalid as exc:
            event = {"error": f"Input validation error: {exc}", "error_type": "validation"}
            return await self.write_stream(request, [data(event)], "text/event-stream")
        pieces = []
        for i, (token, tops) in enumerate(tokens, 1):
            if self.error_event and i > self.error_event[0]:
                _, kind, message = self.error_event
                pieces.append(data({"error": message, "error_type": kind}))
                break
            last = i == len(tokens)
            if last and self.omit_final:
                break
            event: dict[str, Any] = {"index": i, "token": token}
            if params.get("top_n_tokens"):
                event["top_tokens"] = tops
            event["generated_text"] = text if last else None
            event["details"] = None
            if last and params.get("details"):
                event["details"] = {
                    "finish_reason": finish,
                    "generated_tokens": len(tokens),
                    "seed": self._seed(params),
                }
                if self.stream_input_length:
                    event["details"]["input_length"] = self._prompt_tokens(body["inputs"])
            pieces.append(data(event))
        return await self.write_stream(request, pieces, "text/event-stream")

    def _prompt_tokens(self, inputs: str) -> int:
        return self.prompt_tokens if self.prompt_tokens is not None else len(inputs.split()) + 1

    @staticmethod
    def _seed(params: dict[str, Any]) -> int | None:
        sampling = params.get("do_sample") or any(
            params.get(k) is not None for k in ("temperature", "top_k", "top_p", "typical_p")
        )
        return params.get("seed", 42) if sampling else None

    def _simulate(
        self, inputs: str, params: dict[str, Any], *, stream: bool
    ) -> tuple[list[tuple[dict[str, Any], list[dict[str, Any]]]], str, str]:
        """Validate like TGI, then 'generate': (tokens with their top tokens, finish, text)."""
        self._validate(inputs, params, stream)
        max_new = params.get("max_new_tokens") or self.info["max_total_tokens"]
        stops = params.get("stop") or []
        top_n = params.get("top_n_tokens") or 0
        script = [*self.reply, *([self.eos] if self.eos else [])]
        tokens: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        output, finish = "", "length"
        for token in script:
            tops = [token] + [
                tok(f"alt{k}", id=900 + k, logprob=token["logprob"] - k) for k in range(1, top_n)
            ]
            tokens.append((token, tops[:top_n]))
            output += token["text"]
            # TGI's StoppingCriteria order: length, then EOS, then stop sequences.
            if len(tokens) >= max_new:
                finish = "length"
                break
            if token is self.eos:
                finish = "eos_token"
                break
            if any(output.endswith(s) for s in stops):
                finish = "stop_sequence"
                break
        text = "".join(t["text"] for t, _ in tokens if not t["special"])
        return tokens, finish, text

    def _validate(self, inputs: str, p: dict[str, Any], stream: bool) -> None:
        best_of = p.get("best_of") or 1
        sampling = p.get("do_sample") or any(
            p.get(k) is not None for k in ("temperature", "top_k", "top_p", "typical_p")
        )
        checks = [
            (best_of > 1 and not sampling, "you must use sampling when `best_of` is > 1"),
            (best_of > 1 and stream, "`best_of` != 1 is not supported when streaming tokens"),
            (_le(p, "temperature", 0), "`temperature` must be strictly positive"),
            (_le(p, "repetition_penalty", 0), "`repetition_penalty` must be strictly positive"),
            (
                p.get("frequency_penalty") is not None and not -2 <= p["frequency_penalty"] <= 2,
                "`frequency_penalty` must be >= -2.0 and <= 2.0",
            ),
            (_outside_unit(p, "top_p"), "`top_p` must be > 0.0 and < 1.0"),
            (_outside_unit(p, "typical_p"), "`typical_p` must be > 0.0 and < 1.0"),
            (_le(p, "top_k", 0), "`top_k` must be strictly positive"),
            (p.get("max_new_tokens") == 0, "`max_new_tokens` must be strictly positive"),
        ]
        n_stop = len(p.get("stop") or [])
        limit = self.info["max_stop_sequences"]
        checks.append(
            (n_stop > limit, f"`stop` supports up to {limit} stop sequences. Given: {n_stop}")
        )
        top_n = p.get("top_n_tokens") or 0
        checks.append(
            (
                top_n > self.max_top_n_tokens,
                f"`top_n_tokens` must be >= 0 and <= {self.max_top_n_tokens}. Given: {top_n}",
            )
        )
        checks.append((not inputs, "`inputs` cannot be empty"))
        truncate, max_input = p.get("truncate"), self.info["max_input_tokens"]
        checks.append(
            (
                truncate is not None and (truncate == 0 or truncate > max_input),
                f"`truncate` must be strictly positive and less than {max_input}. "
                f"Given: {truncate}",
            )
        )
        checks.append(
            (
                stream and bool(p.get("decoder_input_details")),
                "`decoder_input_details` == true is not supported when streaming tokens",
            )
        )
        for failed, message in checks:
            if failed:
                raise Invalid(message)
        used = self._prompt_tokens(inputs) + (p.get("max_new_tokens") or 0)
        total = self.info["max_total_tokens"]
        if used > total:
            raise Invalid(
                f"`inputs` tokens + `max_new_tokens` must be <= {total}. Given: "
                f"{self._prompt_tokens(inputs)} `inputs` tokens and "
                f"{p.get('max_new_tokens')} `max_new_tokens`"
            )
        self._validate_grammar(p.get("grammar"))

    @staticmethod
    def _validate_grammar(grammar: Any) -> None:
        if grammar is None:
            return
        kind = grammar.get("type") if isinstance(grammar, dict) else None
        value = grammar.get("value") if isinstance(grammar, dict) else None
        if kind == "json":
            if not isinstance(value, dict) or "properties" not in value:
                raise Invalid("grammar is not valid: Grammar must have a 'properties' field")
        elif kind == "regex":
            try:
                re.compile(value)
            except (re.error, TypeError) as exc:
                raise Invalid(f"grammar is not valid: {exc}") from None
        elif kind != "json_schema":
            raise Invalid("grammar is not valid: unknown grammar type")


def _params(body: dict[str, Any]) -> dict[str, Any]:
    """`parameters` with JSON nulls dropped (serde treats them as absent)."""
    params = body.get("parameters")
    if params is None:  # TGI's default_parameters(): sampling on, details off
        return {"do_sample": True}
    return {k: v for k, v in params.items() if v is not None}


def _le(p: dict[str, Any], key: str, bound: float) -> bool:
    return p.get(key) is not None and p[key] <= bound


def _outside_unit(p: dict[str, Any], key: str) -> bool:
    return p.get(key) is not None and not 0 < p[key] < 1


def _validation_error(exc: Invalid) -> web.Response:
    return web.json_response(
        {"error": f"Input validation error: {exc}", "error_type": "validation"}, status=422
    )


def _content(content: Any) -> str:
    """A message's content as TGI's `TextMessage` has it (text chunks joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            c["text"] if c["type"] == "text" else f"![]({c['image_url']['url']})" for c in content
        )
    raise TypeError("data did not match any variant of untagged enum MessageContent")


def _json(payload: Any, status: int = 200) -> web.Response:
    """JSON as axum's `Json` writes it (serde_json: compact, UTF-8 unescaped)."""
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return web.Response(status=status, body=body, content_type="application/json")


def _template_error(message: str) -> web.Response:
    return _json({"error": f"Template error: {message}", "error_type": "template_error"}, 422)
