"""Chat templates: turn OpenAI chat `messages` into one prompt string for raw-prompt backends.

Backends that take a single prompt (TGI `/generate`, llama.cpp `/completion`, Replicate,
SageMaker, h2oGPT with `prompt_type='plain'`) render the conversation with the template
chosen by the model entry:

    template = load_template(name="llama3")  # or file=".../tokenizer_config.json"
    prompt = template.render(messages, strip_bos=True)  # the server adds BOS itself
    stop = merge_stops(template.stop, request_stop)

Templates are data (a Jinja source, special tokens and stop strings; see `builtin.py`)
rendered by one Hugging Face-compatible Jinja renderer (`renderer.py`). A template that
refuses a conversation raises `TemplateError`, an HTTP 400 `InvalidRequest`.
"""

from inferbridge.templates.builtin import BUILTIN_TEMPLATES, TEMPLATE_ALIASES
from inferbridge.templates.loader import load_template, template_names
from inferbridge.templates.renderer import (
    ChatTemplate,
    TemplateError,
    merge_stops,
    normalise_messages,
    render_template,
)

__all__ = [
    "BUILTIN_TEMPLATES",
    "TEMPLATE_ALIASES",
    "ChatTemplate",
    "TemplateError",
    "load_template",
    "merge_stops",
    "normalise_messages",
    "render_template",
    "template_names",
]
