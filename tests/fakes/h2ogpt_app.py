"""A real Gradio app that answers like an h2oGPT server's `/submit_nochat_api`.

It runs in-process on a free 127.0.0.1 port (no share link, no analytics, Gradio login on)
and behaves like h2oGPT's `evaluate_nochat` (src/gradio_funcs.py): the single input is the
`str()` of a kwargs dict, parsed with `ast.literal_eval`; the output is the `str()` of a
dict whose `response` is cumulative. When `stream_output` is true it yields a growing
answer where every other key is blanked, then the full dict with `save_dict.extra_dict`
token counts (`num_prompt_tokens`, `ntokens`); otherwise it yields that full dict once.
A wrong `h2ogpt_key` is not an error on the wire: the job succeeds with `error` (and
`response`) set to h2oGPT's invalid-key message.

    with FakeH2OGPT() as fake:
        fake.url          # "http://127.0.0.1:PORT/"
        fake.received     # [Received(kwargs, username, session_hash)] as the app saw them

Modes, chosen by the instruction's first word:
- `slow ...`   a long answer, 3 characters per 50 ms (for disconnect / cancellation tests;
               without streaming, the whole answer after 1 s);
- `fail ...`   h2oGPT's exception path: an `error`/`error_ex` output, then the job fails;
- `crash ...`  two partial outputs, then the job fails (a Gradio error, no `error` output);
- otherwise    `fake.reply` (default `"You said: <instruction>"`), `fake.step` characters
  per yield, `fake.delay` seconds between yields.
"""

from __future__ import annotations

import ast
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr
import httpx

INVALID_KEY_MSG = (
    "Invalid Access Key, request access key from sales@h2o.ai or jon.mckinney@h2o.ai, pass API "
    "key through API calls, or set API key in Login tab for UI"
)
USERS = [("alice", "wonder"), ("bob", "builder")]
VALID_KEYS = {"good-key", "client-key"}


@dataclass
class Received:
    kwargs: dict[str, Any]
    username: str | None
    session_hash: str | None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _blank(full: dict[str, Any]) -> dict[str, Any]:
    """An intermediate streaming output: only `response` (and llm_answers/audio) are real."""
    out = {k: type(v)() if isinstance(v, str | list | dict) else None for k, v in full.items()}
    out.update(response=full["response"], llm_answers=full["llm_answers"], audio=b"")
    return out


class FakeH2OGPT:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.reply: str | None = None
        self.step = 4
        self.delay = 0.0
        self.report_usage = True
        self.cancelled: list[str] = []  # instructions whose generation was stopped early
        self.finished: list[str] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        self.port = _free_port()
        self.demo = self._build()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def reset(self) -> None:
        self.received.clear()
        self.cancelled.clear()
        self.finished.clear()
        self.reply, self.step, self.delay, self.report_usage = None, 4, 0.0, True
        self.max_active = 0

    # -- the app --------------------------------------------------------------------------
    def _build(self) -> gr.Blocks:
        with gr.Blocks() as demo:
            inp = gr.Textbox(visible=False)
            out = gr.Textbox(visible=False)
            button = gr.Button(visible=False)
            button.click(
                self.submit_nochat,
                inp,
                out,
                api_name="submit_nochat_api",
                queue=True,
                concurrency_limit=None,
            )
        return demo

    def _answer(self, instruction: str) -> tuple[str, float, int]:
        if instruction.startswith("slow"):
            return " ".join(f"w{i}" for i in range(400)), 0.05, 3
        return (
            (self.reply if self.reply is not None else f"You said: {instruction}"),
            (self.delay),
            self.step,
        )

    def submit_nochat(self, arg: str, request: gr.Request) -> Iterator[str]:
        kwargs = ast.literal_eval(arg)  # h2oGPT: str_api=True
        instruction = str(kwargs.get("instruction_nochat") or "")
        self.received.append(Received(kwargs, request.username, request.session_hash))
        key = kwargs.get("h2ogpt_key")
        if key not in VALID_KEYS:  # enforce_h2ogpt_api_key=True
            yield str(self._full(kwargs, INVALID_KEY_MSG, error=INVALID_KEY_MSG))
            return
        if instruction.startswith("fail"):
            yield str(
                {
                    "error": "CUDA out of memory",
                    "error_ex": "Traceback ...",
                    "sources": [],
                    "sources_str": "",
                    "prompt_raw": "",
                    "llm_answers": [],
                }
            )
            raise gr.Error("CUDA out of memory")
        if instruction.startswith("crash"):  # the job fails after some output
            yield str(_blank(self._full(kwargs, "part")))
            yield str(_blank(self._full(kwargs, "partial")))
            raise gr.Error("GPU fell off the bus")
        answer, delay, step = self._answer(instruction)
        limit = kwargs.get("max_new_tokens")
        if isinstance(limit, int):  # one "token" per word
            answer = " ".join(answer.split()[:limit])
        stream = bool(kwargs.get("stream_output"))
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        completed = False
        try:
            if stream:
                for end in range(step, len(answer), step):
                    yield str(_blank(self._full(kwargs, answer[:end])))
                    if delay:
                        time.sleep(delay)
            elif delay:  # generating without streaming: one output after a while (<= 1 s)
                time.sleep(min(1.0, delay * len(answer) / step))
            yield str(self._full(kwargs, answer))
            completed = True
            self.finished.append(instruction)
        finally:  # GeneratorExit when Gradio cancels the job
            with self._lock:
                self.active -= 1
            if not completed:
                self.cancelled.append(instruction)

    def _full(self, kwargs: dict[str, Any], response: str, error: str = "") -> dict[str, Any]:
        prompt = " ".join(
            [str(kwargs.get("system_prompt") or "")]
            + [f"{u} {a}" for u, a in kwargs.get("chat_conversation") or []]
            + [str(kwargs.get("instruction_nochat") or "")]
        )
        extra = {"t_generate": 0.01, "tokens_persecond": 100.0}
        if self.report_usage:
            extra.update(num_prompt_tokens=len(prompt.split()), ntokens=len(response.split()))
        save_dict = {
            "prompt": prompt,
            "output": response,
            "base_model": "fake/h2ogpt",
            "where_from": "fake",
            "error": error,
            "which_api": "str_api",
            "valid_key": not error,
            "h2ogpt_key": kwargs.get("h2ogpt_key"),
            "extra_dict": extra,
        }
        return {
            "response": response,
            "error": error,
            "sources": [],
            "sources_str": "",
            "prompt_raw": prompt,
            "llm_answers": {"response_raw": response},
            "save_dict": save_dict,
            "audio": b"",
        }

    # -- server-side cancellation (what a "Stop" click or an admin does) -------------------
    def cancel_all(self) -> int:
        """Cancel every running job through Gradio's own /cancel route; returns how many."""
        queue = self.demo._queue
        fn_index = next(
            dep["id"]
            for dep in self.demo.config["dependencies"]
            if dep.get("api_name") == "submit_nochat_api"
        )
        jobs = [(s, e) for s, events in queue.pending_event_ids_session.items() for e in events]
        with httpx.Client(base_url=self.url) as http:
            http.post("/login", data={"username": USERS[0][0], "password": USERS[0][1]})
            for session_hash, event_id in jobs:
                http.post(
                    "/gradio_api/cancel",
                    json={"session_hash": session_hash, "fn_index": fn_index, "event_id": event_id},
                )
        return len(jobs)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> FakeH2OGPT:
        self.demo.queue(default_concurrency_limit=None)
        self.demo.launch(
            server_name="127.0.0.1",
            server_port=self.port,
            prevent_thread_lock=True,
            share=False,
            quiet=True,
            show_error=True,
            ssr_mode=False,
            auth=USERS,
        )
        return self

    def stop(self) -> None:
        self.demo.close()

    def __enter__(self) -> FakeH2OGPT:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
