"""Runs a real inferbridge server (uvicorn, uvloop, httptools) on a free 127.0.0.1 port.

with InferbridgeServer({"models": [{"name": "m", "backend": "echo"}]}) as srv:
    client = srv.openai()          # the official SDK, pointed at srv.base_url
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import openai
import uvicorn

from inferbridge.app import create_app
from inferbridge.config import load_config


class InferbridgeServer:
    def __init__(
        self,
        config: dict[str, Any],
        *,
        api_key: str = "sk-test",
        **uvicorn_options: Any,
    ) -> None:
        """`uvicorn_options`: more `uvicorn.Config` arguments (`timeout_keep_alive`...)."""
        # Access logs off unless a test asks for them: they would print into pytest's output.
        server = {"access_log": False, **(config.get("server") or {})}
        self.config = load_config(data={**config, "server": server}, environ={})
        self.api_key = api_key
        self.uvicorn_options = uvicorn_options
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def openai(self, **kw: Any) -> openai.OpenAI:
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 20)
        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key, **kw)

    def async_openai(self, **kw: Any) -> openai.AsyncOpenAI:
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 20)
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, **kw)

    def start(self) -> InferbridgeServer:
        server = self.config.server
        self.uvicorn_options.setdefault("timeout_keep_alive", server.timeout_keep_alive)
        self.uvicorn_options.setdefault("limit_concurrency", server.limit_concurrency)
        config = uvicorn.Config(
            create_app(self.config),
            host="127.0.0.1",
            port=0,
            loop="uvloop",
            http="httptools",
            log_level="warning",
            access_log=False,
            lifespan="on",
            **self.uvicorn_options,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, daemon=True, name="inferbridge")
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("inferbridge did not start")
        return self

    def _run(self) -> None:
        assert self._server is not None
        import uvloop

        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        server = self._server
        assert server is not None
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()
                return
            await asyncio.sleep(0.01)
        self.port = server.servers[0].sockets[0].getsockname()[1]
        self._ready.set()
        await task

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> InferbridgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
