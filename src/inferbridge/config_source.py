"""Reading a config file: YAML with line numbers, duplicate keys refused, `os.environ/NAME`
references resolved (every unset one reported at once), and errors that name the file,
the line and the field, with a "did you mean" for a misspelt key.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

ENV_PREFIX = "os.environ/"
FILE_PREFIX = "os.environ_file/"
_SHELL_STYLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

Location = tuple[str | int, ...]


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""


class Source:
    """A loaded config file: its data and the line of every key and item in it."""

    def __init__(self, path: Path | None, data: dict[str, Any], lines: dict[Location, int]):
        self.path = path
        self.data = data
        self.lines = lines

    @classmethod
    def read(cls, path: str | Path) -> Source:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"{p}: is a directory; name the YAML file inside it")
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        text = p.read_text(encoding="utf-8")
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if data is None:
            return cls(p, {}, {})
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        lines: dict[Location, int] = {}
        duplicates: list[str] = []
        _walk(node, (), lines, duplicates)
        if duplicates:
            raise ConfigError(
                f"{p}: duplicate keys (the later one would silently replace the earlier):\n  "
                + "\n  ".join(f"{p}:{d}" for d in duplicates)
            )
        return cls(p, data, lines)

    def where(self, loc: Location) -> str:
        """`file:line: ` for the deepest part of `loc` the file has, or '' for none."""
        if self.path is None:
            return ""
        for end in range(len(loc), -1, -1):
            line = self.lines.get(loc[:end])
            if line is not None:
                return f"{self.path}:{line}: "
        return f"{self.path}: "


def _walk(node: Any, loc: Location, lines: dict[Location, int], dupes: list[str]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key, value in node.value:
            name = key.value
            line = key.start_mark.line + 1
            if name in seen:
                path = ".".join(str(p) for p in (*loc, name))
                dupes.append(f"{line}: {path} (first at line {seen[name]})")
            seen[name] = line
            lines[(*loc, name)] = line
            _walk(value, (*loc, name), lines, dupes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*loc, i)] = item.start_mark.line + 1
            _walk(item, (*loc, i), lines, dupes)


def dotted(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def resolve_env(
    value: Any, environ: Mapping[str, str], where: Callable[[Location], str] | None = None
) -> tuple[Any, list[tuple[Location, str]]]:
    """Replace every `os.environ/NAME` at any depth by that variable, or when it is unset
    and `NAME_FILE` is set, by the content of the file `NAME_FILE` names (as Docker secrets
    are mounted); `os.environ_file/NAME` is always the content of the file NAME names.

    Returns the resolved value and every (location, variable) that is unset, so all of
    them can be reported at once; an unset one resolves to a stand-in `<NAME>` (so a
    config can be validated without its secrets). `where` gives the `file:line: ` of a
    location for messages (`Source.where`)."""
    place = where or (lambda loc: "")
    missing: list[tuple[Location, str]] = []
    shell_style: list[tuple[Location, str]] = []

    def resolve(v: Any, loc: Location) -> Any:
        if isinstance(v, str):
            if v.startswith(ENV_PREFIX):
                name = v[len(ENV_PREFIX) :]
                if name in environ:
                    return environ[name]
                if f"{name}_FILE" in environ:  # Docker's convention for secrets
                    return read_secret(environ, f"{name}_FILE", loc, place(loc))
                missing.append((loc, name))
                return f"<{name}>"
            if v.startswith(FILE_PREFIX):
                name = v[len(FILE_PREFIX) :]
                if name not in environ:
                    missing.append((loc, name))
                    return f"<{name}>"
                return read_secret(environ, name, loc, place(loc))
            found = _SHELL_STYLE.search(v)
            if found:
                shell_style.append((loc, found.group(1)))
            return v
        if isinstance(v, dict):
            return {k: resolve(item, (*loc, k)) for k, item in v.items()}
        if isinstance(v, list):
            return [resolve(item, (*loc, i)) for i, item in enumerate(v)]
        return v

    resolved = resolve(value, ())
    if shell_style:
        raise ConfigError(
            "variables are written os.environ/NAME in inferbridge's config, not ${NAME}:\n  "
            + "\n  ".join(
                f"{place(loc)}{dotted(loc)}: did you mean os.environ/{name}?"
                for loc, name in shell_style
            )
        )
    return resolved, missing


def read_secret(environ: Mapping[str, str], name: str, loc: Location, where: str = "") -> str:
    """The content of the file that variable `name` names (a mounted secret); `where` is
    the `file:line: ` of `loc` for the message."""
    try:
        return Path(environ[name]).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            f"{where}{dotted(loc)}: cannot read the file {name} names: {exc}"
        ) from None


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the closest known key, or ''."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
