"""Chat templates: reference vectors per built-in template, HF-compatible rendering, loading.

Expected strings come from docs/protocols/templates.md §3 (rendered with an environment
configured like transformers, and cross-checked against transformers-generated outputs).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from inferbridge.errors import InvalidRequest
from inferbridge.templates import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    TemplateError,
    load_template,
    merge_stops,
    render_template,
)
from inferbridge.templates.renderer import compile_template

Messages = list[dict[str, Any]]

SYSTEM: dict[str, Any] = {"role": "system", "content": "You are terse."}
A: Messages = [{"role": "user", "content": "Hi"}]
B: Messages = [SYSTEM, {"role": "user", "content": "Hi"}]
C: Messages = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a color."},
]
D: Messages = [SYSTEM, *C]
E: Messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
INPUTS: dict[str, Messages] = {"A": A, "B": B, "C": C, "D": D, "E+": E, "E-": E}

# docs/protocols/templates.md §3; "E+"/"E-" = input E with add_generation_prompt true/false,
# rendered with the official template as is (trailing assistant closed, no system merge).
VECTORS: dict[str, dict[str, str]] = {
    "llama2": {
        "A": "<s>[INST] Hi [/INST]",
        "B": "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST]",
        "C": "<s>[INST] Hi [/INST] Hello! </s><s>[INST] Name a color. [/INST]",
        "D": (
            "<s>[INST] <<SYS>>\n"
            "You are terse.\n"
            "<</SYS>>\n\n"
            "Hi [/INST] Hello! </s><s>[INST] Name a color. [/INST]"
        ),
        "E+": "<s>[INST] Hi [/INST] Hel </s>",
        "E-": "<s>[INST] Hi [/INST] Hel </s>",
    },
    "llama3": {
        "A": (
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
            "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        "B": (
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            "You are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
            "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        "C": (
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
            "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
            "Hello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
            "Name a color.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        "D": (
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            "You are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
            "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
            "Hello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
            "Name a color.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        "E+": (
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
            "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
            "Hel<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        "E-": (
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
            "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
            "Hel<|eot_id|>"
        ),
    },
    "mistral_v01": {
        "A": "<s>[INST] Hi [/INST]",
        "B": "ERROR: Conversation roles must alternate user/assistant/user/assistant/...",
        "C": "<s>[INST] Hi [/INST]Hello!</s> [INST] Name a color. [/INST]",
        "D": "ERROR: Conversation roles must alternate user/assistant/user/assistant/...",
        "E+": "<s>[INST] Hi [/INST]Hel</s> ",
        "E-": "<s>[INST] Hi [/INST]Hel</s> ",
    },
    "mixtral_v01": {
        "A": "<s>[INST] Hi [/INST]",
        "B": "ERROR: Conversation roles must alternate user/assistant/user/assistant/...",
        "C": "<s>[INST] Hi [/INST]Hello!</s>[INST] Name a color. [/INST]",
        "D": "ERROR: Conversation roles must alternate user/assistant/user/assistant/...",
        "E+": "<s>[INST] Hi [/INST]Hel</s>",
        "E-": "<s>[INST] Hi [/INST]Hel</s>",
    },
    "mistral_v03": {
        "A": "<s>[INST] Hi[/INST]",
        "B": "<s>[INST] You are terse.\n\nHi[/INST]",
        "C": "<s>[INST] Hi[/INST] Hello!</s>[INST] Name a color.[/INST]",
        "D": "<s>[INST] Hi[/INST] Hello!</s>[INST] You are terse.\n\nName a color.[/INST]",
        "E+": "<s>[INST] Hi[/INST] Hel</s>",
        "E-": "<s>[INST] Hi[/INST] Hel</s>",
    },
    "chatml": {
        "A": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "B": (
            "<|im_start|>system\n"
            "You are terse.<|im_end|>\n"
            "<|im_start|>user\n"
            "Hi<|im_end|>\n"
            "<|im_start|>assistant\n"
        ),
        "C": (
            "<|im_start|>user\n"
            "Hi<|im_end|>\n"
            "<|im_start|>assistant\n"
            "Hello!<|im_end|>\n"
            "<|im_start|>user\n"
            "Name a color.<|im_end|>\n"
            "<|im_start|>assistant\n"
        ),
        "D": (
            "<|im_start|>system\n"
            "You are terse.<|im_end|>\n"
            "<|im_start|>user\n"
            "Hi<|im_end|>\n"
            "<|im_start|>assistant\n"
            "Hello!<|im_end|>\n"
            "<|im_start|>user\n"
            "Name a color.<|im_end|>\n"
            "<|im_start|>assistant\n"
        ),
        "E+": (
            "<|im_start|>user\n"
            "Hi<|im_end|>\n"
            "<|im_start|>assistant\n"
            "Hel<|im_end|>\n"
            "<|im_start|>assistant\n"
        ),
        "E-": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHel<|im_end|>\n",
    },
    "zephyr": {
        "A": "<|user|>\nHi</s>\n<|assistant|>\n",
        "B": "<|system|>\nYou are terse.</s>\n<|user|>\nHi</s>\n<|assistant|>\n",
        "C": (
            "<|user|>\n"
            "Hi</s>\n"
            "<|assistant|>\n"
            "Hello!</s>\n"
            "<|user|>\n"
            "Name a color.</s>\n"
            "<|assistant|>\n"
        ),
        "D": (
            "<|system|>\n"
            "You are terse.</s>\n"
            "<|user|>\n"
            "Hi</s>\n"
            "<|assistant|>\n"
            "Hello!</s>\n"
            "<|user|>\n"
            "Name a color.</s>\n"
            "<|assistant|>\n"
        ),
        "E+": "<|user|>\nHi</s>\n<|assistant|>\nHel</s>\n<|assistant|>\n",
        "E-": "<|user|>\nHi</s>\n<|assistant|>\nHel</s>\n",
    },
    "gemma": {
        "A": "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
        "B": "ERROR: System role not supported",
        "C": (
            "<bos><start_of_turn>user\n"
            "Hi<end_of_turn>\n"
            "<start_of_turn>model\n"
            "Hello!<end_of_turn>\n"
            "<start_of_turn>user\n"
            "Name a color.<end_of_turn>\n"
            "<start_of_turn>model\n"
        ),
        "D": "ERROR: System role not supported",
        "E+": (
            "<bos><start_of_turn>user\n"
            "Hi<end_of_turn>\n"
            "<start_of_turn>model\n"
            "Hel<end_of_turn>\n"
            "<start_of_turn>model\n"
        ),
        "E-": (
            "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHel<end_of_turn>\n"
        ),
    },
    "phi3": {
        "A": "<|user|>\nHi<|end|>\n<|assistant|>\n",
        "B": "<|system|>\nYou are terse.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n",
        "C": (
            "<|user|>\n"
            "Hi<|end|>\n"
            "<|assistant|>\n"
            "Hello!<|end|>\n"
            "<|user|>\n"
            "Name a color.<|end|>\n"
            "<|assistant|>\n"
        ),
        "D": (
            "<|system|>\n"
            "You are terse.<|end|>\n"
            "<|user|>\n"
            "Hi<|end|>\n"
            "<|assistant|>\n"
            "Hello!<|end|>\n"
            "<|user|>\n"
            "Name a color.<|end|>\n"
            "<|assistant|>\n"
        ),
        "E+": "<|user|>\nHi<|end|>\n<|assistant|>\nHel<|end|>\n<|assistant|>\n",
        "E-": "<|user|>\nHi<|end|>\n<|assistant|>\nHel<|end|>\n<|endoftext|>",
    },
    "vicuna_v1.1": {
        "A": (
            "A chat between a curious user and an artificial intelligence assistant."
            " The assistant gives helpful, detailed, and polite answers to the user's"
            " questions. USER: Hi ASSISTANT:"
        ),
        "B": "You are terse. USER: Hi ASSISTANT:",
        "C": (
            "A chat between a curious user and an artificial intelligence assistant."
            " The assistant gives helpful, detailed, and polite answers to the user's"
            " questions. USER: Hi ASSISTANT: Hello!</s>USER: Name a color. ASSISTANT:"
        ),
        "D": "You are terse. USER: Hi ASSISTANT: Hello!</s>USER: Name a color. ASSISTANT:",
    },
    "alpaca": {
        "A": (
            "Below is an instruction that describes a task. Write a response that"
            " appropriately completes the request.\n\n"
            "### Instruction:\n"
            "Hi\n\n"
            "### Response:"
        ),
        "B": "You are terse.\n\n### Instruction:\nHi\n\n### Response:",
        "C": (
            "Below is an instruction that describes a task. Write a response that"
            " appropriately completes the request.\n\n"
            "### Instruction:\n"
            "Hi\n\n"
            "### Response:\n"
            "Hello!\n\n"
            "### Instruction:\n"
            "Name a color.\n\n"
            "### Response:"
        ),
        "D": (
            "You are terse.\n\n"
            "### Instruction:\n"
            "Hi\n\n"
            "### Response:\n"
            "Hello!\n\n"
            "### Instruction:\n"
            "Name a color.\n\n"
            "### Response:"
        ),
    },
    "human_bot": {
        "A": "<human>: Hi\n<bot>:",
        "B": (
            "<human>: Who are you and what do you do?\n<bot>: You are terse.\n<human>: Hi\n<bot>:"
        ),
        "C": "<human>: Hi\n<bot>: Hello!\n<human>: Name a color.\n<bot>:",
        "D": (
            "<human>: Who are you and what do you do?\n"
            "<bot>: You are terse.\n"
            "<human>: Hi\n"
            "<bot>: Hello!\n"
            "<human>: Name a color.\n"
            "<bot>:"
        ),
    },
    "plain": {
        "A": "Hi",
        "B": "You are terse.\nHi",
        "C": "Hi\nHello!\nName a color.",
    },
}


def _raw(name: str) -> ChatTemplate:
    """The template exactly as published: no system-merge convention."""
    return replace(load_template(name), merge_system=False)


@pytest.mark.parametrize(
    ("name", "case"),
    [(name, case) for name, cases in VECTORS.items() for case in cases],
)
def test_builtin_template_reproduces_reference_vector(name: str, case: str) -> None:
    template = _raw(name)
    expected = VECTORS[name][case]
    kwargs: dict[str, Any] = {
        "add_generation_prompt": case != "E-",
        "continue_final_message": False,
    }
    if expected.startswith("ERROR: "):
        with pytest.raises(TemplateError, match=re.escape(expected.removeprefix("ERROR: "))):
            template.render(INPUTS[case], **kwargs)
    else:
        assert template.render(INPUTS[case], **kwargs) == expected


def test_every_builtin_template_has_a_reference_vector() -> None:
    covered = {load_template(name).name for name in VECTORS}
    assert covered == set(BUILTIN_TEMPLATES)


FIVE_TURNS: Messages = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Who are you"},
    {"role": "assistant", "content": "   I am an assistant   "},
    {"role": "user", "content": "Another question"},
]

# transformers-generated outputs quoted in templates.md §3 (whitespace handling differs).
TRANSFORMERS_OUTPUTS: dict[str, tuple[Messages, str]] = {
    "llama2": (
        FIVE_TURNS,
        "<s>[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST] Hi there </s>"
        "<s>[INST] Who are you [/INST] I am an assistant </s><s>[INST] Another question [/INST]",
    ),
    "mistral": (
        FIVE_TURNS[1:],
        "<s>[INST] Hello [/INST]Hi there</s> [INST] Who are you [/INST]   I am an assistant   </s>"
        " [INST] Another question [/INST]",
    ),
    "mixtral": (
        FIVE_TURNS[1:],
        "<s>[INST] Hello [/INST]Hi there</s>[INST] Who are you [/INST]   I am an assistant   </s>"
        "[INST] Another question [/INST]",
    ),
    "gemma": (
        FIVE_TURNS[1:],
        "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\nHi there"
        "<end_of_turn>\n<start_of_turn>user\nWho are you<end_of_turn>\n<start_of_turn>model\n"
        "I am an assistant<end_of_turn>\n<start_of_turn>user\nAnother question<end_of_turn>\n"
        "<start_of_turn>model\n",
    ),
    "chatml": (
        FIVE_TURNS,
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello"
        "<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nWho are you"
        "<|im_end|>\n<|im_start|>assistant\n   I am an assistant   <|im_end|>\n"
        "<|im_start|>user\nAnother question<|im_end|>\n<|im_start|>assistant\n",
    ),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMERS_OUTPUTS))
def test_builtin_template_matches_transformers_output(name: str) -> None:
    messages, expected = TRANSFORMERS_OUTPUTS[name]
    assert load_template(name).render(messages) == expected


# -- system messages ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "messages", "expected"),
    [
        ("mistral", B, "<s>[INST] You are terse.\n\nHi [/INST]"),
        (
            "mixtral",
            D,
            "<s>[INST] You are terse.\n\nHi [/INST]Hello!</s>[INST] Name a color. [/INST]",
        ),
        (
            "gemma",
            B,
            "<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n<start_of_turn>model\n",
        ),
        (
            "gemma",
            [SYSTEM],
            "<bos><start_of_turn>user\nYou are terse.<end_of_turn>\n<start_of_turn>model\n",
        ),
    ],
)
def test_system_is_merged_into_first_user_turn_when_template_has_no_system_role(
    name: str, messages: Messages, expected: str
) -> None:
    assert load_template(name).render(messages) == expected


def test_llama2_rejects_non_alternating_roles_as_http_400() -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(TemplateError) as info:
        load_template("llama2").render(messages)
    assert str(info.value) == (
        "Conversation roles must alternate user/assistant/user/assistant/..."
    )
    assert isinstance(info.value, InvalidRequest)
    assert info.value.status == 400


def test_builtin_format_rejects_roles_it_cannot_express() -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "tool", "content": "42"}]
    with pytest.raises(TemplateError, match="vicuna: only user and assistant roles"):
        load_template("vicuna").render(messages)


# -- trailing assistant: continuation -------------------------------------------------------

CONTINUATIONS: dict[str, str] = {
    "llama2": "<s>[INST] Hi [/INST] Hel",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHel",
    "mistral": "<s>[INST] Hi [/INST]Hel",
    "mixtral": "<s>[INST] Hi [/INST]Hel",
    "mistral_v03": "<s>[INST] Hi[/INST] Hel",
    "chatml": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHel",
    "zephyr": "<|user|>\nHi</s>\n<|assistant|>\nHel",
    "gemma": "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHel",
    "phi3": "<|user|>\nHi<|end|>\n<|assistant|>\nHel",
    "alpaca": "Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\nHi\n\n### Response:\nHel",
    "vicuna": "A chat between a curious user and an artificial intelligence assistant. The "
    "assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: Hi ASSISTANT: Hel",
    "human_bot": "<human>: Hi\n<bot>: Hel",
    "plain": "Hi\nHel",
}


@pytest.mark.parametrize("name", sorted(CONTINUATIONS))
def test_trailing_assistant_message_is_left_open_for_continuation(name: str) -> None:
    template = load_template(name)
    assert template.render(E) == CONTINUATIONS[name]
    assert template.render(E, add_generation_prompt=False) == CONTINUATIONS[name]


def test_every_builtin_template_has_a_continuation_case() -> None:
    assert set(CONTINUATIONS) == set(BUILTIN_TEMPLATES)


def test_continuation_keeps_the_partial_text_exactly() -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure, "}]
    assert load_template("llama3").render(messages).endswith("<|end_header_id|>\n\nSure, ")


def test_trailing_assistant_with_tool_calls_is_not_continued() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
    ]
    assert load_template("chatml").render(messages) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n<|im_start|>assistant\n"
    )


def test_continuing_without_final_assistant_message_is_an_error() -> None:
    with pytest.raises(TemplateError, match="not from the assistant"):
        load_template("chatml").render(A, continue_final_message=True)


# -- message normalisation ------------------------------------------------------------------


def test_content_parts_are_flattened_to_their_text() -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe"},
                {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                {"type": "text", "text": "briefly."},
            ],
        }
    ]
    assert load_template("chatml").render(messages) == (
        "<|im_start|>user\nDescribe\nbriefly.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_developer_role_is_system_and_none_content_is_empty() -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": None},
    ]
    assert load_template("chatml").render(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_input_messages_are_not_modified() -> None:
    messages = [{"role": "developer", "content": [{"type": "text", "text": "x"}]}, *E]
    snapshot = json.dumps(messages)
    load_template("chatml").render(messages)
    assert json.dumps(messages) == snapshot


# -- BOS handling ---------------------------------------------------------------------------


def test_strip_bos_removes_exactly_one_leading_bos() -> None:
    template = load_template("llama2")
    assert template.leading_bos
    assert template.render(C, strip_bos=True) == (
        "[INST] Hi [/INST] Hello! </s><s>[INST] Name a color. [/INST]"
    )


def test_strip_bos_leaves_templates_without_bos_alone() -> None:
    template = load_template("zephyr")
    assert not template.leading_bos
    assert template.render(A, strip_bos=True) == "<|user|>\nHi</s>\n<|assistant|>\n"


# -- the renderer environment (transformers-compatible) -------------------------------------


def test_tojson_keeps_non_ascii_and_supports_indent() -> None:
    source = "{{ messages[0] | tojson }}|{{ {'a': 1} | tojson(indent=2) }}"
    out = render_template(source, [{"role": "user", "content": "héllo <b>"}])
    assert out == '{"role": "user", "content": "héllo <b>"}|{\n  "a": 1\n}'


def test_trim_blocks_lstrip_blocks_and_loop_controls() -> None:
    source = (
        "{% for m in messages %}\n"
        "    {% if loop.index > 1 %}{% break %}{% endif %}\n"
        "{{ m.content }};\n"
        "{% endfor %}"
    )
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert render_template(source, messages) == "a;\n"


def test_generation_tag_renders_its_body() -> None:
    source = (
        "{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
    )
    assert render_template(source, A) == "[Hi]"


def test_strftime_now_tools_and_extra_kwargs_reach_the_template() -> None:
    source = "{{ strftime_now('%Y') | length }}|{{ tools[0].function.name }}|{{ bos_token }}"
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    template = ChatTemplate(name="t", source=source, bos_token="<s>")
    assert template.render(A, tools=tools) == "4|get_weather|<s>"
    assert template.render(A, tools=tools, bos_token="[B]") == "4|get_weather|[B]"


def test_sandbox_blocks_unsafe_attribute_access() -> None:
    with pytest.raises(TemplateError, match="Chat template failed"):
        render_template("{{ messages.__class__.__mro__ }}", A)


def test_compiled_templates_are_cached() -> None:
    assert compile_template("{{ 1 }}") is compile_template("{{ 1 }}")


# -- loading --------------------------------------------------------------------------------


def test_tokenizer_config_with_list_chat_template_and_added_token_dicts(tmp_path: Path) -> None:
    config = {
        "add_bos_token": True,
        "bos_token": {"content": "<s>", "lstrip": False, "normalized": False},
        "eos_token": {"content": "</s>", "lstrip": False, "normalized": False},
        "unk_token": "<unk>",
        "pad_token": None,
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {
                "name": "default",
                "template": (
                    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                    "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}assistant:"
                    "{% endif %}{{ unk_token }}"
                ),
            },
        ],
    }
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps(config), encoding="utf-8")

    template = load_template(file=str(path))

    assert (template.bos_token, template.eos_token, template.stop) == ("<s>", "</s>", ("</s>",))
    assert template.render(B) == "<s>system: You are terse.</s>user: Hi</s>assistant:<unk>"
    assert template.render(A, strip_bos=True) == "user: Hi</s>assistant:<unk>"


def test_tokenizer_config_with_string_chat_template(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer_config.json"
    config = {"chat_template": BUILTIN_TEMPLATES["chatml"].source, "eos_token": "<|im_end|>"}
    path.write_text(json.dumps(config), encoding="utf-8")

    template = load_template(file=path)

    assert template.stop == ("<|im_end|>",)
    assert template.render(A) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_config_without_default_template_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({"chat_template": [{"name": "rag", "template": "x"}]}))
    with pytest.raises(ValueError, match=r"no 'default' entry \(found: rag\)"):
        load_template(file=path)


def test_plain_jinja_file_is_the_whole_template(tmp_path: Path) -> None:
    path = tmp_path / "chat.jinja"
    path.write_text(
        "{% for m in messages %}\n"
        "<{{ m.role }}>{{ m.content }}{{ eos_token }}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}<assistant>{% endif %}\n",
        encoding="utf-8",
    )

    template = load_template(file=path)
    assert (template.bos_token, template.eos_token, template.stop) == ("", "", ())
    assert template.render(A) == "<user>Hi\n<assistant>"

    with_eos = load_template(file=path, eos_token="<end>")
    assert with_eos.stop == ("<end>",)
    assert with_eos.render(A) == "<user>Hi<end>\n<assistant>"


def test_template_file_with_syntax_error_fails_at_load(tmp_path: Path) -> None:
    path = tmp_path / "broken.j2"
    path.write_text("{% for m in messages %}{{ m.content }}", encoding="utf-8")
    with pytest.raises(TemplateError, match="Invalid chat template"):
        load_template(file=path)


def test_unknown_template_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="Unknown chat template 'llama9'") as info:
        load_template("llama9")
    for name in ("llama2", "llama3", "chatml", "human_bot", "plain", "vicuna_v1.1"):
        assert name in str(info.value)


def test_name_and_file_are_mutually_exclusive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        load_template()
    with pytest.raises(ValueError, match="exactly one"):
        load_template("chatml", file=tmp_path / "x.jinja")


def test_aliases_resolve_to_canonical_templates() -> None:
    assert load_template("vicuna_v1.1") is BUILTIN_TEMPLATES["vicuna"]
    assert load_template("Mistral_v01") is BUILTIN_TEMPLATES["mistral"]


def test_stop_override_replaces_template_stops() -> None:
    assert load_template("llama3", stop=["<|eot_id|>"]).stop == ("<|eot_id|>",)


@pytest.mark.parametrize(
    ("name", "stops"),
    [
        ("llama2", ("</s>", "[INST]")),
        ("llama3", ("<|eot_id|>", "<|end_of_text|>")),
        ("chatml", ("<|im_end|>", "<|endoftext|>")),
        ("human_bot", ("\n<human>:", "\n<bot>:", "<human>:", "<bot>:")),
        ("plain", ()),
    ],
)
def test_default_stops(name: str, stops: tuple[str, ...]) -> None:
    assert load_template(name).stop == stops


# -- stops ----------------------------------------------------------------------------------


def test_merge_stops_keeps_order_and_drops_duplicates() -> None:
    assert merge_stops(("<|eot_id|>", "<|end_of_text|>"), ["END", "<|eot_id|>", "", "END"]) == [
        "<|eot_id|>",
        "<|end_of_text|>",
        "END",
    ]


def test_merge_stops_accepts_a_single_string_or_none() -> None:
    assert merge_stops(["</s>"], "###") == ["</s>", "###"]
    assert merge_stops(["</s>"], None) == ["</s>"]
    assert merge_stops((), None) == []
