"""OpenAI request schemas (pydantic) and their translation into an `InferenceRequest`.

The models follow OpenAI's published schema: every OpenAI field is accepted and checked,
and unknown fields are kept as backend extras. Validation is strict about types (a string
is not a number) and every failure becomes a 400 whose `param` names the field, such as
`messages[0].role` or `temperature`.

The body is parsed once with orjson and validated once; the resulting `InferenceRequest`
carries the original dicts, so no model objects are built or dumped on the hot path beyond
that single validation.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from inferbridge.errors import InvalidRequest
from inferbridge.request import InferenceRequest, Kind


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


# -- messages -------------------------------------------------------------------------------
class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImageURL(_Open):
    url: str
    detail: str | None = None


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageURL


class AudioPart(_Open):
    type: Literal["input_audio"]
    input_audio: dict[str, Any]


class FilePart(_Open):
    type: Literal["file"]
    file: dict[str, Any]


class RefusalPart(_Open):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[
    TextPart | ImagePart | AudioPart | FilePart | RefusalPart, Field(discriminator="type")
]
Content = str | list[ContentPart]


class FunctionCall(_Open):
    name: str
    arguments: str


class ToolCall(_Open):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(_Open):
    role: Literal["system"]
    content: Content
    name: str | None = None


class DeveloperMessage(_Open):
    role: Literal["developer"]
    content: Content
    name: str | None = None


class UserMessage(_Open):
    role: Literal["user"]
    content: Content
    name: str | None = None


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: Content | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None


class ToolMessage(_Open):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


class FunctionMessage(_Open):
    role: Literal["function"]
    content: str | None
    name: str


Message = Annotated[
    SystemMessage
    | DeveloperMessage
    | UserMessage
    | AssistantMessage
    | ToolMessage
    | FunctionMessage,
    Field(discriminator="role"),
]
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


# -- tools and formats ----------------------------------------------------------------------
class FunctionDefinition(_Open):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Open):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Open):
    name: str


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Open):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is 'json_schema'")
        return self


class StreamOptions(_Open):
    include_usage: bool | None = None


Stop = str | list[str]
Unit = Annotated[float, Field(ge=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]


class _Common(_Open):
    model: str = Field(min_length=1)
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Unit | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    stop: Stop | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(_Common):
    """`POST /v1/chat/completions`."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Common):
    """`POST /v1/completions` (legacy)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    suffix: str | None = None
    echo: bool | None = None
    best_of: Annotated[int, Field(ge=0, le=20)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None


# -- body -> InferenceRequest -----------------------------------------------------------------
_NOT_PARAMS = frozenset(
    {"model", "messages", "prompt", "stream", "stream_options", "max_completion_tokens"}
)
_CHAT_FIELDS = frozenset(ChatCompletionRequest.model_fields)
_COMPLETION_FIELDS = frozenset(CompletionRequest.model_fields)
_KNOWN_NAMES = (
    _CHAT_FIELDS
    | _COMPLETION_FIELDS
    | {n for m in (ToolCall, FunctionCall, ImageURL, JSONSchemaFormat) for n in m.model_fields}
    | {
        "content",
        "role",
        "name",
        "tool_call_id",
        "tool_calls",
        "refusal",
        "text",
        "type",
        "image_url",
        "input_audio",
        "file",
        "function",
        "include_usage",
        "json_schema",
        "parameters",
        "description",
        "strict",
        "schema",
        "url",
        "detail",
        "arguments",
        "id",
    }
)


def _param_path(loc: tuple[Any, ...]) -> str:
    """`('messages', 0, 'user', 'content', 'str')` -> `messages[0].content`."""
    out = ""
    prev: Any = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(prev, int) and part in ROLES and out.startswith("messages"):
            pass  # the discriminator tag pydantic inserts
        elif part in _KNOWN_NAMES:
            out += f".{part}" if out else part
        else:
            break  # a union branch name such as 'str' or 'list[str]'
        prev = part
    return out


def validation_error(exc: ValidationError) -> InvalidRequest:
    err = exc.errors(include_url=False)[0]
    param = _param_path(err["loc"])
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        tag = "role" if param.startswith("messages") and param.count(".") == 0 else "type"
        param = f"{param}.{tag}"
        message = f"Invalid value for '{param}': {err['msg']}"
    elif err["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
    else:
        message = f"Invalid value for '{param}': {err['msg']}"
    return InvalidRequest(message, param=param or None)


def parse_body(body: bytes) -> dict[str, Any]:
    if not body:
        raise InvalidRequest("The request body is empty; it must be a JSON object.")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return data


def build_request(kind: Kind, data: dict[str, Any]) -> InferenceRequest:
    """Validate an OpenAI body and normalize it for the router and adapters."""
    schema = ChatCompletionRequest if kind == "chat" else CompletionRequest
    try:
        schema.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    fields = _CHAT_FIELDS if kind == "chat" else _COMPLETION_FIELDS
    params: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    for key, value in data.items():
        if key in _NOT_PARAMS or value is None:
            continue
        if key in fields:
            params[key] = value
        else:
            extras[key] = value
    if data.get("max_completion_tokens") is not None:
        params["max_tokens"] = data["max_completion_tokens"]
    stop = params.get("stop")
    if isinstance(stop, str):
        params["stop"] = [stop]
    stream = bool(data.get("stream"))
    options = data.get("stream_options") or {}
    prompt = data.get("prompt")
    if kind == "completion" and isinstance(prompt, list) and not prompt:
        raise InvalidRequest("'prompt' must not be an empty list.", param="prompt")
    return InferenceRequest(
        kind=kind,
        model=data["model"],
        params=params,
        extras=extras,
        messages=data.get("messages"),
        prompt=prompt,
        stream=stream,
        include_usage=stream and bool(options.get("include_usage")),
        body=data,
    )
