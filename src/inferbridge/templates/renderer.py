"""The one Jinja2 renderer for chat templates, configured the way Hugging Face transformers is.

Every chat template in inferbridge, built-in or loaded from a model's `tokenizer_config.json`,
is a Jinja source string rendered here. The environment mirrors transformers'
`_cached_compile_jinja_template` / `render_jinja_template` so that a model's own template
produces byte-for-byte the prompt `tokenizer.apply_chat_template` would:

- `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the
  `loopcontrols` extension and a `{% generation %}` tag that renders its body unchanged;
- `tojson` overridden (`ensure_ascii=False`, `indent`/`separators`/`sort_keys` accepted);
- globals `raise_exception(msg)` (raises `TemplateError`) and `strftime_now(fmt)`;
- context: `messages`, `tools`, `documents`, `add_generation_prompt`, the special tokens
  (`bos_token`, `eos_token`, ...) and any extra keyword arguments, which win over tokens.

`ChatTemplate` adds what transformers leaves to the caller: OpenAI message normalisation,
continuation of a trailing assistant message, the system-merge convention for templates
that reject a system role, and stripping a leading BOS for backends that add it themselves.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from inferbridge.errors import InvalidRequest

__all__ = [
    "ChatTemplate",
    "TemplateError",
    "compile_template",
    "merge_stops",
    "normalise_messages",
    "render_template",
]


class TemplateError(InvalidRequest):
    """A chat template refused the conversation or could not be rendered (HTTP 400).

    Raised by the template itself through `raise_exception(...)` (for example "Conversation
    roles must alternate ..."), and for syntax or runtime errors in a template source.
    """

    code = "chat_template_error"


# --------------------------------------------------------------------------------------------
# The environment


def _raise_exception(message: str) -> NoReturn:
    raise TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value,
        ensure_ascii=ensure_ascii,
        indent=indent,
        separators=separators,
        sort_keys=sort_keys,
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(Extension):
    """Accept `{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag).

    inferbridge never needs the assistant token mask, so the body is rendered unchanged, in
    its own scope as transformers does it.
    """

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return str(caller())


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[loopcontrols, _GenerationTag],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _make_environment()


@lru_cache(maxsize=128)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template once; later calls with the same source hit the cache."""
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"Invalid chat template (line {exc.lineno}): {exc.message}") from exc


def render_template(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    **context: Any,
) -> str:
    """Render `source` exactly as transformers' `apply_chat_template(..., tokenize=False)`.

    `context` carries the special tokens (`bos_token`, `eos_token`, ...) and any extra
    template variables. Messages are passed through untouched; see `ChatTemplate.render`
    for OpenAI-specific normalisation.
    """
    template = compile_template(source)
    try:
        return template.render(
            messages=messages,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **context,
        )
    except TemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise TemplateError(f"Chat template failed: {exc}") from exc
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise TemplateError(f"Chat template failed: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# OpenAI messages -> template messages


def _flatten_content(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, Mapping)
            and part.get("type", "text") == "text"
            and isinstance(part.get("text"), str)
        ]
        return "\n".join(texts)
    return str(content)


def normalise_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copy OpenAI chat messages into the shape chat templates expect.

    - `content` given as a list of content parts becomes its `text` parts joined with
      newlines (other parts, such as images, are dropped); `None` content becomes "".
    - The `developer` role is treated as `system`.
    - Every other key (`name`, `tool_calls`, `tool_call_id`, ...) is kept as is.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        copy = dict(message)
        if copy.get("role") == "developer":
            copy["role"] = "system"
        copy["content"] = _flatten_content(copy.get("content"))
        out.append(copy)
    return out


def merge_leading_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold leading system messages into the first user message as `"{system}\\n\\n{user}"`.

    The convention for templates without a system role (Mistral v0.1, Mixtral, Gemma). If
    no user message follows the system messages, they become a user message of their own.
    Later system messages are left for the template to accept or reject.
    """
    count = 0
    while count < len(messages) and messages[count].get("role") == "system":
        count += 1
    if count == 0:
        return messages
    system = "\n\n".join(m["content"] for m in messages[:count] if m["content"])
    rest = messages[count:]
    if rest and rest[0].get("role") == "user":
        first = dict(rest[0])
        first["content"] = f"{system}\n\n{first['content']}" if system else first["content"]
        return [first, *rest[1:]]
    return [{"role": "user", "content": system}, *rest]


def merge_stops(
    template_stops: Iterable[str], client_stops: str | Iterable[str] | None
) -> list[str]:
    """Template stop strings followed by the client's, without duplicates or empty strings."""
    if isinstance(client_stops, str):
        client_stops = [client_stops]
    merged: dict[str, None] = {}
    for stop in (*template_stops, *(client_stops or ())):
        if stop:
            merged.setdefault(stop, None)
    return list(merged)


# --------------------------------------------------------------------------------------------
# ChatTemplate


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template ready to render OpenAI messages into one prompt string.

    `stop` are the stop strings to send to the backend besides the client's own.
    `leading_bos` says the rendered prompt starts with `bos_token`; a backend whose
    tokenizer adds BOS itself (TGI generate) should render with `strip_bos=True`.
    `merge_system` applies the system-merge convention before rendering, for templates
    that reject a system role. `special_tokens` are further tokenizer tokens
    (`unk_token`, `pad_token`, ...) passed to the template like transformers does.
    """

    name: str
    source: str
    bos_token: str = ""
    eos_token: str = ""
    stop: tuple[str, ...] = ()
    leading_bos: bool = False
    merge_system: bool = False
    special_tokens: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "special_tokens", tuple(self.special_tokens))

    def render(
        self,
        messages: Iterable[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        strip_bos: bool = False,
        continue_final_message: bool | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` into the model's prompt.

        When the last message is an assistant message (without `tool_calls`), or when
        `continue_final_message=True`, the prompt ends right after that message's text so
        the model continues it: the template's end-of-turn markup is cut off and no
        generation prompt is added (transformers' `continue_final_message`). Pass
        `continue_final_message=False` to render a trailing assistant turn closed instead.
        `strip_bos` removes one leading `bos_token`. Extra `kwargs` (for example `tools`)
        become template variables.
        """
        msgs = normalise_messages(messages)
        if self.merge_system:
            msgs = merge_leading_system(msgs)
        last_is_assistant = bool(msgs) and msgs[-1].get("role") == "assistant"
        if continue_final_message is None:
            continue_final_message = last_is_assistant and not msgs[-1].get("tool_calls")
        marker = ""
        if continue_final_message:
            if not last_is_assistant:
                raise TemplateError(
                    "Cannot continue the final message: the last message is not from the assistant."
                )
            marker = f"[[inferbridge-continue-{uuid.uuid4().hex}]]"
            msgs[-1] = {**msgs[-1], "content": msgs[-1]["content"] + marker}
            add_generation_prompt = False

        context: dict[str, Any] = dict(self.special_tokens)
        context.update(bos_token=self.bos_token, eos_token=self.eos_token)
        context.update(kwargs)
        text = render_template(
            self.source, msgs, add_generation_prompt=add_generation_prompt, **context
        )

        if marker:
            cut = text.find(marker)
            if cut < 0:
                raise TemplateError(
                    f"Chat template '{self.name}' does not render the final assistant message, "
                    "so it cannot be continued."
                )
            text = text[:cut]
        if strip_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token) :]
        return text
