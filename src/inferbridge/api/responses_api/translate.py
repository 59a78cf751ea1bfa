"""A Responses API request -> the chat request every backend serves.

`ResponsesCall.build` makes an OpenAI chat body from a validated `/v1/responses` body (and
the conversation of a stored earlier response, for `previous_response_id`) and hands it to
`normalize`, so the request takes the chat path: routing, parameter policy, adapters.

    instructions            -> a first system message (not carried over to the next turn)
    input (string)          -> one user message
    message items           -> messages (input_text/output_text -> text, input_image ->
                               image_url, input_file -> file, input_audio -> input_audio)
    function_call items     -> the assistant message's tool_calls
    function_call_output    -> a tool message
    reasoning items         -> left out (chat has no place for them)
    max_output_tokens       -> max_tokens
    tools (flat)            -> chat tools (nested under `function`)
    tool_choice             -> chat tool_choice (allowed_tools: the tools filtered, its mode)
    text.format             -> response_format; text.verbosity -> verbosity
    reasoning.effort        -> reasoning_effort
    top_logprobs            -> logprobs + top_logprobs

The request also carries the Responses body itself (`ResponsesCall.native_body`, on
`InferenceRequest.responses_body`) for entries that pass it through to an upstream's own
`/v1/responses` (`responses_api: native`); every other adapter ignores it.

Fields that are not Responses fields travel as chat extras (top_k, min_p...), except chat
parameters with another meaning or name here (`messages`, `max_tokens`...): those are a
400 that names the Responses field to use.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from inferbridge import ids
from inferbridge.api.protocol import SCHEMAS, ChatCompletionRequest, normalize, validation_error
from inferbridge.api.responses_api.schema import FIELDS
from inferbridge.errors import InvalidRequest, NotFound, shown_name
from inferbridge.request import InferenceRequest

_CHAT_FIELDS = frozenset(
    ChatCompletionRequest.__required_keys__ | ChatCompletionRequest.__optional_keys__
)
CHAT_EXTRAS = frozenset({"stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias"})
"""Chat parameters the Responses API lacks, accepted (and checked) as they are."""
RESPONSES_NAME = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
    "reasoning_effort": "reasoning.effort",
    "verbosity": "text.verbosity",
    "logprobs": "top_logprobs",
    "tools": "tools",
}
"""Chat parameter -> the Responses field that says the same (for errors)."""

_UNSUPPORTED = {
    "background": "background responses",
    "conversation": "conversations (use previous_response_id)",
    "prompt": "stored prompt templates",
    "max_tool_calls": "max_tool_calls (it limits OpenAI's built-in tools)",
}


def new_id(prefix: str) -> str:
    return f"{prefix}_{ids.new_id()}"


def input_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    """This request's `input` as a list of items (a string is one user message)."""
    value = body.get("input")
    if value is None:
        return []
    if isinstance(value, str):
        return [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}
        ]
    return list(value)


class ResponsesCall:
    """One `/v1/responses` request: its body, the conversation it continues, and the items
    it adds (what the response store keeps)."""

    def __init__(self, body: dict[str, Any], previous: dict[str, Any] | None = None) -> None:
        self.body = body
        self.previous = previous
        """The stored record of `previous_response_id` (`None` when unknown or not asked)."""
        self.new_items = input_items(body)
        prior: list[dict[str, Any]] = []
        if previous is not None:
            prior = [*previous["input_items"], *previous["response"]["output"]]
        self.prior_count = len(prior)
        self.items = [*prior, *self.new_items]
        """The whole conversation: earlier turns' input and output items, then this input."""

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def store(self) -> bool:
        return self.body.get("store") is not False

    def build(self) -> InferenceRequest:
        """The chat `InferenceRequest` (a 4xx `InferbridgeError` when it cannot be one)."""
        previous_id = self.body.get("previous_response_id")
        if previous_id is not None and self.previous is None:
            raise NotFound(
                f"Previous response with id '{shown_name(previous_id)}' not found.",
                param="previous_response_id",
            )
        request = normalize("chat", self.chat_body())
        request.responses_body = self.native_body()
        return request

    # -- the Responses body, for upstreams that serve /v1/responses themselves ----------------
    def native_body(self) -> dict[str, Any]:
        """What an upstream with its own `/v1/responses` gets (`responses_api: native`): the
        client's body, but

        - `previous_response_id` (an id of inferbridge's store, unknown upstream) spelled
          out: `input` is the whole conversation, as the chat form has it;
        - `store: false`: the conversation lives in inferbridge's store, not upstream's;
        - `reasoning` items without `encrypted_content` left out (an upstream that stores
          nothing cannot resolve them: OpenAI answers 404 for them);
        - `include` asks for `message.output_text.logprobs` when `top_logprobs` is set, so
          logprobs come back as on the chat path.

        The adapter sets `model` and `stream` (and the entry's `params:`)."""
        body = dict(self.body)
        body.pop("previous_response_id", None)
        body["store"] = False
        if self.previous is not None or not isinstance(body.get("input"), str | None):
            body["input"] = [item for item in self.items if not _unresolvable(item)]
        if body.get("top_logprobs"):
            include = list(body.get("include") or ())
            if "message.output_text.logprobs" not in include:
                body["include"] = [*include, "message.output_text.logprobs"]
        return body

    # -- the chat body ------------------------------------------------------------------------
    def chat_body(self) -> dict[str, Any]:
        body = self.body
        for key, what in _UNSUPPORTED.items():
            if body.get(key) not in (None, False):
                raise InvalidRequest(
                    f"inferbridge does not support {what}: remove '{key}'.", param=key
                )
        chat: dict[str, Any] = {"model": body["model"]}
        chat["messages"] = self.messages()
        tools = body.get("tools") or []
        choice = body.get("tool_choice")
        if isinstance(choice, dict) and choice["type"] == "allowed_tools":
            allowed = {t.get("name") for t in choice["tools"] if t.get("type") == "function"}
            tools = [t for t in tools if t["name"] in allowed]
            choice = choice["mode"]
        if tools:
            chat["tools"] = [chat_tool(t) for t in tools]
            if body.get("parallel_tool_calls") is not None:
                chat["parallel_tool_calls"] = body["parallel_tool_calls"]
        check_tool_choice(choice, tools)
        if isinstance(choice, dict):
            chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        elif choice is not None and (tools or choice == "none"):
            chat["tool_choice"] = choice
        if body.get("max_output_tokens") is not None:
            chat["max_tokens"] = body["max_output_tokens"]
        for key in ("temperature", "top_p", "user", "safety_identifier", "prompt_cache_key"):
            if body.get(key) is not None:
                chat[key] = body[key]
        if body.get("service_tier") is not None:
            chat["service_tier"] = body["service_tier"]
        if body.get("top_logprobs"):
            chat["logprobs"] = True
            chat["top_logprobs"] = body["top_logprobs"]
        text = body.get("text") or {}
        fmt = text.get("format")
        if fmt and fmt["type"] == "json_object":
            chat["response_format"] = {"type": "json_object"}
        elif fmt and fmt["type"] == "json_schema":
            schema = {"name": fmt["name"], "schema": fmt["schema"]}
            for key in ("description", "strict"):
                if fmt.get(key) is not None:
                    schema[key] = fmt[key]
            chat["response_format"] = {"type": "json_schema", "json_schema": schema}
        if text.get("verbosity") is not None:
            chat["verbosity"] = text["verbosity"]
        effort = (body.get("reasoning") or {}).get("effort")
        if effort is not None:
            chat["reasoning_effort"] = effort
        if self.stream:
            chat["stream"] = True
            chat["stream_options"] = {"include_usage": True}
        chat.update(self.extras())
        return chat

    def extras(self) -> dict[str, Any]:
        """Fields the Responses API does not define: backend extras (top_k...), and the chat
        parameters it lacks (`CHAT_EXTRAS`, checked against the chat schema)."""
        out = {k: v for k, v in self.body.items() if k not in FIELDS}
        for key in out:
            if key in _CHAT_FIELDS and key not in CHAT_EXTRAS:
                instead = RESPONSES_NAME.get(key)
                hint = f"; the Responses API's is '{instead}'" if instead else ""
                raise InvalidRequest(
                    f"Unknown parameter: '{key}' (a chat completions parameter{hint}).",
                    param=key,
                    code="unknown_parameter",
                )
        checked = {k: v for k, v in out.items() if k in CHAT_EXTRAS}
        if checked:
            probe = {"model": "m", "messages": [{"role": "user", "content": ""}], **checked}
            try:
                SCHEMAS["chat"].validate_python(probe)
            except ValidationError as exc:
                raise validation_error(exc) from None
        return out

    def messages(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        instructions = self.body.get("instructions")
        if instructions:
            out.append({"role": "system", "content": instructions})
        calls: set[str] = set()
        for i, item in enumerate(self.items):
            where = f"input[{i - self.prior_count}]" if i >= self.prior_count else "input"
            kind = item.get("type")
            if kind == "function_call":
                calls.add(item["call_id"])
            elif kind == "function_call_output" and item["call_id"] not in calls:
                raise InvalidRequest(
                    "No tool call found for function call output with call_id "
                    f"{shown_name(item['call_id'])} ({where}).",
                    param="input",
                )
            add_item(out, item, where)
        if not out:
            raise InvalidRequest("Missing required parameter: 'input'.", param="input")
        return out


def check_tool_choice(choice: Any, tools: list[dict[str, Any]]) -> None:
    """A tool choice must name a tool of the request, and `required` needs tools."""
    if choice == "required" and not tools:
        raise InvalidRequest(
            "Invalid value for 'tool_choice': 'required' must be specified with the 'tools' "
            "parameter.",
            param="tool_choice",
        )
    if isinstance(choice, dict) and choice["name"] not in {t["name"] for t in tools}:
        raise InvalidRequest(
            f"Invalid value for 'tool_choice': function '{shown_name(choice['name'])}' not "
            "found in the 'tools' parameter.",
            param="tool_choice",
        )


def _unresolvable(item: dict[str, Any]) -> bool:
    """A reasoning item an upstream would have to look up by id (nothing to send inline)."""
    return item.get("type") == "reasoning" and not item.get("encrypted_content")


# -- items -> chat messages ---------------------------------------------------------------------
def add_item(out: list[dict[str, Any]], item: dict[str, Any], where: str) -> None:
    kind = item.get("type") or "message"
    if kind == "message":
        role = item["role"]
        if role == "assistant":
            out.append(assistant_message(item["content"]))
        else:
            out.append({"role": role, "content": content(item["content"], where)})
    elif kind == "function_call":
        call = {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]},
        }
        last = out[-1] if out else None
        if last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).append(call)
            if not last.get("content"):
                last["content"] = None
        else:
            out.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        out.append(
            {
                "role": "tool",
                "tool_call_id": item["call_id"],
                "content": tool_output(item["output"], where),
            }
        )
    # reasoning items: chat has no place for them


def assistant_message(value: str | list[dict[str, Any]]) -> dict[str, Any]:
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    text = []
    refusal = []
    for part in value:
        if part["type"] == "refusal":
            refusal.append(part["refusal"])
        elif "text" in part:
            text.append(part["text"])
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if refusal:
        message["refusal"] = "".join(refusal)
    return message


def content(value: str | list[dict[str, Any]], where: str) -> str | list[dict[str, Any]]:
    """A message's content in chat's shape: a string when it is one piece of text."""
    if isinstance(value, str):
        return value
    parts = [chat_part(part, f"{where}.content[{j}]") for j, part in enumerate(value)]
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def chat_part(part: dict[str, Any], where: str) -> dict[str, Any]:
    kind = part["type"]
    if kind in ("input_text", "output_text"):
        return {"type": "text", "text": part["text"]}
    if kind == "refusal":
        return {"type": "text", "text": part["refusal"]}
    if kind == "input_image":
        url = part.get("image_url")
        if not url:
            raise InvalidRequest(
                f"Missing required parameter: '{where}.image_url' (inferbridge does not "
                "serve OpenAI's Files API: send the image as a URL or a data: URL).",
                param=f"{where}.image_url",
            )
        image: dict[str, Any] = {"url": url}
        if part.get("detail"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        if part.get("file_url"):
            raise InvalidRequest(
                f"Invalid value for '{where}.file_url': files by URL are not supported; "
                "send file_data.",
                param=f"{where}.file_url",
            )
        file = {k: part[k] for k in ("file_data", "file_id", "filename") if part.get(k)}
        return {"type": "file", "file": file}
    return {"type": "input_audio", "input_audio": part["input_audio"]}


def tool_output(value: str | list[dict[str, Any]], where: str) -> str:
    if isinstance(value, str):
        return value
    text = []
    for j, part in enumerate(value):
        if part["type"] not in ("input_text", "output_text"):
            raise InvalidRequest(
                f"Invalid value for '{where}.output[{j}].type': a function call's output "
                "is text here.",
                param=f"{where}.output[{j}].type",
            )
        text.append(part["text"])
    return "".join(text)


def chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = {"name": tool["name"]}
    for key in ("description", "parameters", "strict"):
        if tool.get(key) is not None:
            function[key] = tool[key]
    return {"type": "function", "function": function}
