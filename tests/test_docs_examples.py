"""Every YAML config example in the docs loads: whole configs as they are, lists of model
entries as a `models:` list, single entries as a one-model config."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from inferbridge.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"```ya?ml\n(.*?)```", re.DOTALL)
TOP_KEYS = set(Config.model_fields) - {"missing_env"}


def blocks() -> list[Any]:
    found = []
    for source in SOURCES:
        for i, match in enumerate(BLOCK.finditer(source.read_text(encoding="utf-8"))):
            name = f"{source.relative_to(ROOT)}#{i}"
            found.append(pytest.param(match.group(1), id=name))
    for source in sorted((ROOT / "docker").glob("*.yaml")):
        found.append(pytest.param(source.read_text(encoding="utf-8"), id=str(source.name)))
    return found


FILE_VALUE = re.compile(r"\.(pem|crt|key|json|jinja|j2|txt)$")


def file_values(data: Any) -> list[str]:
    """Values that name files on the operator's machine (certificates, tokenizer configs)."""
    if isinstance(data, dict):
        return [f for v in data.values() for f in file_values(v)]
    if isinstance(data, list):
        return [f for v in data for f in file_values(v)]
    return [data] if isinstance(data, str) and FILE_VALUE.search(data) else []


def as_config(data: Any) -> dict[str, Any] | None:
    """The config an example stands for, or None when it is not a config example (a
    section shown on its own, such as `model_aliases:` without the models it names)."""
    if isinstance(data, dict) and data and set(data) <= TOP_KEYS:
        return data if "models" in data else None
    if (
        isinstance(data, list)
        and data
        and all(isinstance(e, dict) and "backend" in e for e in data)
    ):
        return {"models": data}
    if isinstance(data, dict) and {"name", "backend"} <= set(data):
        return {"models": [data]}
    return None


@pytest.mark.parametrize("text", blocks())
def test_the_example_loads(text, tmp_path, monkeypatch):
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        pytest.fail(f"not valid YAML: {exc}")
    config = as_config(data)
    if config is None:
        pytest.skip("a section shown on its own, or not a config (e.g. Helm values)")
    if file_values(config):
        pytest.skip(f"names files of the operator's machine: {file_values(config)}")
    monkeypatch.chdir(tmp_path)
    variables = re.findall(r"os\.environ/([A-Za-z_][A-Za-z0-9_]*)", text)
    # each its own value (two keys may not be equal); `user:` fits `user:password` fields
    environ = {name: f"user:secret-{name}" for name in variables}
    load_config(data=config, environ=environ)


def test_there_are_config_examples_to_check():
    checked = [p for p in blocks() if as_config(yaml.safe_load(p.values[0])) is not None]
    assert len(checked) >= 10
