"""Fault injection for the router tests: an OpenAI-compatible fake that fails on cue.

`FaultyOpenAI` is `FakeOpenAI` plus:

- `faults`: a queue of `Fault`s, one consumed per completion request (then the normal
  behaviour resumes): an HTTP status with an optional `Retry-After`, after an optional stall;
- `retry_after`: a `Retry-After` header on every error the `behaviour.status` produces;
- `healthy`: when False, `GET /v1/models` (the health probe below) answers 503;
- `served`: how many completion requests it received (health probes not counted).

Stalls before the first byte, stalls and deaths mid-stream come from the base `Behaviour`
(`delay_first_byte`, `delay_between_chunks`, `drop_after_chunks`). A refused connection is
`closed_port_url()`: a port nothing listens on.

`HealthCheckedBackend` is the OpenAI-compatible adapter with a `health()` method (GET
/models), registered under the backend name `vllm-health` by the `health_backend` fixture
of the router tests.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from aiohttp import web

from inferbridge.backends.openai_compat import OpenAICompatBackend
from tests.fakes.openai_compat import FakeOpenAI


@dataclass
class Fault:
    status: int = 503
    retry_after: str | None = None
    delay: float = 0.0


class FaultyOpenAI(FakeOpenAI):
    def __init__(self) -> None:
        super().__init__()
        self.faults: list[Fault] = []
        self.retry_after: str | None = None
        self.healthy = True

    @property
    def served(self) -> int:
        return sum(1 for r in self.requests if r.method == "POST")

    async def _answer(self, request: web.Request, chat: bool) -> web.StreamResponse:
        if not self.faults:
            return await super()._answer(request, chat)
        fault = self.faults.pop(0)
        await self.record(request)
        if fault.delay:
            await asyncio.sleep(fault.delay)
        headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
        return web.json_response(
            {
                "error": {
                    "message": f"injected {fault.status}",
                    "type": "fault",
                    "param": None,
                    "code": fault.status,
                }
            },
            status=fault.status,
            headers=headers,
        )

    def error_response(self) -> web.Response:
        resp = super().error_response()
        if self.retry_after:
            resp.headers["Retry-After"] = self.retry_after
        return resp

    async def models(self, request: web.Request) -> web.Response:
        if not self.healthy:
            await self.record(request)
            return web.json_response({"error": {"message": "loading"}}, status=503)
        return await super().models(request)


def closed_port_url() -> str:
    """A base URL on which every connection is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


class HealthCheckedBackend(OpenAICompatBackend):
    async def health(self) -> None:
        async with self.http.request("GET", "/models") as resp:
            await resp.read()
