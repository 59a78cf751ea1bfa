"""Raw-prompt backends: one prompt string (and its stop strings) from a request.

TGI's /generate, llama.cpp's /completion, Replicate, SageMaker and h2oGPT's plain mode take
a single prompt. A chat request is rendered with the entry's chat template
(`prompt_template: NAME` or `chat_template_file: PATH`, see `inferbridge.templates`); a legacy
completion's prompt is used as given. The template's own stop strings are merged with the
client's.

Backends whose server knows the model's own template (TGI, llama.cpp) use it when the entry
names none: `server_messages` and `cut_continuation` are the two halves of rendering a chat
on the server (TGI `/chat_tokenize`, llama.cpp `/apply-template`) with the same continuation
rule as `ChatTemplate.render`. A deployment that has no template at all cannot serve chat:
that is `DeploymentMisconfigured` (502, retried on the model's other deployments), not the
client's fault.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from pydantic import Field, model_validator

from inferbridge.config import DeploymentConfig
from inferbridge.errors import (
    DeploymentMisconfigured,
    InvalidRequest,
    UpstreamError,
    UpstreamRejected,
)
from inferbridge.request import InferenceRequest
from inferbridge.templates import (
    ChatTemplate,
    TemplateError,
    load_template,
    merge_stops,
    normalise_messages,
)

log = logging.getLogger("inferbridge.templates")

STARTUP_CHECK_SECONDS = 5.0
"""How long start-up waits for a server to say whether it has a chat template."""
PROBE_MESSAGES = ({"role": "user", "content": "Hi"},)
"""The conversation a server renders to show it has a chat template."""

TEMPLATE_FIX = (
    "set prompt_template (a built-in name) or chat_template_file in its entry, "
    "or use this model for /v1/completions only"
)


class PromptSettings(DeploymentConfig):
    """Entry fields of every raw-prompt backend."""

    prompt_template: str | None = Field(
        default=None, description="Built-in chat template name (llama3, chatml, mistral...)."
    )
    chat_template_file: str | None = Field(
        default=None,
        description="A Hugging Face tokenizer_config.json or a Jinja2 chat template file.",
    )

    @model_validator(mode="after")
    def _one_template(self) -> PromptSettings:
        if self.prompt_template and self.chat_template_file:
            raise ValueError("set prompt_template or chat_template_file, not both")
        if self.prompt_template or self.chat_template_file:
            try:  # fail at start-up, naming the entry, rather than on the first request
                load_template(self.prompt_template, self.chat_template_file)
            except (ValueError, OSError, TemplateError) as exc:
                raise ValueError(str(exc)) from None
        return self


class PromptBuilder:
    """Renders requests for one deployment. `template` may be set later (e.g. from a server
    that reports its own chat template)."""

    def __init__(self, settings: PromptSettings, *, strip_bos: bool = False) -> None:
        self.settings = settings
        self.strip_bos = strip_bos
        self.template: ChatTemplate | None = None
        if settings.prompt_template or settings.chat_template_file:
            self.template = load_template(settings.prompt_template, settings.chat_template_file)

    def build(self, request: InferenceRequest, **template_kwargs: Any) -> tuple[str, list[str]]:
        """The prompt text and the stop strings to enforce for `request`."""
        if request.kind == "completion":
            prompt = request.prompt
            if not isinstance(prompt, str):
                raise InvalidRequest("'prompt' must be a string for this model.", param="prompt")
            return prompt, list(request.stop)
        template = self.template
        if template is None:
            why = "none is configured"
            if getattr(self.settings, "use_server_template", None) is False:
                why += " and use_server_template is false"
            raise no_template(self.settings.describe(), why)
        try:
            prompt = template.render(
                request.messages or [],
                add_generation_prompt=True,
                strip_bos=self.strip_bos,
                **template_kwargs,
            )
        except TemplateError as exc:
            raise InvalidRequest(
                f"Cannot format the conversation: {exc}", param="messages"
            ) from None
        return prompt, merge_stops(template.stop, request.stop)


def no_template(label: str, why: str) -> DeploymentMisconfigured:
    """The error for a chat request to a deployment without a chat template (`why`: what
    was looked at): 502, retried on the model's other deployments."""
    return DeploymentMisconfigured(
        f"{label} has no chat template ({why}): {TEMPLATE_FIX}.", backend=label
    )


# -- rendering on the server --------------------------------------------------------------
def server_messages(messages: Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Chat messages to send to a server that applies the model's template itself, and the
    continuation marker ("" when none).

    Messages are normalised like `ChatTemplate.render` does (text parts joined, `developer`
    as `system`) and reduced to `role` and `content`, which every server version reads. A
    trailing assistant message (without tool calls) is a continuation: a unique marker is
    appended to its text, and `cut_continuation` cuts the rendered prompt there, so the
    template's end-of-turn markup is dropped and the model continues that text.
    """
    originals = list(messages)
    msgs = [{"role": m.get("role"), "content": m["content"]} for m in normalise_messages(originals)]
    marker = ""
    if msgs and msgs[-1]["role"] == "assistant" and not originals[-1].get("tool_calls"):
        marker = f"[[inferbridge-continue-{uuid.uuid4().hex}]]"
        msgs[-1]["content"] += marker
    return msgs, marker


def cut_continuation(text: str, marker: str, label: str) -> str:
    """`text` (rendered from `server_messages`) cut at the continuation marker, if any."""
    if not marker:
        return text
    cut = text.find(marker)
    if cut < 0:
        raise TemplateError(
            f"The chat template of {label} does not render the final assistant message, "
            "so it cannot be continued."
        )
    return text[:cut]


async def check_server_template(label: str, check: Callable[[], Awaitable[Any]]) -> None:
    """The start-up check of a deployment that renders chats with its server's template.

    `check` asks the server (within `STARTUP_CHECK_SECONDS`). When the server answers that
    it has no template, `DeploymentMisconfigured` is raised: start-up stops with a message
    naming the entry. When it cannot answer (down, loading, refusing the credentials), the
    server may well be fine later: that is logged and the template is looked up again on
    the first chat request (which fails with a 502 naming the deployment if it still
    cannot). A sample conversation refused by the template shows there is one.
    """
    try:
        await check()
    except DeploymentMisconfigured:
        raise
    except UpstreamError as exc:
        if isinstance(exc, UpstreamRejected) and not exc.retryable:
            log.info("%s: the model's chat template refused a sample chat: %s", label, exc)
            return
        log.warning(
            "%s: cannot ask the server for the model's chat template at start-up (%s); "
            "it is looked up again on the first chat request",
            label,
            exc.message,
        )
