"""The built-in chat templates, as data.

Each entry is a Jinja source plus its special tokens and default stop strings; all of them
are rendered by the one renderer in `renderer.py`. Where a model publishes an official
Hugging Face `chat_template`, the source below is that string verbatim (see
docs/protocols/templates.md §1). Formats without an HF template (alpaca, vicuna,
human_bot, plain) are written as Jinja sources that reproduce the reference formats
(Stanford Alpaca `PROMPT_DICT`, FastChat `vicuna_v1.1`, h2oGPT `human_bot`) plus the
inferbridge conventions for system and multi-turn handling described there.

Python string concatenation below only splits long lines; no whitespace is added.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from inferbridge.templates.renderer import ChatTemplate

__all__ = ["BUILTIN_TEMPLATES", "TEMPLATE_ALIASES"]

_ALTERNATE = (
    r"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
)

# meta-llama/Llama-2-*-chat-hf
_LLAMA2 = (
    r"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    r"{% set system_message = messages[0]['content'] %}{% else %}"
    r"{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    r"{% for message in loop_messages %}"
    r"{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    + _ALTERNATE
    + r"{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    r"{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    r"{% else %}{% set content = message['content'] %}{% endif %}"
    r"{% if message['role'] == 'user' %}"
    r"{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    r"{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    r"{% endif %}{% endfor %}"
)

# Meta-Llama-3-*-Instruct (3.0)
_LLAMA3 = (
    r"{% set loop_messages = messages %}{% for message in loop_messages %}"
    r"{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    r"+ message['content'] | trim + '<|eot_id|>' %}"
    r"{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    r"{% endfor %}{% if add_generation_prompt %}"
    r"{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# mistralai/Mistral-7B-Instruct-v0.1
_MISTRAL_V01 = (
    r"{{ bos_token }}{% for message in messages %}"
    r"{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    + _ALTERNATE
    + r"{% endif %}{% if message['role'] == 'user' %}"
    r"{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    r"{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    r"{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    r"{% endif %}{% endfor %}"
)

# mistralai/Mixtral-8x7B-Instruct-v0.1: as v0.1, without the space after each answer's EOS
_MIXTRAL_V01 = (
    r"{{ bos_token }}{% for message in messages %}"
    r"{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    + _ALTERNATE
    + r"{% endif %}{% if message['role'] == 'user' %}"
    r"{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    r"{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    r"{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    r"{% endif %}{% endfor %}"
)

# Mistral-7B-Instruct-v0.3 / Mistral-Nemo style (system prompt goes into the last user turn)
_MISTRAL_V03 = "\n".join(
    [
        r"{%- if messages[0]['role'] == 'system' %}",
        r"    {%- set system_message = messages[0]['content'] %}",
        r"    {%- set loop_messages = messages[1:] %}",
        r"{%- else %}",
        r"    {%- set loop_messages = messages %}",
        r"{%- endif %}",
        r"",
        r"{{- bos_token }}",
        r"{%- for message in loop_messages %}",
        r"    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}",
        r"        {{- raise_exception('After the optional system message, conversation roles"
        r" must alternate user/assistant/user/assistant/...') }}",
        r"    {%- endif %}",
        r"    {%- if message['role'] == 'user' %}",
        r"        {%- if loop.last and system_message is defined %}",
        r"            {{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}",
        r"        {%- else %}",
        r"            {{- '[INST] ' + message['content'] + '[/INST]' }}",
        r"        {%- endif %}",
        r"    {%- elif message['role'] == 'assistant' %}",
        r"        {{- ' ' + message['content'] + eos_token}}",
        r"    {%- else %}",
        r"        {{- raise_exception('Only user and assistant roles are supported, with the"
        r" exception of an initial optional system message!') }}",
        r"    {%- endif %}",
        r"{%- endfor %}",
    ]
)

# teknium/OpenHermes-2.5-Mistral-7B and other ChatML models
_CHATML = (
    r"{% for message in messages %}"
    r"{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    r"{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# HuggingFaceH4/zephyr-7b-beta (multi-line: relies on trim_blocks)
_ZEPHYR = "\n".join(
    [
        r"{% for message in messages %}",
        r"{% if message['role'] == 'user' %}",
        r"{{ '<|user|>\n' + message['content'] + eos_token }}",
        r"{% elif message['role'] == 'system' %}",
        r"{{ '<|system|>\n' + message['content'] + eos_token }}",
        r"{% elif message['role'] == 'assistant' %}",
        r"{{ '<|assistant|>\n'  + message['content'] + eos_token }}",
        r"{% endif %}",
        r"{% if loop.last and add_generation_prompt %}",
        r"{{ '<|assistant|>' }}",
        r"{% endif %}",
        r"{% endfor %}",
    ]
)

# google/gemma-7b-it
_GEMMA = (
    r"{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    r"{{ raise_exception('System role not supported') }}{% endif %}"
    r"{% for message in messages %}"
    r"{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    + _ALTERNATE
    + r"{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
    r"{% set role = message['role'] %}{% endif %}"
    r"{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    r"{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# microsoft/Phi-3-mini-4k-instruct (current revision)
_PHI3 = (
    r"{% for message in messages %}{% if message['role'] == 'system' %}"
    r"{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    r"{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    r"{% elif message['role'] == 'assistant' %}"
    r"{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
    r"{% endif %}"
)

# Stanford Alpaca PROMPT_DICT["prompt_no_input"]; a system message replaces the preamble,
# earlier turns repeat as "### Instruction:" / "### Response:" blocks (inferbridge convention).
_ALPACA = (
    r"{% if messages and messages[0]['role'] == 'system' %}"
    r"{% set preamble = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    r"{% else %}{% set preamble = 'Below is an instruction that describes a task."
    r" Write a response that appropriately completes the request.' %}"
    r"{% set loop_messages = messages %}{% endif %}"
    r"{% if preamble %}{{ preamble + '\n\n' }}{% endif %}"
    r"{% for message in loop_messages %}"
    r"{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    r"{% elif message['role'] == 'assistant' %}"
    r"{{ '### Response:\n' + message['content'] + '\n\n' }}"
    r"{% else %}{{ raise_exception('alpaca: only user and assistant roles are supported"
    r" after an optional first system message') }}{% endif %}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '### Response:' }}{% endif %}"
)

# FastChat vicuna_v1.1 (SeparatorStyle.ADD_COLON_TWO, sep=" ", sep2=EOS)
_VICUNA = (
    r"{% if messages and messages[0]['role'] == 'system' %}"
    r"{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    r'{% else %}{% set system_message = "A chat between a curious user and an artificial'
    r" intelligence assistant. The assistant gives helpful, detailed, and polite answers"
    r' to the user\'s questions." %}{% set loop_messages = messages %}{% endif %}'
    r"{{ system_message + ' ' }}"
    r"{% for message in loop_messages %}"
    r"{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    r"{% elif message['role'] == 'assistant' %}"
    r"{{ 'ASSISTANT: ' + message['content'] + eos_token }}"
    r"{% else %}{{ raise_exception('vicuna: only user and assistant roles are supported"
    r" after an optional first system message') }}{% endif %}{% endfor %}"
    r"{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# h2oGPT PromptType.human_bot; a system message becomes h2oGPT's fake pre-conversation turn.
_HUMAN_BOT = (
    r"{% if messages and messages[0]['role'] == 'system' %}"
    r"{% if messages[0]['content'] %}"
    r"{{ '<human>: Who are you and what do you do?\n<bot>: ' + messages[0]['content'] + '\n' }}"
    r"{% endif %}{% set loop_messages = messages[1:] %}"
    r"{% else %}{% set loop_messages = messages %}{% endif %}"
    r"{% for message in loop_messages %}"
    r"{% if message['role'] == 'user' %}{{ '<human>: ' + message['content'] + '\n' }}"
    r"{% elif message['role'] == 'assistant' %}{{ '<bot>: ' + message['content'] + '\n' }}"
    r"{% else %}{{ raise_exception('human_bot: only user and assistant roles are supported"
    r" after an optional first system message') }}{% endif %}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<bot>:' }}{% endif %}"
)

# No markup: contents joined with newlines, system messages first.
_PLAIN = (
    r"{{ ((messages | selectattr('role', 'equalto', 'system') | list)"
    r" + (messages | rejectattr('role', 'equalto', 'system') | list))"
    r" | map(attribute='content') | join('\n') }}"
)

_LLAMA_STOPS = ("</s>", "[INST]")

_TABLE: tuple[ChatTemplate, ...] = (
    ChatTemplate(
        name="llama2",
        source=_LLAMA2,
        bos_token="<s>",
        eos_token="</s>",
        stop=_LLAMA_STOPS,
        leading_bos=True,
    ),
    ChatTemplate(
        name="llama3",
        source=_LLAMA3,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        stop=("<|eot_id|>", "<|end_of_text|>"),
        leading_bos=True,
    ),
    ChatTemplate(
        name="mistral",
        source=_MISTRAL_V01,
        bos_token="<s>",
        eos_token="</s>",
        stop=_LLAMA_STOPS,
        leading_bos=True,
        merge_system=True,
    ),
    ChatTemplate(
        name="mixtral",
        source=_MIXTRAL_V01,
        bos_token="<s>",
        eos_token="</s>",
        stop=_LLAMA_STOPS,
        leading_bos=True,
        merge_system=True,
    ),
    ChatTemplate(
        name="mistral_v03",
        source=_MISTRAL_V03,
        bos_token="<s>",
        eos_token="</s>",
        stop=_LLAMA_STOPS,
        leading_bos=True,
    ),
    ChatTemplate(
        name="chatml",
        source=_CHATML,
        stop=("<|im_end|>", "<|endoftext|>"),
    ),
    ChatTemplate(
        name="zephyr",
        source=_ZEPHYR,
        bos_token="<s>",
        eos_token="</s>",
        stop=("</s>", "<|user|>"),
    ),
    ChatTemplate(
        name="gemma",
        source=_GEMMA,
        bos_token="<bos>",
        eos_token="<eos>",
        stop=("<end_of_turn>", "<eos>"),
        leading_bos=True,
        merge_system=True,
    ),
    ChatTemplate(
        name="phi3",
        source=_PHI3,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        stop=("<|end|>", "<|endoftext|>", "<|user|>"),
    ),
    ChatTemplate(
        name="alpaca",
        source=_ALPACA,
        bos_token="<s>",
        eos_token="</s>",
        stop=("### Instruction:", "### Response:", "</s>"),
    ),
    ChatTemplate(
        name="vicuna",
        source=_VICUNA,
        bos_token="<s>",
        eos_token="</s>",
        stop=("</s>", "USER:"),
    ),
    ChatTemplate(
        name="human_bot",
        source=_HUMAN_BOT,
        stop=("\n<human>:", "\n<bot>:", "<human>:", "<bot>:"),
    ),
    ChatTemplate(name="plain", source=_PLAIN),
)

BUILTIN_TEMPLATES: Mapping[str, ChatTemplate] = MappingProxyType({t.name: t for t in _TABLE})
"""Built-in templates by canonical name."""

TEMPLATE_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "mistral_v01": "mistral",
        "mixtral_v01": "mixtral",
        "vicuna_v1.1": "vicuna",
    }
)
"""Other accepted names (the ones used in docs/protocols/templates.md) -> canonical name."""
