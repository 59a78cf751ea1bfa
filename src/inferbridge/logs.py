"""Process logs: one format on stderr for inferbridge, uvicorn and every library, in every
worker process, and the start-up line.

`inferbridge serve` hands uvicorn `logging_config(format, level)`, a `logging.config`
dictionary. uvicorn applies it in the serving process and again in each worker process it
spawns (`--workers N`), so every process logs the same way: one handler on the root logger,
writing to stderr with `JsonFormatter` (one JSON object per line, the default when stderr is
not a terminal) or `TextFormatter` (readable lines, the default on a terminal), chosen by
`server.log_format` (`INFERBRIDGE_LOG_FORMAT`). uvicorn's own loggers have no handler of
their own and propagate to it.

The access log is not written through `logging`: `observability.AccessLogWriter` writes its
JSON lines from a background thread, whatever the format here. The two kinds of JSON line
can be told apart by their keys: a log line has `level` and `message`, an access line
`request_id` and `status`.

The start-up line (`log_startup`) lists each model with its backends, deployment count and
aliases, whether auth is on, and the address the server listens on. `inferbridge serve`
binds the socket itself before any worker starts, and publishes the bound address in
`INFERBRIDGE_BOUND_ADDRESS` (`BOUND_ADDRESS_ENV`), so each worker's lifespan, which runs
after the bind, can name the address really bound (`--port 0` included). Under a plain
`uvicorn --factory inferbridge.app:create_app`, uvicorn binds after the app's start-up and
its own "Uvicorn running on ..." line names the address; the start-up line then says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from inferbridge.gateway import Gateway

BOUND_ADDRESS_ENV = "INFERBRIDGE_BOUND_ADDRESS"
"""Set by `inferbridge serve` once the listening socket is bound: `http://HOST:PORT`."""

FORMATS = ("json", "text")

LEVELS = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": 5,  # uvicorn's TRACE
}


def resolve_format(setting: str | None, stream: Any = None) -> str:
    """`json` or `text`: the setting when given, else text on a terminal and JSON
    otherwise."""
    if setting:
        if setting not in FORMATS:
            raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {setting!r}")
        return setting
    stream = sys.stderr if stream is None else stream
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # no stream, or a closed one
        return "json"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `ts` (Unix time), `level`, `logger`, `message`, `pid`,
    then the record's `fields` (a dict given as `extra={"fields": {...}}`), then `exc` (the
    traceback) when there is one. uvicorn's `color_message` is left out."""

    def __init__(self, *args: Any, use_colors: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": int(record.created * 1000) / 1000,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """`2026-01-02 10:11:12,345 INFO inferbridge: message` (the record's `fields` are not
    repeated: the message says the same in words)."""

    def __init__(self, *args: Any, use_colors: bool | None = None, **kwargs: Any) -> None:
        if not args and "fmt" not in kwargs:
            kwargs["fmt"] = "%(asctime)s %(levelname)s %(name)s: %(message)s"
        super().__init__(*args, **kwargs)


def logging_config(log_format: str, level: str = "info") -> dict[str, Any]:
    """The `logging.config.dictConfig` dictionary for every inferbridge process (uvicorn's
    `log_config`). Formatters are named `default` and `access` as in uvicorn's own, so
    uvicorn's `use_colors` handling finds them."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {log_format!r}")
    formatter = {"()": f"inferbridge.logs.{'Json' if log_format == 'json' else 'Text'}Formatter"}
    number = LEVELS[level.lower()]
    inherit = {"handlers": [], "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": dict(formatter), "access": dict(formatter)},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "uvicorn": {**inherit, "level": number},
            "uvicorn.error": {**inherit, "level": number},
            "uvicorn.access": {**inherit, "level": number},
            "inferbridge": {**inherit, "level": number},
        },
        "root": {"handlers": ["stderr"], "level": number},
    }


class Held(logging.Handler):
    """Keeps the records logged before logging is configured (the config's warnings)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_held: Held | None = None


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold what is logged until `replay()` (called once logging is configured), and
    replay whatever is left when the block ends: `inferbridge serve` reads its config, which
    may warn, before it knows the log format."""
    global _held
    _held = Held()
    logging.getLogger().addHandler(_held)
    try:
        yield
    finally:
        replay()


def replay() -> None:
    """Remove the `held()` handler and log its records again, through the handlers in place
    now."""
    global _held
    holder, _held = _held, None
    if holder is None:
        return
    logging.getLogger().removeHandler(holder)
    for record in holder.records:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


# -- the start-up line ---------------------------------------------------------------------
def models_summary(gateway: Gateway) -> list[dict[str, Any]]:
    """Each model: its name, backends, deployment count and aliases."""
    router = gateway.router
    aliases: dict[str, list[str]] = {}
    for alias, target in router.aliases.items():
        aliases.setdefault(target, []).append(alias)
    return [
        {
            "name": name,
            "backends": list(dict.fromkeys(d.backend.config.backend for d in group.deployments)),
            "deployments": len(group.deployments),
            "aliases": aliases.get(name, []),
        }
        for name, group in router.groups.items()
    ]


def describe_model(model: dict[str, Any]) -> str:
    n = model["deployments"]
    text = f"{model['name']} ({'+'.join(model['backends'])}, {n} deployment{'s' * (n != 1)}"
    if model["aliases"]:
        text += f"; aliases {', '.join(model['aliases'])}"
    return text + ")"


def log_startup(gateway: Gateway, version: str, auth: str) -> None:
    """The start-up line of this process (see the module doc for the address)."""
    models = models_summary(gateway)
    address = os.environ.get(BOUND_ADDRESS_ENV) or None
    where = address or "the address in uvicorn's 'Uvicorn running on' line"
    logging.getLogger("inferbridge").info(
        "inferbridge %s listening on %s (pid %d); models: %s; auth %s",
        version,
        where,
        os.getpid(),
        "; ".join(describe_model(m) for m in models) or "(none)",
        auth,
        extra={
            "fields": {
                "event": "startup",
                "version": version,
                "address": address,
                "models": models,
                "auth": auth,
                "auth_required": gateway.auth_required,
                "started": int(time.time()),
            }
        },
    )
