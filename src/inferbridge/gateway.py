"""The running service: backends built from the config, auth, and request dispatch.

One `Gateway` exists per server process. It creates one adapter per config entry, opens
their clients at start-up and closes them at shutdown, checks API keys, and turns a
normalized request into a stream of event batches from the deployment the router picks
(fanning out `n > 1` and prompt lists for backends that cannot do them natively).
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from inferbridge.backends import registry
from inferbridge.backends.base import Backend
from inferbridge.config import Config
from inferbridge.errors import AuthenticationFailed
from inferbridge.events import Event
from inferbridge.fanout import fan_out
from inferbridge.observability import Observability
from inferbridge.request import InferenceRequest, RouteInfo
from inferbridge.router import Router


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        drop = config.server.drop_unsupported_params
        self.backends = [
            registry.create(entry, drop_unsupported_default=drop) for entry in config.models
        ]
        self.router = Router(self.backends)
        self._keys = [key.encode() for key in config.auth.api_keys]
        self.observability = Observability(
            log_prompts=config.server.log_prompts, access_log=config.server.access_log
        )

    async def start(self) -> None:
        for backend in self.backends:
            await backend.start()

    async def close(self) -> None:
        for backend in self.backends:
            await backend.close()

    # -- auth -----------------------------------------------------------------------------
    @property
    def auth_required(self) -> bool:
        return bool(self._keys)

    def authenticate(self, authorization: bytes | None, api_key: bytes | None = None) -> None:
        """Check `Authorization: Bearer KEY` (or an `api-key` header) in constant time."""
        if not self._keys:
            return
        presented = api_key
        if authorization:
            scheme, _, token = authorization.partition(b" ")
            if scheme.lower() == b"bearer":
                presented = token.strip()
        if not presented:
            raise AuthenticationFailed(
                "Missing API key: send it as 'Authorization: Bearer YOUR_KEY'."
            )
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(presented, key)
        if not ok:
            raise AuthenticationFailed("Incorrect API key provided.")

    # -- dispatch -------------------------------------------------------------------------
    def open_stream(
        self, request: InferenceRequest, route: RouteInfo
    ) -> tuple[AsyncIterator[Sequence[Event]], int]:
        """Pick a deployment and start the request; returns (event stream, choice count).

        Raises before returning for everything that can be known up front (unknown model,
        unsupported parameters), so those become plain HTTP errors. `route` is filled in
        with the deployment that serves the request.
        """
        backend = self.router.pick(request.model)
        route.model = request.model
        route.deployment = backend.label
        route.backend = backend.config.backend
        route.attempts += 1
        n = request.n
        if not backend.native_n and n > 1:
            request.params.pop("n", None)
            request.body.pop("n", None)
        backend.prepare(request)
        prompts = _prompt_list(request)
        choices = n * (len(prompts) if prompts is not None else 1)
        if backend.native_n or choices == 1:
            if prompts is not None and len(prompts) == 1:
                request.prompt = prompts[0]
            return backend.stream(request), choices
        return self._fan_out(backend, request, prompts or [request.prompt], n), choices

    def _fan_out(
        self, backend: Backend, request: InferenceRequest, prompts: list[Any], n: int
    ) -> AsyncIterator[Sequence[Event]]:
        streams = []
        prompt_of = []
        for p, prompt in enumerate(prompts):
            for _ in range(n):
                sub = replace(request, prompt=prompt, params=dict(request.params))
                streams.append(backend.stream(sub))
                prompt_of.append(p)
        return fan_out(streams, prompt_of)


def _prompt_list(request: InferenceRequest) -> list[Any] | None:
    """A legacy completion's prompts when it carries several (list of strings or of token
    lists); None for a single prompt."""
    prompt = request.prompt
    if request.kind != "completion" or not isinstance(prompt, list) or not prompt:
        return None
    if isinstance(prompt[0], int):
        return None  # one prompt given as token ids
    return prompt
