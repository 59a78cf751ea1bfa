"""OpenAI request schemas (pydantic) and their translation into an `InferenceRequest`.

The schemas follow OpenAI's published schema: every OpenAI field is accepted and checked,
and unknown fields are kept as backend extras. Validation is strict about types (a string
is not a number) and every failure becomes a 400 whose `param` names the field, such as
`messages[0].role` or `temperature`.

The body is parsed once with orjson and validated once against TypedDict schemas (no object
is built per message); the resulting `InferenceRequest` carries the original dicts, so
nothing is dumped again for the upstream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal, NotRequired

import orjson
from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    with_config,
)
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from inferbridge.errors import InvalidRequest, shown_name
from inferbridge.request import InferenceRequest, Kind

# Every schema is a TypedDict validated by pydantic: the same checks and error locations as
# models, without building an object per message (the body is used as parsed, as a dict).
_open = with_config(ConfigDict(extra="allow", strict=True))
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
"""A token id, in a prompt given as tokens."""


# -- messages -------------------------------------------------------------------------------
@_open
class TextPart(TypedDict):
    type: Literal["text"]
    text: str


@_open
class ImageURL(TypedDict):
    url: str
    detail: NotRequired[str | None]


@_open
class ImagePart(TypedDict):
    type: Literal["image_url"]
    image_url: ImageURL


@_open
class AudioPart(TypedDict):
    type: Literal["input_audio"]
    input_audio: dict[str, Any]


@_open
class FilePart(TypedDict):
    type: Literal["file"]
    file: dict[str, Any]


@_open
class RefusalPart(TypedDict):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[
    TextPart | ImagePart | AudioPart | FilePart | RefusalPart, Field(discriminator="type")
]
Content = str | list[ContentPart]


@_open
class FunctionCall(TypedDict):
    name: str
    arguments: str


@_open
class ToolCall(TypedDict):
    id: str
    type: NotRequired[Literal["function"]]
    function: FunctionCall


@_open
class SystemMessage(TypedDict):
    role: Literal["system"]
    content: Content
    name: NotRequired[str | None]


@_open
class DeveloperMessage(TypedDict):
    role: Literal["developer"]
    content: Content
    name: NotRequired[str | None]


@_open
class UserMessage(TypedDict):
    role: Literal["user"]
    content: Content
    name: NotRequired[str | None]


@_open
class AssistantMessage(TypedDict):
    role: Literal["assistant"]
    content: NotRequired[Content | None]
    name: NotRequired[str | None]
    refusal: NotRequired[str | None]
    tool_calls: NotRequired[list[ToolCall] | None]
    function_call: NotRequired[FunctionCall | None]


@_open
class ToolMessage(TypedDict):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


@_open
class FunctionMessage(TypedDict):
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
@_open
class FunctionDefinition(TypedDict):
    name: Annotated[str, Field(min_length=1)]
    description: NotRequired[str | None]
    parameters: NotRequired[dict[str, Any] | None]
    strict: NotRequired[bool | None]


@_open
class Tool(TypedDict):
    type: Literal["function"]
    function: FunctionDefinition


@_open
class NamedFunction(TypedDict):
    name: str


@_open
class NamedToolChoice(TypedDict):
    type: Literal["function"]
    function: NamedFunction


@_open
class JSONSchemaFormat(TypedDict):
    name: str
    description: NotRequired[str | None]
    schema: NotRequired[dict[str, Any] | None]
    strict: NotRequired[bool | None]


@_open
class ResponseFormat(TypedDict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: NotRequired[JSONSchemaFormat | None]


def _schema_given(value: ResponseFormat) -> ResponseFormat:
    if value["type"] == "json_schema" and value.get("json_schema") is None:
        raise ValueError("json_schema is required when type is 'json_schema'")
    return value


CheckedResponseFormat = Annotated[ResponseFormat, AfterValidator(_schema_given)]


@_open
class StreamOptions(TypedDict):
    include_usage: NotRequired[bool | None]


MAX_STOPS = 16
"""Stop sequences a request may give (OpenAI takes 4; local servers take more). Where the
proxy enforces them itself, each token costs a search per stop string over the held-back
text: 16 of at most 200 characters keep that small."""
MAX_STOP_CHARS = 200
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


def one_error(message: str) -> WrapValidator:
    """A validator that reports any failure of a union as one error, `message` (naming
    every accepted shape), instead of the first branch's ("a valid string")."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("invalid_value", message) from None

    return WrapValidator(validate)


Stop = Annotated[
    StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)],
    one_error(
        f"must be a string or an array of at most {MAX_STOPS} strings, each at most "
        f"{MAX_STOP_CHARS} characters"
    ),
]
Unit = Annotated[float, Field(ge=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]


@_open
class _Common(TypedDict):
    model: Annotated[str, Field(min_length=1)]
    temperature: NotRequired[Annotated[float, Field(ge=0, le=2)] | None]
    top_p: NotRequired[Unit | None]
    n: NotRequired[Annotated[int, Field(ge=1, le=128)] | None]
    stop: NotRequired[Stop | None]
    seed: NotRequired[Annotated[int, Field(ge=-(2**63), lt=2**63)] | None]
    presence_penalty: NotRequired[Penalty | None]
    frequency_penalty: NotRequired[Penalty | None]
    logit_bias: NotRequired[dict[str, float] | None]
    user: NotRequired[str | None]
    stream: NotRequired[bool | None]
    stream_options: NotRequired[StreamOptions | None]
    # Fields that never change what a model generates (`IGNORABLE_PARAMS`)
    metadata: NotRequired[dict[str, str] | None]
    store: NotRequired[bool | None]
    service_tier: NotRequired[str | None]
    safety_identifier: NotRequired[str | None]
    prompt_cache_key: NotRequired[str | None]


@_open
class ChatCompletionRequest(_Common):
    """`POST /v1/chat/completions`."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: NotRequired[Annotated[int, Field(ge=1, lt=2**31)] | None]
    max_completion_tokens: NotRequired[Annotated[int, Field(ge=1, lt=2**31)] | None]
    logprobs: NotRequired[bool | None]
    top_logprobs: NotRequired[Annotated[int, Field(ge=0, le=20)] | None]
    response_format: NotRequired[CheckedResponseFormat | None]
    tools: NotRequired[list[Tool] | None]
    tool_choice: NotRequired[Literal["none", "auto", "required"] | NamedToolChoice | None]
    parallel_tool_calls: NotRequired[bool | None]
    functions: NotRequired[list[FunctionDefinition] | None]
    function_call: NotRequired[Literal["none", "auto"] | NamedFunction | None]
    modalities: NotRequired[list[str] | None]
    audio: NotRequired[dict[str, Any] | None]
    prediction: NotRequired[dict[str, Any] | None]
    reasoning_effort: NotRequired[str | None]
    verbosity: NotRequired[str | None]
    web_search_options: NotRequired[dict[str, Any] | None]


@_open
class CompletionRequest(_Common):
    """`POST /v1/completions` (legacy)."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: NotRequired[Annotated[int, Field(ge=0, lt=2**31)] | None]
    suffix: NotRequired[str | None]
    echo: NotRequired[bool | None]
    best_of: NotRequired[Annotated[int, Field(ge=0, le=20)] | None]
    logprobs: NotRequired[Annotated[int, Field(ge=0, le=5)] | None]


SCHEMAS: dict[Kind, TypeAdapter[Any]] = {
    "chat": TypeAdapter(ChatCompletionRequest),
    "completion": TypeAdapter(CompletionRequest),
}
"""The request body's validator per route kind."""


def _fields(schema: Any) -> frozenset[str]:
    return frozenset(schema.__required_keys__ | schema.__optional_keys__)


# -- what the parameters mean ---------------------------------------------------------------
# The one source of which OpenAI parameters exist (the schemas above), which never change
# what a model generates, and which values mean "the default behaviour". The validator
# (`build_request`) and the adapters' unsupported-parameter policy (`Backend.prepare`)
# both read them from here.

_NOT_PARAMS = frozenset(
    {"model", "messages", "prompt", "stream", "stream_options", "max_completion_tokens"}
)
"""Schema fields that are the request itself, not generation parameters."""

OPENAI_PARAMS = (_fields(ChatCompletionRequest) | _fields(CompletionRequest)) - _NOT_PARAMS
"""Every OpenAI parameter a request may carry (`max_completion_tokens` arrives as
`max_tokens`)."""

IGNORABLE_PARAMS = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
        "parallel_tool_calls",
    }
)
"""Parameters that never change what a backend generates: always accepted, never forwarded
by translating adapters."""

_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "logprobs": (False, 0),
    "echo": (False,),
    "best_of": (1,),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("auto",),
    "response_format": ({"type": "text"},),
    "top_logprobs": (0,),
    "stop": ([],),
}


def is_neutral(params: dict[str, Any], key: str) -> bool:
    """Whether `params[key]` asks for the default behaviour (so it is no use of `key`):
    `tool_choice: "none"` is neutral only without tools."""
    value = params[key]
    if key == "tool_choice" and value == "none":
        return not params.get("tools")
    return value in _NEUTRAL.get(key, ())


# -- body -> InferenceRequest -----------------------------------------------------------------
_CHAT_FIELDS = _fields(ChatCompletionRequest)
_COMPLETION_FIELDS = _fields(CompletionRequest)
_KNOWN_NAMES = (
    _CHAT_FIELDS
    | _COMPLETION_FIELDS
    | {n for m in (ToolCall, FunctionCall, ImageURL, JSONSchemaFormat) for n in _fields(m)}
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
        "input",  # embeddings (api/embeddings.py)
        "encoding_format",
        "dimensions",
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
    return invalid_field(exc.errors(include_url=False)[0])


def invalid_body(errors: Sequence[Any]) -> InvalidRequest:
    """The 400 for FastAPI's validation errors of a request body (locations start with
    `body`): the first error, naming its field."""
    err = dict(errors[0]) if errors else {"type": "missing", "loc": ("body",), "msg": ""}
    loc = tuple(err.get("loc") or ())
    loc = loc[1:] if loc[:1] == ("body",) else loc
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return InvalidRequest(f"The request body is not valid JSON: {detail}")
    if not loc:
        if err.get("type") == "missing":
            return InvalidRequest("The request body is empty; it must be a JSON object.")
        return InvalidRequest("The request body must be a JSON object.")
    err["loc"] = loc
    return invalid_field(err)


def invalid_field(err: Any) -> InvalidRequest:
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
    try:
        SCHEMAS[kind].validate_python(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    return normalize(kind, data)


MAX_JSON_DEPTH = 64
"""How deeply a request body's objects and arrays may nest."""


INT_RANGE = range(-(2**63), 2**64)
"""Integers JSON encoders and upstream servers take (64 bits, signed or not)."""


def too_deep(limit: int = MAX_JSON_DEPTH) -> InvalidRequest:
    return InvalidRequest(
        f"The request body nests objects or arrays more than {limit} levels deep."
    )


def check_values(data: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """A 400 when `data` nests objects or arrays more than `limit` levels deep, or holds an
    integer beyond 64 bits."""
    level: list[Any] = [data]
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            raise too_deep(limit)
        below: list[Any] = []
        for value in level:
            values = value.values() if isinstance(value, dict) else value
            for v in values:
                if isinstance(v, dict | list):
                    below.append(v)
                elif type(v) is int and v not in INT_RANGE:
                    raise InvalidRequest(
                        f"The request body holds an integer beyond 64 bits ({str(v)[:24]}...)."
                    )
        level = below


def check_tool_choice(choice: Any, tools: Sequence[dict[str, Any]]) -> None:
    """`required`, or a named function, needs tools, and a named function must be one."""
    if choice == "required" and not tools:
        raise InvalidRequest(
            "Invalid value for 'tool_choice': 'required' is only allowed when 'tools' are "
            "specified.",
            param="tool_choice",
        )
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        names = {(t.get("function") or {}).get("name") for t in tools}
        if name not in names:
            raise InvalidRequest(
                f"Invalid value for 'tool_choice': function '{shown_name(str(name))}' is not "
                "one of 'tools'.",
                param="tool_choice",
            )


def normalize(kind: Kind, data: dict[str, Any]) -> InferenceRequest:
    """An `InferenceRequest` from a body already validated against `SCHEMAS[kind]` (and
    checked by `check_values` at the door)."""
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
    if extras:  # fields no schema bounds (the declared ones are bounded by theirs)
        check_values(extras)
    if kind == "chat" and "tool_choice" in params:
        check_tool_choice(params["tool_choice"], params.get("tools") or ())
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
