"""The `inferbridge` command: `inferbridge serve [--config FILE] [--host H] [--port P] ...`.

The configuration is loaded and validated here first, so a bad file is reported in plain
words (exit code 2) before any server starts. The server then runs on uvicorn with uvloop
and httptools; each worker process builds its app (`inferbridge.app.create_app`) from the
same file and overrides.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from typing import Any, get_args

import orjson
import yaml

from inferbridge import __version__, logs
from inferbridge.config import (
    CONFIG_WARNED_ENV,
    Config,
    ConfigError,
    ServerConfig,
    load_config,
)
from inferbridge.inference_server import InferenceServerError, parse_inference_server

STARTUP_FAILURE = 3
"""Exit code when the app's start-up failed (as uvicorn's own)."""

# The config file the Docker image mounts: used when no other is named.
DEFAULT_CONFIG = "/etc/inferbridge/config.yaml"


LOG_LEVELS: list[str] = sorted(
    get_args(ServerConfig.model_fields["log_level"].annotation), key=lambda name: logs.LEVELS[name]
)
"""The `server.log_level` values, most verbose first (the validator's own list)."""


def default_config() -> str | None:
    named = os.environ.get("INFERBRIDGE_CONFIG")
    if named:
        return named
    return DEFAULT_CONFIG if os.path.isfile(DEFAULT_CONFIG) else None


def config_origin(args: argparse.Namespace) -> str:
    """Where the config file in use was named: the flag, the variable or the default."""
    if getattr(args, "config_flag", False):
        return "--config"
    if os.environ.get("INFERBRIDGE_CONFIG"):
        return "INFERBRIDGE_CONFIG"
    return "the default config file"


class ConfigFlag(argparse.Action):
    """`--config FILE`, remembering that it was given on the command line."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        namespace.config = values
        namespace.config_flag = True


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inferbridge", description="OpenAI-compatible proxy for LLM serving backends."
    )
    parser.add_argument("--version", action="version", version=f"inferbridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument(
        "--config",
        "-c",
        action=ConfigFlag,
        default=default_config(),
        help="YAML config file (default: $INFERBRIDGE_CONFIG, else /etc/inferbridge/config.yaml "
        "when it exists; none: serve the 'echo' model)",
    )
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 5000)")
    serve.add_argument("--workers", type=int, help="worker processes (default 1)")
    serve.add_argument("--log-level", choices=LOG_LEVELS, help="(default info)")
    serve.add_argument(
        "--drop-unsupported-params",
        action="store_true",
        default=None,
        help="ignore parameters a backend does not support instead of answering 400",
    )
    serve.add_argument(
        "--inference-server",
        metavar="SPEC",
        help="serve one backend given as an h2oGPT --inference_server string "
        "(e.g. vllm:host:port, http://tgi:80, openai_azure_chat:DEPLOYMENT:BASEURL:VERSION); "
        "needs --model",
    )
    serve.add_argument(
        "--backend",
        action=Ordered,
        help="serve a model without a config file: the backend of the --model options after "
        "it (vllm, tgi, ollama, llamacpp, openai, ...)",
    )
    serve.add_argument("--url", action=Ordered, help="the upstream URL for the next --model")
    serve.add_argument(
        "--model",
        action=Ordered,
        help="a model to serve, with the --backend and --url given before it (repeatable); "
        "with --inference-server: h2oGPT's base_model",
    )
    serve.add_argument(
        "--prompt-template",
        action=Ordered,
        help="chat template for the --model options after it, on raw-prompt backends (tgi, "
        "llamacpp, replicate, sagemaker)",
    )
    serve.add_argument(
        "--print-config",
        action="store_true",
        help="print the configuration these options make, as YAML, and exit",
    )
    check = sub.add_parser("check", help="validate a config file and list its models")
    check.add_argument("--config", "-c", default=default_config())
    check.add_argument(
        "--no-env",
        action="store_true",
        help="validate without the secrets: list the environment variables the config needs",
    )
    check.add_argument(
        "--probe",
        action="store_true",
        help="connect to every entry and say what answers there (exit 1 if any fails)",
    )
    keys = sub.add_parser("keys", help="make keys for auth.keys (the config holds digests)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    keys_sub.add_parser("hash", help="read a key on stdin, print its key_sha256: line")
    new = keys_sub.add_parser("new", help="print a new random key and its auth.keys entry")
    new.add_argument("name", help="the key's name (in logs, metrics and /v1/usage)")
    return parser


def keys_command(args: argparse.Namespace) -> int:
    """`inferbridge keys hash` / `inferbridge keys new NAME`."""
    from pydantic import ValidationError

    from inferbridge.config_models import KeyConfig
    from inferbridge.keys import digest_line, new_key

    if args.keys_command == "hash":
        lines = [line.rstrip("\r") for line in sys.stdin.read().split("\n")]
        given = [line for line in lines if line]
        if len(given) != 1:
            print(
                "inferbridge: keys hash: give one key on stdin"
                + (f" (got {len(given)} lines)" if given else ""),
                file=sys.stderr,
            )
            return 2
        print(digest_line(given[0]))
        return 0
    try:
        KeyConfig(name=args.name, key="-")
    except ValidationError as exc:
        problem = exc.errors()[0]["msg"]
        print(f"inferbridge: keys new: invalid name {args.name!r}: {problem}", file=sys.stderr)
        return 2
    key, line = new_key(args.name)
    print(key)
    print(line)
    print(
        "# the first line is the key: give it to its user now, it is not stored anywhere; "
        "the second goes under auth.keys",
        file=sys.stderr,
    )
    return 0


def shared_limits(config: Config) -> list[str]:
    """Limits that need one count for every process: key limits and model rpm/tpm."""
    found = [f"auth.keys ({k.name})" for k in config.auth.named_keys if k.limited]
    models = config.router.models.items()
    found += [f"router.models.{name}" for name, m in models if m.rpm or m.tpm]
    return found


class Ordered(argparse.Action):
    """Keeps --backend, --url, --prompt-template and --model in the order given, so each
    --model takes the options written before it."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        seen = getattr(namespace, "ordered", None) or []
        seen.append((self.dest, values))
        namespace.ordered = seen
        setattr(namespace, self.dest, values)


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def model_entries(ordered: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Config entries from `--backend B --url U --model M ...` (see `Ordered`)."""
    current: dict[str, str] = {}
    entries: list[dict[str, Any]] = []
    trailing: list[str] = []  # options after the last --model: they would apply to none
    for dest, value in ordered:
        if dest != "model":
            current[dest] = value
            trailing.append(f"{flag(dest)} {value}")
            continue
        trailing = []
        if "backend" not in current:
            raise ConfigError(f"--model {value}: give --backend first (e.g. --backend vllm)")
        entry: dict[str, Any] = {"name": value, "backend": current["backend"]}
        if "url" in current:
            entry["url"] = current["url"]
        if "prompt_template" in current:
            entry["prompt_template"] = current["prompt_template"]
        entries.append(entry)
    if current and not entries:
        raise ConfigError("--backend and --url need at least one --model NAME after them")
    if trailing:
        raise ConfigError(
            f"{', '.join(trailing)}: after the last --model, so no model would use it; "
            "options apply to the --model options written after them (e.g. --backend tgi "
            "--url URL --prompt-template llama3 --model NAME)"
        )
    return entries


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    server = {
        key: value
        for key in ("host", "port", "workers", "log_level", "drop_unsupported_params")
        if (value := getattr(args, key, None)) is not None
    }
    out: dict[str, Any] = {"server": server} if server else {}
    spec = getattr(args, "inference_server", None)
    ordered = getattr(args, "ordered", None) or []
    if (spec is not None or ordered) and getattr(args, "config", None):
        raise ConfigError(
            f"{'--inference-server' if spec is not None else '--backend/--model'} serve "
            f"without a config file, but {config_origin(args)} names one ({args.config}): "
            "use one or the other (models of a file go under its models:)"
        )
    if spec is not None:
        if not spec.strip():
            raise ConfigError("--inference-server: empty; give e.g. vllm:127.0.0.1:8000")
        others = sorted({flag(d) for d, _ in ordered} - {"--model", "--prompt-template"})
        if others:
            raise ConfigError(
                f"--inference-server and {'/'.join(others)} both describe the backend: "
                "use one or the other"
            )
        if sum(1 for d, _ in ordered if d == "model") > 1:
            raise ConfigError(
                "--inference-server serves one model: give --model once (for several, use "
                "--backend B --url U --model M1 --model M2)"
            )
        if not args.model:
            raise ConfigError("--inference-server needs --model NAME (h2oGPT's --base_model)")
        try:
            entry = parse_inference_server(spec, args.model, prompt_template=args.prompt_template)
        except InferenceServerError as exc:
            raise ConfigError(str(exc)) from None
        out["models"] = [entry]
    elif ordered:
        out["models"] = model_entries(ordered)
    return out


def check(config: Config, args: argparse.Namespace) -> int:
    for entry in config.models:
        print(f"{entry.name}: {entry.describe()}")
    if config.missing_env:
        print("needs these environment variables: " + ", ".join(config.missing_env))
    if not args.probe:
        return 0
    import asyncio

    from inferbridge.probe import probe_all

    results = asyncio.run(probe_all(config))
    for status, line in results:
        print(f"{status:<6}{line}")
    return 1 if any(status == "FAIL" for status, _ in results) else 0


def printable(config: Config, overrides: dict[str, Any]) -> dict[str, Any]:
    """The YAML equivalent of the command line: what a config file would say."""
    out: dict[str, Any] = {}
    if overrides.get("server"):
        out["server"] = overrides["server"]
    out["models"] = overrides.get("models") or [
        m.model_dump(include={"name", "backend", "url", "upstream_model"}, exclude_none=True)
        for m in config.models
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "keys":
        return keys_command(args)
    if args.command != "serve":
        return command(args)
    with logs.held():  # warnings while the config loads, replayed in the configured format
        return command(args)


def command(args: argparse.Namespace) -> int:
    no_env = args.command == "check" and args.no_env
    try:
        overrides = _overrides(args)
        config = load_config(args.config, overrides=overrides, require_env=not no_env)
    except ConfigError as exc:
        print(f"inferbridge: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        return check(config, args)
    if args.print_config:
        print(yaml.safe_dump(printable(config, overrides), sort_keys=False), end="")
        return 0

    import uvicorn

    server = config.server
    if not config.auth.required and not server.loopback() and not server.allow_open:
        print(
            f"inferbridge: refusing to serve on {server.host} without API keys: anyone who "
            "reaches this address could spend your upstreams. Configure auth.api_keys, or "
            "set server.allow_open: true (INFERBRIDGE_ALLOW_OPEN=true) if that is meant.",
            file=sys.stderr,
        )
        return 2
    limited = shared_limits(config)
    if server.workers > 1 and config.state.store == "memory" and limited:
        print(
            f"inferbridge: refusing to start {server.workers} workers with rate limits "
            f"({', '.join(limited)}) and state.store: memory: each worker would count on its "
            "own, allowing several times each limit. Configure Redis (state: {store: redis, "
            "url: redis://HOST:6379/0}) or run one worker.",
            file=sys.stderr,
        )
        return 2
    log_format = logs.resolve_format(server.log_format)
    if args.config:
        os.environ["INFERBRIDGE_CONFIG"] = os.path.abspath(args.config)
    os.environ[CONFIG_WARNED_ENV] = "1"  # the warnings are out: the workers say them no more
    os.environ["INFERBRIDGE_CLI_OVERRIDES"] = orjson.dumps(overrides).decode()
    if server.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Several processes: /metrics aggregates them through a shared folder.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="inferbridge-metrics-")
    uvicorn_config = uvicorn.Config(
        "inferbridge.app:create_app",
        factory=True,
        host=server.host,
        port=server.port,
        workers=server.workers,
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        http="httptools",
        # every process, workers included, configures logging from this (logs.py)
        log_config=logging_config(log_format, server.log_level, address(server)),
        log_level=server.log_level,
        access_log=False,  # inferbridge writes its own JSON access log, off the loop
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=server.drain_timeout,
        timeout_keep_alive=server.timeout_keep_alive,
        limit_concurrency=server.limit_concurrency,
    )
    logs.replay()  # logging is configured now (uvicorn.Config did it)
    return run_server(uvicorn_config)


def address(server: ServerConfig) -> str:
    """`host:port` as a person would write it (IPv6 in brackets)."""
    host = f"[{server.host}]" if ":" in server.host else server.host
    return f"{host}:{server.port}"


class StartupFailure:
    """A logging filter for `uvicorn.error`: a start-up that failed with one of inferbridge's
    own errors (a deployment without a chat template, a configuration error) is logged as
    that error's message, in one line, instead of the framework's traceback of it. Other
    failures (bugs) keep their traceback."""

    def __init__(self, address: str = "") -> None:
        self.address = address

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if isinstance(record.msg, OSError) and self.address:  # the bind failed
            record.msg = f"cannot listen on {self.address}: {message}"
            record.args = None
            return True
        if not message.startswith("Traceback (most recent call last):"):
            return True
        last = message.rstrip().rsplit("\n", 1)[-1]
        kind, sep, text = last.partition(": ")
        if sep and kind.startswith("inferbridge."):
            record.msg = f"start-up failed: {text}"
            record.args = None
            record.exc_info = None
        return True


def logging_config(log_format: str, level: str, address: str = "") -> dict[str, Any]:
    """`logs.logging_config` with `StartupFailure` on uvicorn's error logger (`address`:
    where the server listens, for a failed bind's message)."""
    config = logs.logging_config(log_format, level)
    config.setdefault("filters", {})["startup_failure"] = {
        "()": f"{__name__}.StartupFailure",
        "address": address,
    }
    config["loggers"]["uvicorn.error"]["filters"] = ["startup_failure"]
    return config


def run_server(config: Any) -> int:
    """Bind the listening socket, then serve on it: in this process, or in `workers`
    processes that share it. Binding first (as uvicorn does for several workers) means the
    address is known, port 0 included, before any app starts: it is published in
    `INFERBRIDGE_BOUND_ADDRESS` for the start-up line of each worker (`logs.log_startup`)."""
    import inspect

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    sock = config.bind_socket()  # logs "Uvicorn running on ..."; exits 3 if it cannot bind
    host, port = sock.getsockname()[:2]
    os.environ[logs.BOUND_ADDRESS_ENV] = (
        f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    )
    server = uvicorn.Server(config)
    try:
        if config.workers > 1:
            options: dict[str, Any] = {"sockets": [sock]}
            if "target" in inspect.signature(Multiprocess).parameters:  # uvicorn < 0.36
                options["target"] = server.run
            supervisor = Multiprocess(config, **options)
            supervisor.run()
            if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
                return STARTUP_FAILURE  # a worker's start-up failed: the parent stopped
        else:
            server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    if config.workers == 1 and not server.started:
        return STARTUP_FAILURE
    return 0
