"""The `POST /v1/responses` request body: TypedDict schemas validated by FastAPI (so
`/openapi.json` documents them) and the 400 that names the field at fault.

Like the chat schemas of `inferbridge.api.protocol`: strict about types, unknown fields kept
(they travel on as backend extras), no object built per input item. Unions of different
shapes (`input` is a string or a list of items, an item's kind is its `type`, or `message`
when it only has a `role`) are tagged by a function, so an error names the branch the
client meant: `input[2].call_id`, not "input: should be a valid string".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, NotRequired

from pydantic import ConfigDict, Discriminator, Field, Tag, with_config
from typing_extensions import TypedDict

from inferbridge.api.protocol import invalid_body
from inferbridge.errors import InvalidRequest

_open = with_config(ConfigDict(extra="allow", strict=True))


def _shape(value: Any) -> str | None:
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "dict"
    return None


def _item_kind(value: Any) -> str | None:
    """An input item's tag: its `type`, or `message` for `{"role", "content"}`."""
    if not isinstance(value, dict):
        return None
    kind = value.get("type")
    if kind is None and "role" in value:
        return "message"
    return kind if isinstance(kind, str) else None


def _shapes(what: str) -> Discriminator:
    return Discriminator(_shape, custom_error_type="invalid_shape", custom_error_message=what)


# -- content parts ---------------------------------------------------------------------------
@_open
class InputText(TypedDict):
    type: Literal["input_text"]
    text: str


@_open
class InputImage(TypedDict):
    type: Literal["input_image"]
    image_url: NotRequired[str | None]
    file_id: NotRequired[str | None]
    detail: NotRequired[str | None]


@_open
class InputFile(TypedDict):
    type: Literal["input_file"]
    file_data: NotRequired[str | None]
    file_id: NotRequired[str | None]
    file_url: NotRequired[str | None]
    filename: NotRequired[str | None]


@_open
class InputAudioData(TypedDict):
    data: str
    format: str


@_open
class InputAudio(TypedDict):
    type: Literal["input_audio"]
    input_audio: InputAudioData


@_open
class OutputText(TypedDict):
    type: Literal["output_text"]
    text: str
    annotations: NotRequired[list[Any] | None]


@_open
class Refusal(TypedDict):
    type: Literal["refusal"]
    refusal: str


Part = Annotated[
    InputText | InputImage | InputFile | InputAudio | OutputText | Refusal,
    Field(discriminator="type"),
]
PART_TYPES = ("input_text", "input_image", "input_file", "input_audio", "output_text", "refusal")

MessageContent = Annotated[
    Annotated[str, Tag("str")] | Annotated[list[Part], Tag("list")],
    _shapes("must be a string or a list of content parts"),
]


# -- input items -----------------------------------------------------------------------------
@_open
class MessageItem(TypedDict):
    """A message: `{"role", "content"}`, with or without `"type": "message"`."""

    type: NotRequired[Literal["message"]]
    role: Literal["user", "assistant", "system", "developer"]
    content: MessageContent
    id: NotRequired[str | None]
    status: NotRequired[str | None]


@_open
class FunctionCallItem(TypedDict):
    """A function call the model made earlier (an item of an earlier response's output)."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: NotRequired[str | None]
    status: NotRequired[str | None]


OutputContent = Annotated[
    Annotated[str, Tag("str")] | Annotated[list[Part], Tag("list")],
    _shapes("must be a string or a list of content parts"),
]


@_open
class FunctionCallOutputItem(TypedDict):
    """The result of a function call, sent back by the client."""

    type: Literal["function_call_output"]
    call_id: str
    output: OutputContent
    id: NotRequired[str | None]
    status: NotRequired[str | None]


@_open
class ReasoningItem(TypedDict):
    """Reasoning an earlier response produced: accepted and left out of the conversation."""

    type: Literal["reasoning"]
    id: NotRequired[str | None]
    summary: NotRequired[list[Any] | None]
    content: NotRequired[list[Any] | None]
    encrypted_content: NotRequired[str | None]


ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")

InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(
        _item_kind,
        custom_error_type="invalid_item",
        custom_error_message="must be a message, function_call, function_call_output or "
        "reasoning item",
    ),
]

Input = Annotated[
    Annotated[str, Tag("str")] | Annotated[list[InputItem], Tag("list")],
    _shapes("must be a string or a list of input items"),
]


# -- tools and formats -------------------------------------------------------------------------
@_open
class FunctionTool(TypedDict):
    """A function tool, flat (not nested under `function` as in chat)."""

    type: Literal["function"]
    name: Annotated[str, Field(min_length=1)]
    description: NotRequired[str | None]
    parameters: NotRequired[dict[str, Any] | None]
    strict: NotRequired[bool | None]


@_open
class ToolChoiceFunction(TypedDict):
    type: Literal["function"]
    name: str


@_open
class ToolChoiceAllowed(TypedDict):
    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]]


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("str")]
    | Annotated[
        Annotated[ToolChoiceFunction | ToolChoiceAllowed, Field(discriminator="type")],
        Tag("dict"),
    ],
    _shapes("must be 'none', 'auto', 'required' or an object naming a function"),
]


@_open
class TextFormatText(TypedDict):
    type: Literal["text"]


@_open
class TextFormatJSONObject(TypedDict):
    type: Literal["json_object"]


@_open
class TextFormatJSONSchema(TypedDict):
    type: Literal["json_schema"]
    name: str
    schema: dict[str, Any]
    description: NotRequired[str | None]
    strict: NotRequired[bool | None]


TextFormat = Annotated[
    TextFormatText | TextFormatJSONObject | TextFormatJSONSchema, Field(discriminator="type")
]


@_open
class TextConfig(TypedDict):
    format: NotRequired[TextFormat | None]
    verbosity: NotRequired[Literal["low", "medium", "high"] | None]


@_open
class ReasoningConfig(TypedDict):
    effort: NotRequired[str | None]
    summary: NotRequired[str | None]


# -- the request -------------------------------------------------------------------------------
@_open
class ResponsesRequest(TypedDict):
    """`POST /v1/responses`."""

    model: Annotated[str, Field(min_length=1)]
    input: NotRequired[Input | None]
    instructions: NotRequired[str | None]
    max_output_tokens: NotRequired[Annotated[int, Field(ge=1, lt=2**31)] | None]
    temperature: NotRequired[Annotated[float, Field(ge=0, le=2)] | None]
    top_p: NotRequired[Annotated[float, Field(ge=0, le=1)] | None]
    top_logprobs: NotRequired[Annotated[int, Field(ge=0, le=20)] | None]
    tools: NotRequired[list[FunctionTool] | None]
    tool_choice: NotRequired[ToolChoice | None]
    parallel_tool_calls: NotRequired[bool | None]
    text: NotRequired[TextConfig | None]
    reasoning: NotRequired[ReasoningConfig | None]
    stream: NotRequired[bool | None]
    stream_options: NotRequired[dict[str, Any] | None]
    store: NotRequired[bool | None]
    previous_response_id: NotRequired[str | None]
    metadata: NotRequired[dict[str, str] | None]
    user: NotRequired[str | None]
    safety_identifier: NotRequired[str | None]
    prompt_cache_key: NotRequired[str | None]
    service_tier: NotRequired[str | None]
    truncation: NotRequired[Literal["auto", "disabled"] | None]
    include: NotRequired[list[str] | None]
    # OpenAI features inferbridge does not offer: a 400 naming them when set
    background: NotRequired[bool | None]
    conversation: NotRequired[Any]
    prompt: NotRequired[Any]
    max_tool_calls: NotRequired[int | None]


FIELDS = frozenset(ResponsesRequest.__required_keys__ | ResponsesRequest.__optional_keys__)

# Tags the error locations carry (union branches, not fields): left out of `param`.
_TAGS = frozenset({"str", "list", "dict", *PART_TYPES, *ITEM_TYPES, "function", "allowed_tools"})
_TAGS |= {"text", "json_object", "json_schema"}
_FIELD_NAMES = frozenset(
    name
    for schema in (
        ResponsesRequest,
        MessageItem,
        FunctionCallItem,
        FunctionCallOutputItem,
        ReasoningItem,
        InputText,
        InputImage,
        InputFile,
        InputAudio,
        InputAudioData,
        OutputText,
        Refusal,
        FunctionTool,
        ToolChoiceAllowed,
        TextConfig,
        TextFormatJSONSchema,
        ReasoningConfig,
    )
    for name in schema.__required_keys__ | schema.__optional_keys__
)


def param_path(loc: Sequence[Any]) -> str:
    """`('input', 'list', 0, 'function_call_output', 'call_id')` -> `input[0].call_id`.

    Field names are kept, branch tags are skipped; a name that is neither (a key of a free
    form object such as `metadata`) ends the path.
    """
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _FIELD_NAMES and not (part in _TAGS and _is_tag(loc, i)):
            out += f".{part}" if out else part
        elif part in _TAGS:
            continue
        else:
            break
    return out


def _is_tag(loc: Sequence[Any], i: int) -> bool:
    """Whether `loc[i]`, a name that is both a field and a tag ("text"), is the tag: a tag
    follows an index or a field whose value is a union (`format`)."""
    prev = loc[i - 1] if i else None
    return isinstance(prev, int) or prev in ("format", "tool_choice")


def invalid_responses_body(errors: Sequence[Any]) -> InvalidRequest:
    """The 400 for FastAPI's validation errors of a `/v1/responses` body."""
    if not errors:
        return invalid_body(errors)
    err = dict(errors[0])
    loc = tuple(err.get("loc") or ())
    loc = loc[1:] if loc[:1] == ("body",) else loc
    if not loc or err.get("type") == "json_invalid":
        return invalid_body(errors)
    param = param_path(loc)
    kind = err.get("type")
    value = err.get("input")
    if kind == "invalid_item" and isinstance(value, dict):
        param = f"{param}.type"
        found = value.get("type")
        if found is None:
            message = f"Missing required parameter: '{param}' (or a 'role' for a message)."
        else:
            message = (
                f"Invalid value for '{param}': {found!r} items are not supported; an input "
                f"item {err['msg']}."
            )
    elif kind in ("invalid_item", "invalid_shape"):
        message = f"Invalid value for '{param}': it {err['msg']}."
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        param = f"{param}.type"
        message = f"Invalid value for '{param}': {err['msg']}"
    elif kind == "missing":
        message = f"Missing required parameter: '{param}'."
    elif kind == "literal_error" and re.fullmatch(r"tools\[\d+\]\.type", param):
        message = (
            f"Invalid value for '{param}': {value!r} tools are not supported; inferbridge "
            "serves function tools (type 'function')."
        )
    else:
        message = f"Invalid value for '{param}': {err['msg']}"
    return InvalidRequest(message, param=param or None)
