"""h2oGPT: an h2oGPT Gradio server (`generate.py`), called through the official gradio_client.

Each request is one job on the `/submit_nochat_api` endpoint. Its single input is the Python
literal of a kwargs dict (`instruction_nochat`, `system_prompt`, `chat_conversation`,
`max_new_tokens`, sampling fields, `h2ogpt_key`, and every extra the client sent); its output
is the `str()` of a dict, parsed with `ast.literal_eval`. h2oGPT streams by re-sending the
whole answer so far, so deltas are the new suffix of `response`. Token counts come from the
last output's `save_dict.extra_dict`; h2oGPT reports no finish reason (see docs/backends).

gradio_client is synchronous. Every blocking call (opening a client, submitting, waiting for
outputs, cancelling) runs on this deployment's own thread pool (`max_workers` threads), in
short slices so that many requests share it fairly, and never on the event loop.

Why a pool of clients and not one: Gradio's `/cancel` stops *every* running job of the
same session and endpoint, and a gradio_client `Client` is one session. Cancelling one
request on a shared client would kill (and hang) all the others. So each in-flight request
holds its own `Client` (one session), taken from a pool that keeps up to `max_workers` idle
ones for reuse: the first is opened at start-up, more as concurrency needs them. A client
whose job was cancelled or broke is closed rather than reused.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import contextlib
import inspect
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, field_validator

from inferbridge.backends.base import Backend
from inferbridge.config import DeploymentConfig
from inferbridge.errors import (
    InvalidRequest,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from inferbridge.events import Event, Finish, TextDelta, Usage
from inferbridge.request import InferenceRequest, message_text
from inferbridge.stops import StopCutter

log = logging.getLogger("inferbridge.h2ogpt")

INVALID_KEY_PREFIX = "Invalid Access Key"  # h2oGPT src/enums.py invalid_key_msg
_SLICE = 0.25  # longest one pool thread waits on one job before it is handed back
_STEP = 0.01
_MAX_LOGINS = 32  # logins whose idle clients are kept (least recently used are closed)


class H2OGPTSettings(DeploymentConfig):
    url: str  # type: ignore[assignment]  # required: the Gradio server, e.g. http://host:7860
    prompt_type: str | None = None  # h2oGPT prompt_type for chat (default: the model's own)
    langchain_mode: str | None = None  # e.g. LLM, UserData
    visible_models: int | str | None = None  # model_lock servers: index or base_model name
    auth: str | None = None  # Gradio login, "user:password"
    login_from_user: bool = Field(
        default=True, description="Log in with the request's `user` when it is 'name:password'."
    )
    max_workers: int = Field(default=16, ge=1, le=1024, description="Blocking-call threads.")
    api_name: str = "/submit_nochat_api"

    @field_validator("auth")
    @classmethod
    def _user_colon_password(cls, value: str | None) -> str | None:
        if value is not None and ":" not in value:
            raise ValueError("must be 'user:password'")
        return value


# -- OpenAI messages -> h2oGPT kwargs ---------------------------------------------------------
def chat_fields(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """`instruction_nochat`, `system_prompt` and `chat_conversation` for a conversation.

    System messages are joined into `system_prompt`; tool results are folded into the next
    user turn (as h2oGPT's own OpenAI server does); consecutive turns of one role are joined;
    empty messages are dropped. The conversation must end with a user turn.
    """
    system: list[str] = []
    turns: list[list[str]] = []
    tools: list[str] = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if isinstance(content, list) and any(
            isinstance(p, dict) and p.get("type") not in ("text", "input_text") for p in content
        ):
            raise InvalidRequest(
                "h2oGPT models take text content only.", param=f"messages[{i}].content"
            )
        text = message_text(content)
        if role in ("system", "developer"):
            system += [text] if text else []
            continue
        if role in ("tool", "function"):
            tools += [f"# Tool result:\n{text}"] if text else []
            continue
        if role != "assistant" and tools:
            text, tools = "\n\n".join([*tools, text] if text else tools), []
        if not text:
            continue
        kind = "assistant" if role == "assistant" else "user"
        if turns and turns[-1][0] == kind:
            turns[-1][1] += "\n\n" + text
        else:
            turns.append([kind, text])
    if tools:
        turns.append(["user", "\n\n".join(tools)])
    if not turns or turns[-1][0] != "user":
        raise InvalidRequest(
            "The conversation must end with a user message for h2oGPT models.", param="messages"
        )
    fields: dict[str, Any] = {"instruction_nochat": turns.pop()[1]}
    if system:
        fields["system_prompt"] = "\n\n".join(system)
    history = [  # turns alternate and end with an assistant turn
        (turns[i - 1][1] if i else "", text) for i, (kind, text) in enumerate(turns)
        if kind == "assistant"
    ]  # fmt: skip
    if history:
        fields["chat_conversation"] = history
    return fields


def parse_output(raw: Any) -> dict[str, Any]:
    """One `/submit_nochat_api` output: the str() of a dict (a JSON object is accepted too)."""
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        raise ValueError(f"unexpected output type {type(raw).__name__}")
    try:
        value = ast.literal_eval(raw)  # a literal parser: never eval()
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError(f"output is a {type(value).__name__}, not a dict")
    return value


# -- blocking side (runs on the deployment's thread pool) ---------------------------------------
@dataclass
class _Poll:
    outputs: list[Any] = field(default_factory=list)  # parsed dicts, or the parse error
    done: bool = False
    error: BaseException | None = None  # the job's own failure
    final: Any = None  # parsed result of a job that ended


def _parsed(raw: Any) -> Any:
    try:
        return parse_output(raw)
    except Exception as exc:  # reported on the event loop, naming the backend
        return ValueError(f"{exc}: {str(raw)[:200]!r}")


def _poll(job: Any, seen: int) -> _Poll:
    """Wait (at most one slice) for outputs past `seen` or for the end of the job."""
    end = time.monotonic() + _SLICE
    while True:
        done = job.done()  # read before the outputs, so none is missed at the end
        outputs = job.outputs()
        if len(outputs) > seen or done or time.monotonic() >= end:
            poll = _Poll([_parsed(o) for o in outputs[seen:]], done)
            if done:
                poll.error = job.exception()
                if poll.error is None:
                    result = job.result()
                    poll.final = None if result in (None, "", {}) else _parsed(result)
            return poll
        time.sleep(_STEP)


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:  # best effort: the job or client is being abandoned anyway
        log.debug("h2oGPT cleanup call failed", exc_info=True)


Login = tuple[str, str] | None  # a Gradio username/password; None: the entry's `auth`


class H2OGPTBackend(Backend):
    Settings = H2OGPTSettings
    supported_params = frozenset({"max_tokens", "temperature", "top_p", "seed", "stop", "user"})
    forwards_extras = True  # h2oGPT's kwargs vary by version; it ignores unknown keys

    def __init__(self, config: DeploymentConfig) -> None:
        super().__init__(config)
        assert isinstance(config, H2OGPTSettings)
        self.settings = config
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._entry_auth = tuple(config.auth.split(":", 1)) if config.auth else None
        # Idle clients per login, each serving one request at a time (see module doc);
        # only touched from the event loop.
        self._idle: OrderedDict[Login, list[Any]] = OrderedDict({None: []})

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            self.settings.max_workers, thread_name_prefix="h2ogpt"
        )
        try:  # warm one client; a server that is not up yet is retried per request
            self._idle[None].append(await self._run(self._open_client, None))
        except Exception as exc:
            log.warning("%s: not connected at start-up (retried per request): %s", self.label, exc)

    async def close(self) -> None:
        self._drain()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    # -- blocking calls, off the event loop -------------------------------------------------
    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._executor is None:
            raise UpstreamError(f"{self.label}: client not started", backend=self.label)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _later(self, fn: Callable[[], Any]) -> None:
        """Fire-and-forget a blocking call (usable in `finally`, where nothing is awaited)."""
        if self._executor is not None:
            with contextlib.suppress(RuntimeError):  # shutting down
                self._executor.submit(_quietly, fn)

    def _open_client(self, login: Login) -> Any:
        import httpx
        from gradio_client import Client

        # gradio_client sends telemetry unless this is off, even with analytics_enabled=False.
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        cfg = self.settings
        # Reads include the job's event stream: Gradio heartbeats it every 15 s or so.
        timeout = httpx.Timeout(max(cfg.timeout, 60.0), connect=cfg.connect_timeout)
        # gradio_client opens a new httpx client per call: skip loading CA certificates
        # (~60 ms of CPU each) where there is no TLS to verify.
        wanted = dict(auth=login or self._entry_auth, verbose=False, download_files=False,
                      max_workers=2, headers=dict(cfg.headers) or None, analytics_enabled=False,
                      httpx_kwargs={"timeout": timeout},
                      ssl_verify=not cfg.url.startswith("http://"))  # fmt: skip
        accepted = inspect.signature(Client).parameters  # gradio_client 1.x and 2.x differ
        return Client(cfg.url, **{k: v for k, v in wanted.items() if k in accepted})

    # -- clients per login ------------------------------------------------------------------
    def _login(self, request: InferenceRequest) -> Login:
        user = request.params.get("user")
        if self.settings.login_from_user and isinstance(user, str) and ":" in user:
            name, _, password = user.partition(":")
            return name, password
        return None

    async def _acquire(self, login: Login) -> Any:
        idle = self._idle.get(login)
        if idle:
            return idle.pop()
        if self._executor is None:
            raise UpstreamError(f"{self.label}: client not started", backend=self.label)
        future = asyncio.get_running_loop().run_in_executor(
            self._executor, self._open_client, login
        )
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:  # don't leak a client opened for a gone request
            future.add_done_callback(
                lambda f: f.cancelled() or f.exception() or self._later(f.result().close)
            )
            raise
        except Exception as exc:
            raise self._connect_error(exc, login) from None

    def _release(self, login: Login, client: Any, reusable: bool) -> None:
        idle = self._idle.setdefault(login, [])
        self._idle.move_to_end(login)
        if reusable and len(idle) < self.settings.max_workers:
            idle.append(client)
        else:
            self._later(client.close)
        while len(self._idle) > _MAX_LOGINS:  # forget the least recently used logins
            oldest = next(key for key in self._idle if key is not None)
            for stale in self._idle.pop(oldest):
                self._later(stale.close)

    def _drain(self) -> None:
        for clients in self._idle.values():
            for client in clients:
                self._later(client.close)
            clients.clear()

    def _connect_error(self, exc: Exception, login: Login) -> UpstreamError:
        label, text = self.label, f"{type(exc).__name__}: {exc}"
        if type(exc).__name__ == "AuthenticationError" or "Could not login" in str(exc):
            if login is not None:
                message = f"{label} refused the login of user '{login[0]}' (the request's `user`)"
                return UpstreamRejected(message, status=400, param="user", backend=label)
            if self._entry_auth is None:
                message = f"{label} requires a login: set auth: 'user:password' in its entry"
            else:
                message = f"{label} refused the login in its entry (auth)"
            return UpstreamError(f"{message} ({text})", backend=label)
        if "Timeout" in type(exc).__name__:
            return UpstreamTimeout(f"{label} did not answer in time: {text}", backend=label)
        return UpstreamError(f"{label} is unreachable or not a Gradio app: {text}", backend=label)

    # -- the request ------------------------------------------------------------------------
    def payload(self, request: InferenceRequest) -> dict[str, Any]:
        """The `/submit_nochat_api` kwargs: entry settings < client extras < derived fields."""
        cfg, params = self.settings, request.params
        visible = cfg.visible_models if cfg.visible_models is not None else cfg.upstream_model
        entry = {"langchain_mode": cfg.langchain_mode, "visible_models": visible,
                 "h2ogpt_key": cfg.api_key}  # fmt: skip
        out: dict[str, Any] = {k: v for k, v in entry.items() if v is not None}
        if request.kind == "chat" and cfg.prompt_type:
            out["prompt_type"] = cfg.prompt_type
        if request.kind == "completion":  # the prompt is sent as it is: no template, no system
            out.update(prompt_type="plain", system_prompt="")
        out.update(request.extras)
        if "max_tokens" in params:
            out["max_new_tokens"] = params["max_tokens"]
        for key in ("temperature", "top_p", "seed"):
            if key in params:
                out[key] = params[key]
        if "do_sample" not in request.extras:  # h2oGPT only samples when do_sample is set
            if "temperature" in params:
                out["do_sample"] = params["temperature"] > 0
            elif params.get("top_p", 1) < 1:
                out["do_sample"] = True
        if request.kind == "chat":
            out.update(chat_fields(request.messages or []))
        else:
            if not isinstance(request.prompt, str):
                raise InvalidRequest("'prompt' must be a string for this model.", param="prompt")
            out["instruction_nochat"] = request.prompt
        out["stream_output"] = request.stream or bool(request.stop)  # stops cut early
        return out

    async def stream(self, request: InferenceRequest) -> AsyncIterator[list[Event]]:
        payload = self.payload(request)
        login = self._login(request)
        client = await self._acquire(login)
        job: Any = None
        api = self.settings.api_name
        reusable = False  # a client whose job ended on its own can serve again
        try:
            try:
                job = await self._run(lambda: client.submit(repr(payload), api_name=api))
            except Exception as exc:
                message = f"{self.label}: cannot call {api}: {type(exc).__name__}: {exc}"
                raise UpstreamError(message, backend=self.label) from None
            deadline = time.monotonic() + self.settings.timeout
            cutter = StopCutter(request.stop)
            text, last, seen = "", None, 0
            while True:
                poll: _Poll = await self._run(_poll, job, seen)
                seen += len(poll.outputs)
                if poll.done:
                    error = type(poll.error).__name__
                    reusable = poll.final is not None if poll.error is None else error == "AppError"
                batch: list[Event] = []
                for data in poll.outputs + ([poll.final] if poll.final is not None else []):
                    try:
                        self._check(data, "h2ogpt_key" in request.extras)
                    except UpstreamError:
                        if batch:  # the text before the error still reaches the client
                            yield batch
                        raise
                    response = str(data.get("response") or "")
                    piece, text, last = response[len(text) :], response, data  # cumulative
                    batch += [TextDelta(out)] if (out := cutter.feed(piece)) else []
                    if cutter.stopped:  # `finally` cancels the rest of the generation
                        yield [*batch, Finish("stop")]
                        return
                if poll.done:
                    if poll.error is not None or poll.final is None:
                        if batch:
                            yield batch
                        self._job_failed(poll.error)
                    batch += [TextDelta(rest)] if (rest := cutter.flush()) else []
                    yield batch + self._ending(last, payload)
                    return
                if batch:
                    yield batch
                if time.monotonic() > deadline:
                    message = f"{self.label} did not finish in {self.settings.timeout:g} s"
                    raise UpstreamTimeout(message, backend=self.label)
        finally:
            if job is not None and not job.done():
                self._later(job.cancel)  # client gone, stop string, timeout or error
            self._release(login, client, reusable)

    def _check(self, data: Any, key_from_client: bool) -> None:
        """Raise for an output that failed: h2oGPT reports errors inside a successful job."""
        label = self.label
        if isinstance(data, Exception):
            message = f"{label} sent an output that is not a dict literal: {data}"
            raise UpstreamError(message, backend=label)
        error = data.get("error")
        if not error:
            return
        message = str(error)[:500]
        if not message.startswith(INVALID_KEY_PREFIX):
            raise UpstreamError(f"{label} reported an error: {message}", backend=label)
        if key_from_client:  # the client's own key: its mistake
            message = f"{label} rejected the h2ogpt_key sent in the request: {message}"
            raise UpstreamRejected(message, status=400, param="h2ogpt_key", backend=label)
        message = f"{label} rejected inferbridge's h2ogpt_key (the entry's api_key): {message}"
        raise UpstreamError(message, backend=label)

    def _job_failed(self, error: BaseException | None) -> None:
        label = self.label
        if type(error).__name__ == "AppError":
            raise UpstreamError(f"{label} reported an error: {error}", backend=label)
        if type(error).__name__ == "QueueError":  # Gradio's queue is full (HTTP 503)
            raise UpstreamUnavailable(f"{label} is busy: {error}", backend=label)
        self._drain()  # the server may have restarted: reconnect next time
        if error is None or isinstance(error, KeyError | concurrent.futures.CancelledError):
            message = (f"{label} ended the job without an answer (cancelled on the server, "
                       "or the connection to it was lost)")  # fmt: skip
            raise UpstreamError(message, backend=label)
        raise UpstreamError(f"{label} failed: {type(error).__name__}: {error}", backend=label)

    def _ending(self, last: dict[str, Any] | None, payload: dict[str, Any]) -> list[Event]:
        """Finish (h2oGPT gives no reason: "length" when max_new_tokens was reached) and the
        token counts of the final output's save_dict, when it has them."""
        save = (last or {}).get("save_dict")
        extra = save.get("extra_dict") if isinstance(save, dict) else None
        extra = extra if isinstance(extra, dict) else {}
        prompt, completion = extra.get("num_prompt_tokens"), extra.get("ntokens")
        limit = payload.get("max_new_tokens")
        hit = isinstance(completion, int) and isinstance(limit, int) and completion >= limit
        events: list[Event] = [Finish("length" if hit else "stop")]
        if isinstance(prompt, int) and isinstance(completion, int):
            events.append(Usage(prompt, completion))
        return events
