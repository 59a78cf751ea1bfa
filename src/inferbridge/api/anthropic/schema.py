"""Anthropic Messages request schemas, and their translation into an OpenAI chat body.

The schemas are TypedDicts validated by pydantic, strict about types like
`inferbridge.api.protocol`'s. Unknown top-level fields are refused (as Anthropic does); a
content block, tool or source may carry fields this proxy does not use (`cache_control`,
`citations`...), which are ignored. A failure is a 400 whose message names the field the
way Anthropic's do: `messages.0.content.1.type: ...`, `max_tokens: Field required`.

`to_chat` builds the OpenAI chat body the chat path serves:
- `system` (a string or text blocks) -> a first system message;
- text blocks -> the message's text (blocks joined with a newline), image blocks -> image
  parts (a base64 source as a data URL);
- an assistant's `tool_use` blocks -> its `tool_calls`, `input` as JSON `arguments`;
- a user's `tool_result` blocks -> `tool` messages (before the rest of that user turn);
- `thinking` / `redacted_thinking` blocks of earlier assistant turns are left out;
- `tools` -> function tools (`input_schema` as `parameters`), `tool_choice` `auto` / `any`
  / `tool` / `none` -> `auto` / `required` / the named function / `none`,
  `disable_parallel_tool_use` -> `parallel_tool_calls: false`;
- `stop_sequences` -> `stop`, `top_k` -> the `top_k` extra, `metadata.user_id` -> `user`;
- streamed requests ask for usage (`stream_options.include_usage`).
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, NotRequired

import orjson
from pydantic import AfterValidator, ConfigDict, Field, with_config
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from inferbridge.api.protocol import MAX_STOPS, StopString, normalize
from inferbridge.errors import InvalidRequest, shown_name
from inferbridge.request import InferenceRequest

_closed = with_config(ConfigDict(extra="forbid", strict=True))
_open = with_config(ConfigDict(extra="allow", strict=True))


# -- content blocks -------------------------------------------------------------------------
@_open
class TextBlockParam(TypedDict):
    type: Literal["text"]
    text: str


def _base64(value: str) -> str:
    try:
        binascii.a2b_base64(value, strict_mode=True)
    except binascii.Error:
        raise PydanticCustomError("invalid_base64", "the data is not valid base64") from None
    return value


@_open
class Base64ImageSourceParam(TypedDict):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: Annotated[str, AfterValidator(_base64)]


@_open
class URLImageSourceParam(TypedDict):
    type: Literal["url"]
    url: str


ImageSourceParam = Annotated[
    Base64ImageSourceParam | URLImageSourceParam, Field(discriminator="type")
]


@_open
class ImageBlockParam(TypedDict):
    type: Literal["image"]
    source: ImageSourceParam


@_open
class DocumentBlockParam(TypedDict):
    type: Literal["document"]


@_open
class ToolUseBlockParam(TypedDict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


ToolResultPartParam = Annotated[TextBlockParam | ImageBlockParam, Field(discriminator="type")]


@_open
class ToolResultBlockParam(TypedDict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: NotRequired[str | list[ToolResultPartParam]]
    is_error: NotRequired[bool]


@_open
class ThinkingBlockParam(TypedDict):
    type: Literal["thinking"]
    thinking: str


@_open
class RedactedThinkingBlockParam(TypedDict):
    type: Literal["redacted_thinking"]


ContentBlockParam = Annotated[
    TextBlockParam
    | ImageBlockParam
    | DocumentBlockParam
    | ToolUseBlockParam
    | ToolResultBlockParam
    | ThinkingBlockParam
    | RedactedThinkingBlockParam,
    Field(discriminator="type"),
]


@_open
class MessageParam(TypedDict):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlockParam]


# -- tools ----------------------------------------------------------------------------------
@_open
class ToolParam(TypedDict):
    name: Annotated[str, Field(min_length=1, max_length=128)]
    input_schema: dict[str, Any]
    description: NotRequired[str]
    type: NotRequired[Literal["custom"] | None]


@_closed
class ToolChoiceAutoParam(TypedDict):
    type: Literal["auto"]
    disable_parallel_tool_use: NotRequired[bool]


@_closed
class ToolChoiceAnyParam(TypedDict):
    type: Literal["any"]
    disable_parallel_tool_use: NotRequired[bool]


@_closed
class ToolChoiceToolParam(TypedDict):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: NotRequired[bool]


@_closed
class ToolChoiceNoneParam(TypedDict):
    type: Literal["none"]


ToolChoiceParam = Annotated[
    ToolChoiceAutoParam | ToolChoiceAnyParam | ToolChoiceToolParam | ToolChoiceNoneParam,
    Field(discriminator="type"),
]


@_open
class MetadataParam(TypedDict):
    user_id: NotRequired[str | None]


# -- requests -------------------------------------------------------------------------------
@_closed
class CountTokensRequest(TypedDict):
    """`POST /v1/messages/count_tokens`."""

    model: Annotated[str, Field(min_length=1)]
    messages: Annotated[list[MessageParam], Field(min_length=1)]
    system: NotRequired[str | list[TextBlockParam]]
    tools: NotRequired[list[ToolParam]]
    tool_choice: NotRequired[ToolChoiceParam]
    thinking: NotRequired[dict[str, Any]]
    cache_control: NotRequired[dict[str, Any] | None]


@_closed
class MessagesRequest(CountTokensRequest):
    """`POST /v1/messages`."""

    max_tokens: Annotated[int, Field(ge=1, lt=2**31)]
    stop_sequences: NotRequired[Annotated[list[StopString], Field(max_length=MAX_STOPS)]]
    temperature: NotRequired[Annotated[float, Field(ge=0, le=1)]]
    top_p: NotRequired[Annotated[float, Field(ge=0, le=1)]]
    top_k: NotRequired[Annotated[int, Field(ge=0)]]
    stream: NotRequired[bool]
    metadata: NotRequired[MetadataParam]
    service_tier: NotRequired[str]


# -- validation errors ----------------------------------------------------------------------
_TAGS = frozenset(
    {
        "text",
        "image",
        "document",
        "tool_use",
        "tool_result",
        "thinking",
        "redacted_thinking",
        "base64",
        "url",
        "auto",
        "any",
        "tool",
        "none",
    }
)
"""Discriminator values: pydantic puts them in an error's location."""
_TAGGED = frozenset({"content", "source", "tool_choice"})
"""Fields whose value (or whose list's items) is a tagged union."""
_FIELD = re.compile(r"[a-z_][a-z0-9_]*")
_TYPE_LABELS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def field_path(loc: Sequence[Any]) -> str:
    """A pydantic error location as Anthropic names fields: `messages.0.content.1.text`
    (without the union branch labels and discriminator tags pydantic inserts)."""
    parts: list[str] = []
    tagged = False
    for part in loc:
        if isinstance(part, int):
            parts.append(str(part))
            continue
        if tagged and part in _TAGS:
            tagged = False  # the tag pydantic inserts after a tagged union's location
            continue
        if part in _TYPE_LABELS or not _FIELD.fullmatch(part):
            continue  # a union branch label: 'str', 'list[...]', 'function-after[...]'
        parts.append(part)
        tagged = part in _TAGGED
    return ".".join(parts)


def _server_tool(errors: Sequence[Any]) -> tuple[str, str] | None:
    """`(path, type)` of an Anthropic server tool (`web_search_20250305`...) in `tools`."""
    for err in errors:
        loc = tuple(err.get("loc") or ())
        loc = loc[1:] if loc[:1] == ("body",) else loc
        if len(loc) != 3 or loc[0] != "tools" or not isinstance(loc[1], int):
            continue
        value = err.get("input")
        kind = value.get("type") if isinstance(value, dict) else value if loc[2] == "type" else None
        if isinstance(kind, str) and kind != "custom":
            return f"tools.{loc[1]}.type", kind
    return None


def invalid_body(errors: Sequence[Any]) -> InvalidRequest:
    """The 400 for FastAPI's validation errors of a Messages body, as `field.path: message`:
    the deepest error (of a union, the branch that came closest: a content list's block
    rather than "not a string")."""
    deepest = max(errors, key=lambda e: len(e.get("loc") or ()), default=None)
    err = dict(deepest) if deepest else {"type": "missing", "loc": ("body",), "msg": ""}
    loc = tuple(err.get("loc") or ())
    loc = loc[1:] if loc[:1] == ("body",) else loc
    kind = err.get("type")
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return InvalidRequest(f"The request body is not valid JSON: {detail}")
    if not loc:
        if kind == "missing":
            return InvalidRequest("The request body is empty; it must be a JSON object.")
        return InvalidRequest("The request body must be a JSON object.")
    server_tool = _server_tool(errors)
    if server_tool:
        path, kind = server_tool
        return InvalidRequest(
            f"{path}: server tools ('{kind}') are not supported by inferbridge; tools must "
            "be custom tools with an input_schema.",
            param=path,
        )
    path = field_path(loc)
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        path += ".type"
    return InvalidRequest(f"{path}: {err.get('msg', 'Invalid value')}", param=path)


# -- translation ----------------------------------------------------------------------------
ANTHROPIC_NAME = {
    "stop": "stop_sequences",
    "user": "metadata.user_id",
    "parallel_tool_calls": "tool_choice.disable_parallel_tool_use",
}
"""Chat parameter -> the Messages field it came from (for `x-inferbridge-ignored-params`)."""


def _refuse(path: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{path}: {message}", param=path)


def _image_part(block: dict[str, Any]) -> dict[str, Any]:
    source = block["source"]
    if source["type"] == "base64":
        url = f"data:{source['media_type']};base64,{source['data']}"
    else:
        url = source["url"]
    return {"type": "image_url", "image_url": {"url": url}}


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """OpenAI message content from text and image parts: one string when there are only
    texts (joined with a newline), else the parts."""
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def _tool_result(block: dict[str, Any], path: str) -> dict[str, Any]:
    content = block.get("content", "")
    if not isinstance(content, str):
        texts = []
        for k, part in enumerate(content):
            if part["type"] != "text":
                raise _refuse(
                    f"{path}.content.{k}",
                    "images in tool results are not supported by inferbridge; send the "
                    "image in a user message's content.",
                )
            texts.append(part["text"])
        content = "\n".join(texts)
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": content}


def _user_turn(content: list[dict[str, Any]], path: str, out: list[dict[str, Any]]) -> None:
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        where = f"{path}.{j}"
        kind = block["type"]
        if kind == "text":
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            parts.append(_image_part(block))
        elif kind == "tool_result":
            out.append(_tool_result(block, where))
        elif kind == "tool_use":
            raise _refuse(f"{where}.type", "tool_use blocks belong in assistant messages.")
        elif kind == "document":
            raise _refuse(f"{where}.type", "document blocks are not supported by inferbridge.")
        # thinking blocks in a user turn: nothing to send
    if parts:
        out.append({"role": "user", "content": _content(parts)})


def _assistant_turn(content: list[dict[str, Any]], path: str, out: list[dict[str, Any]]) -> None:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        kind = block["type"]
        if kind == "text":
            texts.append(block["text"])
        elif kind == "tool_use":
            calls.append(
                {
                    "id": block["id"],
                    "type": "function",
                    "function": {
                        "name": block["name"],
                        "arguments": orjson.dumps(block["input"]).decode(),
                    },
                }
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue  # an earlier turn's reasoning: not part of what another model reads
        else:
            raise _refuse(f"{path}.{j}.type", f"{kind} blocks belong in user messages.")
    message: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
    if calls:
        message["tool_calls"] = calls
        if not texts:
            message["content"] = None
    out.append(message)


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The OpenAI messages of a Messages request (its system prompt first)."""
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        text = system if isinstance(system, str) else "\n".join(b["text"] for b in system)
        out.append({"role": "system", "content": text})
    messages = body["messages"]
    for i, message in enumerate(messages):
        content = message["content"]
        role = message["role"]
        if not content and not (role == "assistant" and i == len(messages) - 1):
            raise _refuse(
                f"messages.{i}",
                "all messages must have non-empty content except for the optional final "
                "assistant message",
            )
        if isinstance(content, str):
            out.append({"role": role, "content": content})
        elif role == "user":
            _user_turn(content, f"messages.{i}.content", out)
        else:
            _assistant_turn(content, f"messages.{i}.content", out)
    return out


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool["name"]}
    if tool.get("description"):
        function["description"] = tool["description"]
    function["parameters"] = tool["input_schema"]
    return {"type": "function", "function": function}


def _tool_choice(choice: dict[str, Any], chat: dict[str, Any]) -> None:
    kind = choice["type"]
    if kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "tool":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        chat["tool_choice"] = kind  # "auto" / "none"
    if choice.get("disable_parallel_tool_use"):
        chat["parallel_tool_calls"] = False


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI chat body for a validated Messages (or count_tokens) body."""
    thinking = body.get("thinking")
    if thinking is not None and thinking.get("type") != "disabled":
        raise _refuse("thinking", "extended thinking is not supported by inferbridge.")
    chat: dict[str, Any] = {"model": body["model"], "messages": chat_messages(body)}
    if "max_tokens" in body:
        chat["max_tokens"] = body["max_tokens"]
    if body.get("stop_sequences"):
        chat["stop"] = list(body["stop_sequences"])
    for key in ("temperature", "top_p", "top_k"):
        if key in body:
            chat[key] = body[key]
    tools = body.get("tools")
    if tools:
        chat["tools"] = [_function(tool) for tool in tools]
    choice = body.get("tool_choice")
    if choice is not None and choice["type"] == "any" and not tools:
        raise _refuse("tool_choice", "tool_choice 'any' needs at least one tool in 'tools'.")
    if choice is not None:
        if choice["type"] == "tool" and not any(t["name"] == choice["name"] for t in tools or ()):
            raise _refuse(
                "tool_choice.name", f"no tool named '{shown_name(choice['name'])}' in 'tools'."
            )
        _tool_choice(choice, chat)
    user = (body.get("metadata") or {}).get("user_id")
    if user:
        chat["user"] = user
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def build_request(body: dict[str, Any]) -> InferenceRequest:
    """The `InferenceRequest` for a validated Messages body (a 400 for what cannot be
    translated)."""
    return normalize("chat", to_chat(body))
