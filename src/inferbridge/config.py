"""Configuration: the YAML file, `os.environ/NAME` references, env and CLI overrides.

The file is validated at start-up; every error names the entry and the field at fault, e.g.
`models[1] (mistral): timeout: Input should be a valid number`. Each model entry is
validated by its backend's own settings class (`Backend.Settings`), so a typo in a
backend-specific field is caught before the server starts.

Precedence, lowest first: built-in defaults, the YAML file, `INFERBRIDGE_*` environment
variables, command-line flags.
"""

from __future__ import annotations

import logging
import os
from typing import Any, TypeVar

from pydantic import (
    BaseModel,
    ValidationError,
)

from inferbridge.config_models import (  # re-exported: `inferbridge.config` is their home
    DEFAULT_MODELS,
    AuthConfig,
    Config,
    CorsConfig,
    DeploymentConfig,
    KeyConfig,
    ModelRouting,
    ResponsesConfig,
    RouterConfig,
    ServerConfig,
    StateConfig,
    TLSConfig,
)
from inferbridge.config_source import (
    ConfigError,
    Location,
    Source,
    did_you_mean,
    dotted,
    resolve_env,
)

ModelT = TypeVar("ModelT", bound=BaseModel)

__all__ = [
    "CONFIG_WARNED_ENV",
    "DEFAULT_MODELS",
    "AuthConfig",
    "Config",
    "ConfigError",
    "CorsConfig",
    "DeploymentConfig",
    "KeyConfig",
    "ModelRouting",
    "ResponsesConfig",
    "RouterConfig",
    "ServerConfig",
    "StateConfig",
    "TLSConfig",
    "env_overrides",
    "load_config",
]


def _format_errors(
    prefix: str,
    exc: ValidationError,
    source: Source,
    base: tuple,
    origins: dict[Location, str] | None = None,
) -> list[str]:
    """One line per pydantic error: `file:line: prefix field: message`, with a suggestion
    for an unknown key. A value that came from an environment variable or a command-line
    option (`origins`) is said to come from there instead of from the file."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        origin = (origins or {}).get((*base, *loc)[:2])
        if origin is not None:
            message = f"{err['msg']} (got {err['input']!r} from {origin})"
            lines.append(f"{prefix}{dotted(loc)}: {message}")
            continue
        message = err["msg"]
        cause = (err.get("ctx") or {}).get("error")
        if err["type"] == "value_error" and cause is not None:
            message = str(cause)  # the validator's own words, without "Value error, "
        if err["type"] == "extra_forbidden" and loc:
            message = f"unknown key{did_you_mean(str(loc[-1]), known_keys())}"
        elif err["type"] == "literal_error":
            message = f"{message} (got {err['input']!r})"
        where = source.where((*base, *loc))
        lines.append(f"{where}{prefix}{dotted(loc) or '(entry)'}: {message}")
    return lines


def known_keys() -> set[str]:
    """Every key any part of the config may have (for "did you mean" suggestions)."""
    from inferbridge.backends.registry import BACKENDS, settings_class

    models: list[type[BaseModel]] = [
        Config,
        ServerConfig,
        AuthConfig,
        RouterConfig,
        ModelRouting,
        CorsConfig,
        KeyConfig,
        StateConfig,
    ]
    models += [settings_class(name) for name in BACKENDS]
    keys: set[str] = set()
    for model in models:
        keys.update(model.model_fields)
        for field in model.model_fields.values():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                keys.update(annotation.model_fields)
    return keys


CONFIG_WARNED_ENV = "INFERBRIDGE_CONFIG_WARNED"
"""Set by `inferbridge serve` once it has loaded the config and logged its warnings: the
server processes that load it again (each worker) do not repeat them."""

ENV_NAMES = {"api_keys": "INFERBRIDGE_API_KEYS", "enabled": "INFERBRIDGE_AUTH"}
"""The variables of `env_overrides` not named `INFERBRIDGE_<KEY>`."""


def env_overrides(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """`INFERBRIDGE_HOST`, `_PORT`, `_WORKERS`, `_LOG_LEVEL`, `_LOG_FORMAT`, `_API_KEYS`
    (comma-separated)."""
    env = os.environ if environ is None else environ
    server: dict[str, Any] = {}
    for key in (
        "host",
        "port",
        "workers",
        "log_level",
        "log_format",
        "max_body_bytes",
        "drain_timeout",
    ):
        value = env.get(f"INFERBRIDGE_{key.upper()}")
        if value:
            server[key] = value
    for key in ("drop_unsupported_params", "log_prompts", "access_log", "allow_open"):
        value = env.get(f"INFERBRIDGE_{key.upper()}")
        if value:
            server[key] = value.strip().lower() in ("1", "true", "yes", "on")
    out: dict[str, Any] = {"server": server} if server else {}
    auth: dict[str, Any] = {}
    keys = [k.strip() for k in env.get("INFERBRIDGE_API_KEYS", "").split(",") if k.strip()]
    if keys:
        auth["api_keys"] = keys
    elif "INFERBRIDGE_API_KEYS" in env:
        logging.getLogger("inferbridge").warning(
            "INFERBRIDGE_API_KEYS is set but empty: ignored (the config's keys stay in force; "
            "INFERBRIDGE_AUTH=off turns auth off)"
        )
    switch = env.get("INFERBRIDGE_AUTH", "").strip().lower()
    if switch in ("off", "false", "0", "no"):
        auth["enabled"] = False
    if auth:
        out["auth"] = auth
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    data: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
    require_env: bool = True,
) -> Config:
    """Build a validated `Config` from a YAML file (or `data`), env and `overrides`.

    `overrides` has the same shape as the file (`{"server": {"port": 8080}}`); it is what
    the command line passes in. Every error names the file, the line and the field.
    `require_env=False` validates without the secrets: unset `os.environ/` variables are
    reported by `missing_env` instead of failing.
    """
    from inferbridge.backends.registry import settings_class

    env = os.environ if environ is None else environ
    source = Source.read(path) if data is None and path is not None else Source(None, {}, {})
    if data is None:
        data = source.data
    cli_models = (overrides or {}).get("models")
    if cli_models is not None:  # a one-backend start replaces the file's models
        data = {**data, "models": cli_models}
    data, missing = resolve_env(data, env, source.where)
    stand_ins = StandIns(missing)
    if missing and require_env:
        raise ConfigError(
            "environment variables the config names are not set:\n  "
            + "\n  ".join(f"{source.where(loc)}{dotted(loc)}: {name}" for loc, name in missing)
        )
    from_env = env_overrides(env)
    origins: dict[Location, str] = {
        (section, key): ENV_NAMES.get(key, f"INFERBRIDGE_{key.upper()}")
        for section, values in from_env.items()
        for key in values
    }
    origins.update(
        {
            (section, key): "--" + key.replace("_", "-")
            for section, values in (overrides or {}).items()
            if section != "models"
            for key in values
        }
    )
    for layer in (from_env, overrides or {}):
        for section, values in layer.items():
            if section == "models":  # resolved above, with the file
                continue
            merged = dict(data.get(section) or {})
            merged.update(values)
            data[section] = merged

    raw_models = data.get("models")
    if raw_models is None:
        raw_models = DEFAULT_MODELS
    if not isinstance(raw_models, list):
        raise ConfigError(f"{source.where(('models',))}models: must be a list of model entries")

    errors: list[str] = []
    try:
        base = stand_ins.validate(Config, {**data, "models": []}, ())
    except ValidationError as exc:
        errors.extend(_format_errors("", exc, source, (), origins))
        base = None

    deployments: list[DeploymentConfig] = []
    for i, entry in enumerate(raw_models):
        where = source.where(("models", i))
        if not isinstance(entry, dict):
            errors.append(f"{where}models[{i}]: must be a mapping with at least name and backend")
            continue
        label = f"models[{i}]" + (f" ({entry['name']})" if entry.get("name") else "")
        backend = entry.get("backend")
        if not backend:
            errors.append(f"{where}{label}: backend: field required")
            continue
        try:
            cls = settings_class(str(backend))
        except KeyError as exc:
            errors.append(
                f"{source.where(('models', i, 'backend'))}{label}: backend: {exc.args[0]}"
            )
            continue
        template_error = _template_error(cls, entry)
        if template_error is not None:
            field, message = template_error
            where = source.where(("models", i, field))
            errors.append(f"{where}{label}: {field}: {message}")
        try:
            deployments.append(stand_ins.validate(cls, entry, ("models", i)))
        except ValidationError as exc:
            lines = _format_errors(f"{label}: ", exc, source, ("models", i))
            if template_error is not None:  # said above, naming the field
                lines = [line for line in lines if f"{label}: (entry): " not in line]
            errors.extend(lines)

    if base is not None and not errors:
        errors.extend(_routing_errors(base, {d.name for d in deployments}))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    assert base is not None
    errors = assign_ids(deployments)
    if not errors:
        placeholders = {loc for loc, _ in missing}
        errors.extend(key_errors(base.auth, source, placeholders))
        errors.extend(build_errors(deployments, raw_models, source))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    base.models = deployments
    base.missing_env = sorted({name for _, name in missing})
    if not env.get(CONFIG_WARNED_ENV):
        for warning in shared_name_warnings(deployments):
            logging.getLogger("inferbridge").warning(warning)
    return base


def _template_error(cls: type[BaseModel], entry: dict[str, Any]) -> tuple[str, str] | None:
    """(field, message) when the entry's `prompt_template` or `chat_template_file` cannot
    be loaded (the settings class says so too, but of the whole entry)."""
    from inferbridge.templates import TemplateError, load_template

    name, file = entry.get("prompt_template"), entry.get("chat_template_file")
    if "prompt_template" not in cls.model_fields or (name and file):
        return None
    if not isinstance(name, str | None) or not isinstance(file, str | None):
        return None  # not a string: the field's own type check says so
    try:
        if name:
            load_template(name)
        elif file:
            load_template(file=file)
    except OSError as exc:
        return "chat_template_file", f"cannot read {file!r}: {exc.strerror or exc}"
    except (ValueError, TemplateError) as exc:
        return ("prompt_template" if name else "chat_template_file"), str(exc)
    return None


class StandIns:
    """Values for unset `os.environ/` variables when a config is checked without its
    secrets (`check --no-env`). Each starts as `<NAME>`; when a field refuses it (a URL
    that must start with http://, a login that must be user:password), the next stand-in
    is tried, so the rest of the file is still checked and the variable is only listed."""

    FORMS = ("<{}>", "http://{}.invalid", "redis://{}.invalid", "{0}:{0}")

    def __init__(self, missing: list[tuple[Location, str]]) -> None:
        self.names = dict(missing)

    def validate(self, cls: type[ModelT], data: dict[str, Any], base: Location) -> ModelT:
        tried: dict[Location, int] = {}
        while True:
            try:
                return cls.model_validate(data)
            except ValidationError as exc:
                locs = [(*base, *err["loc"]) for err in exc.errors()]
                if not all(loc in self.names for loc in locs):
                    raise
                for loc in locs:
                    tried[loc] = tried.get(loc, 0) + 1
                    if tried[loc] >= len(self.FORMS):
                        raise
                    form = self.FORMS[tried[loc]]
                    data = _replace(data, loc[len(base) :], form.format(self.names[loc]))


def _replace(data: Any, loc: Location, value: Any) -> Any:
    """A copy of `data` with the item at `loc` replaced."""
    if not loc:
        return value
    head, rest = loc[0], loc[1:]
    if isinstance(data, list):
        assert isinstance(head, int)
        return [_replace(v, rest, value) if i == head else v for i, v in enumerate(data)]
    return {k: _replace(v, rest, value) if k == head else v for k, v in data.items()}


def assign_ids(deployments: list[DeploymentConfig]) -> list[str]:
    """Give every entry without an `id:` its default, `name[i]`; ids must be unique."""
    counts: dict[str, int] = {}
    seen: set[str] = set()
    errors = []
    for d in deployments:
        i = counts[d.name] = counts.get(d.name, -1) + 1
        if d.id is None:
            d.id = f"{d.name}[{i}]"
        if d.id in seen:
            errors.append(f"models: id '{d.id}' is used by more than one entry")
        seen.add(d.id)
    return errors


def shared_name_warnings(deployments: list[DeploymentConfig]) -> list[str]:
    """Entries that share a `name` are deployments of one model: say so when they point at
    different backends or upstream models (a likely mistake)."""
    by_name: dict[str, list[DeploymentConfig]] = {}
    for d in deployments:
        by_name.setdefault(d.name, []).append(d)
    out = []
    for name, group in by_name.items():
        kinds = {(d.backend, d.target_model) for d in group}
        if len(kinds) > 1:
            listed = ", ".join(f"{b} {m}" for b, m in sorted(kinds))
            out.append(
                f"model '{name}': {len(group)} entries with different backends or upstream "
                f"models ({listed}) will be treated as deployments of one model"
            )
    return out


def _routing_errors(config: Config, names: set[str]) -> list[str]:
    """Aliases, fallbacks and `router.models` must name models that exist."""
    errors = []
    for alias, target in config.model_aliases.items():
        if alias in names:
            errors.append(f"model_aliases.{alias}: '{alias}' is already a model name")
        elif target not in names:
            errors.append(f"model_aliases.{alias}: unknown model '{target}'")
    known = names | set(config.model_aliases)
    for name, routing in config.router.models.items():
        if name not in names:
            errors.append(f"router.models.{name}: unknown model '{name}'")
        errors.extend(
            f"router.models.{name}.fallbacks: unknown model '{other}'"
            for other in routing.fallbacks
            if other not in known
        )
    for key in config.auth.named_keys:
        errors.extend(
            f"auth.keys ({key.name}).models: unknown model '{model}'"
            for model in key.models or ()
            if model not in known
        )
    return errors


def _label(i: int, d: DeploymentConfig) -> str:
    return f"models[{i}] ({d.name})"


def key_errors(auth: AuthConfig, source: Source, placeholders: set[tuple]) -> list[str]:
    """What the server's key ring refuses, found at load time: a `sha256:` value that is not
    64 hex digits, and one secret given twice (in any of the three lists). Values that stand
    in for unset variables (`check --no-env`) are not checked."""
    import hashlib

    listed: list[tuple[tuple, str]] = [
        (("auth", "api_keys", i), key) for i, key in enumerate(auth.api_keys)
    ]
    listed += [(("auth", "admin_keys", i), key) for i, key in enumerate(auth.admin_keys)]
    listed += [
        (("auth", "keys", i, "key_sha256"), f"sha256:{k.key_sha256}")
        if k.key_sha256
        else (("auth", "keys", i, "key"), k.key or "")
        for i, k in enumerate(auth.named_keys)
    ]
    errors = []
    seen: dict[bytes, tuple] = {}
    for loc, value in listed:
        if loc in placeholders:
            continue
        if value.startswith("sha256:"):
            try:
                secret = bytes.fromhex(value[len("sha256:") :].strip())
            except ValueError:
                secret = b""
            if len(secret) != 32:
                errors.append(
                    f"{source.where(loc)}{dotted(loc)}: a 'sha256:' key must be followed by 64 "
                    "hex digits (inferbridge keys hash prints one)"
                )
                continue
        else:
            secret = hashlib.sha256(value.encode()).digest()
        if secret in seen:
            errors.append(
                f"{source.where(loc)}{dotted(loc)}: the same key as {dotted(seen[secret])}"
            )
        else:
            seen[secret] = loc
    return errors


def build_errors(
    deployments: list[DeploymentConfig], raw_models: list[Any], source: Source
) -> list[str]:
    """Build every entry's adapter as the server will (no connection is opened), so what
    only an adapter refuses is reported now, naming the file, line and field; then check
    what each model serves (`mode:`): one model's entries agree on it, and an entry serves
    embeddings only when its backend makes them."""
    from inferbridge.backends import registry

    errors: list[str] = []
    built = []
    for i, d in enumerate(deployments):
        try:
            built.append(registry.create(d))
        except ConfigError as exc:
            message = str(exc).removeprefix(f"{d.describe()}: ")
            field = next((f for f in ("url", "tls", "headers") if f in raw_models[i]), None)
            loc = ("models", i, field) if field else ("models", i)
            errors.append(f"{source.where(loc)}{_label(i, d)}: {field or '(entry)'}: {message}")
    if errors:
        return errors
    first: dict[str, tuple[int, tuple[bool, bool]]] = {}
    for i, backend in enumerate(built):
        d = deployments[i]
        serves = (backend.serves("chat"), backend.serves("embedding"))
        where = source.where(("models", i, "mode") if "mode" in raw_models[i] else ("models", i))
        if serves[1] and not backend.makes_embeddings():
            errors.append(
                f"{where}{_label(i, d)}: mode: backend '{d.backend}' cannot serve embeddings "
                f"(mode: {backend.mode})"
            )
        if d.name not in first:
            first[d.name] = (i, serves)
        elif first[d.name][1] != serves:
            errors.append(
                f"{where}{_label(i, d)}: mode: serves other requests than models"
                f"[{first[d.name][0]}], an entry of the same model: give them one mode"
            )
    return errors
