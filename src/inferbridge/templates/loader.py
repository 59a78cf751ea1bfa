"""Resolve a model entry's template setting into a `ChatTemplate`.

A model entry names either a built-in template (`name`) or a file (`file`): a Hugging Face
`tokenizer_config.json`, whose `chat_template` and special tokens are used like
transformers uses them, or any other file, whose whole text is a Jinja2 chat template.
Templates are compiled on load, so a broken template fails at configuration time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from inferbridge.templates.builtin import BUILTIN_TEMPLATES, TEMPLATE_ALIASES
from inferbridge.templates.renderer import ChatTemplate, compile_template

__all__ = ["load_template", "template_names"]


def template_names() -> list[str]:
    """Every name `load_template(name=...)` accepts, canonical names first."""
    return [*BUILTIN_TEMPLATES, *TEMPLATE_ALIASES]


def load_template(
    name: str | None = None,
    file: str | os.PathLike[str] | None = None,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    stop: Sequence[str] | None = None,
) -> ChatTemplate:
    """Return the built-in template `name`, or the template stored in `file`.

    Exactly one of `name` and `file` must be given. `bos_token`, `eos_token` and `stop`
    override what the template or file provides. An unknown name raises `ValueError`
    listing the valid names; an unparsable template raises `TemplateError`.
    """
    if (name is None) == (file is None):
        raise ValueError("Give exactly one of a template name or a template file.")
    if name is not None:
        template = _builtin(name)
        if bos_token is not None or eos_token is not None:
            template = replace(
                template,
                bos_token=template.bos_token if bos_token is None else bos_token,
                eos_token=template.eos_token if eos_token is None else eos_token,
            )
    else:
        assert file is not None
        template = _from_file(Path(file), bos_token=bos_token, eos_token=eos_token)
    if stop is not None:
        template = replace(template, stop=tuple(stop))
    return template


def _builtin(name: str) -> ChatTemplate:
    key = name.strip().lower()
    key = TEMPLATE_ALIASES.get(key, key)
    try:
        return BUILTIN_TEMPLATES[key]
    except KeyError:
        valid = ", ".join(template_names())
        raise ValueError(f"Unknown chat template {name!r}; valid names: {valid}.") from None


def _from_file(path: Path, *, bos_token: str | None, eos_token: str | None) -> ChatTemplate:
    text = path.read_text(encoding="utf-8")
    tokens: tuple[tuple[str, str], ...] = ()
    if path.suffix.lower() == ".json":
        source, bos, eos, tokens = _read_tokenizer_config(path, text)
    else:
        source, bos, eos = text, "", ""
    compile_template(source)
    bos = bos if bos_token is None else bos_token
    eos = eos if eos_token is None else eos_token
    return ChatTemplate(
        name=str(path),
        source=source,
        bos_token=bos,
        eos_token=eos,
        stop=(eos,) if eos else (),
        leading_bos=bool(bos),
        special_tokens=tokens,
    )


def _token(value: Any) -> str:
    """A special token as stored in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return ""


def _read_tokenizer_config(
    path: Path, text: str
) -> tuple[str, str, str, tuple[tuple[str, str], ...]]:
    """(chat_template, bos_token, eos_token, other special tokens) of a tokenizer config."""
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}).") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object (a tokenizer_config.json).")

    source = _pick_chat_template(path, config.get("chat_template"))
    others = tuple(
        (key, token)
        for key, value in config.items()
        if key.endswith("_token") and key not in ("bos_token", "eos_token")
        if (token := _token(value))
    )
    return source, _token(config.get("bos_token")), _token(config.get("eos_token")), others


def _pick_chat_template(path: Path, value: Any) -> str:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list):
        named = {
            item.get("name"): item.get("template")
            for item in value
            if isinstance(item, dict) and isinstance(item.get("template"), str)
        }
        if "default" in named:
            return str(named["default"])
        found = ", ".join(str(n) for n in named) or "none"
        raise ValueError(f"{path}: chat_template has no 'default' entry (found: {found}).")
    raise ValueError(f"{path}: no chat_template in this tokenizer config.")
