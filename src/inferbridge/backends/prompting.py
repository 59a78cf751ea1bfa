"""Raw-prompt backends: one prompt string (and its stop strings) from a request.

TGI's /generate, llama.cpp's /completion, Replicate, SageMaker and h2oGPT's plain mode take
a single prompt. A chat request is rendered with the entry's chat template
(`prompt_template: NAME` or `chat_template_file: PATH`, see `inferbridge.templates`); a legacy
completion's prompt is used as given. The template's own stop strings are merged with the
client's.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from inferbridge.config import DeploymentConfig
from inferbridge.errors import InvalidRequest
from inferbridge.request import InferenceRequest
from inferbridge.templates import ChatTemplate, TemplateError, load_template, merge_stops


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
            raise InvalidRequest(
                f"Model '{request.model}' has no chat template configured: set "
                "prompt_template or chat_template_file in its entry, or use /v1/completions.",
                param="messages",
            )
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
