"""The running service: backends built from the config, auth, and request dispatch.

One `Gateway` exists per server process. It creates one adapter per config entry, opens
their clients at start-up (and the optional health checks) and closes them at shutdown once
requests in progress have ended, checks API keys, and turns a normalized request into a
stream of event batches: `routing.attempts.routed_stream`, which picks deployments through
the `Router`, retries and falls back before the first token, and enforces the timeouts.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Sequence

from inferbridge.backends import registry
from inferbridge.config import Config
from inferbridge.config_source import ConfigError
from inferbridge.errors import AuthenticationFailed, InvalidRequest
from inferbridge.events import Event
from inferbridge.observability import Observability
from inferbridge.request import InferenceRequest, RouteInfo
from inferbridge.router import Router
from inferbridge.routing.attempts import prompt_list, routed_stream
from inferbridge.routing.drain import Drain
from inferbridge.routing.health import HealthChecker

log = logging.getLogger("inferbridge")


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        drop = config.server.drop_unsupported_params
        self.backends = [
            registry.create(entry, drop_unsupported_default=drop) for entry in config.models
        ]
        self.router = Router(self.backends, config.router, config.model_aliases)
        check_modes(self.router)
        self._keys = [key.encode() for key in config.auth.keys]
        self.observability = Observability(
            log_prompts=config.server.log_prompts,
            access_log=config.server.access_log,
            router=self.router,
        )
        self.drain = Drain()
        interval = config.router.health_check_interval
        self.health = (
            HealthChecker(
                self.router, interval=interval, timeout=config.router.health_check_timeout
            )
            if interval
            else None
        )

    async def start(self) -> None:
        for backend in self.backends:
            await backend.start()
        if self.health is not None:
            self.health.start()

    async def close(self) -> None:
        """Wait (up to `server.drain_timeout`) for requests in progress, then close clients."""
        if not await self.drain.wait(self.config.server.drain_timeout):
            log.warning("closing with %d request(s) still in progress", self.drain.active)
        if self.health is not None:
            await self.health.close()
        for backend in self.backends:
            await backend.close()

    def readiness(self) -> tuple[bool, dict]:
        """(ready, report) for `GET /health/readiness`: each deployment's state."""
        return self.router.readiness()

    # -- auth -----------------------------------------------------------------------------
    @property
    def auth_required(self) -> bool:
        return bool(self._keys)

    def authenticate(self, authorization: str | None, api_key: str | None = None) -> None:
        """Check `Authorization: Bearer KEY` (or an `api-key` header) in constant time."""
        if not self._keys:
            return
        presented = api_key
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() == "bearer":
                presented = token.strip()
        if not presented:
            raise AuthenticationFailed(
                "Missing API key: send it as 'Authorization: Bearer YOUR_KEY'."
            )
        candidate = presented.encode()
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(candidate, key)
        if not ok:
            raise AuthenticationFailed("Incorrect API key provided.")

    # -- dispatch -------------------------------------------------------------------------
    def open_stream(
        self, request: InferenceRequest, route: RouteInfo
    ) -> tuple[AsyncIterator[Sequence[Event]], int]:
        """Start routing `request`; returns (event stream, choice count).

        An unknown model raises here (404). Everything else that can fail before the first
        token (no deployment available, limits full, upstream errors after retries and
        fallbacks, unsupported parameters) is raised by the stream's first step, before the
        OpenAI layer sends any header. `route` is filled in as deployments are tried.
        """
        group = self.router.resolve(request.model)
        if not group.deployments[0].backend.serves(request.kind):
            raise wrong_mode(request)
        prompts = prompt_list(request)
        choices = request.n * (len(prompts) if prompts is not None else 1)
        limit = self.config.server.max_fanout
        if choices > limit:
            raise InvalidRequest(
                f"This request asks for {choices} choices (n times the number of prompts); "
                f"at most {limit} are allowed (server.max_fanout).",
                param="n",
            )
        return routed_stream(self.router, group, request, route, self.drain), choices


def wrong_mode(request: InferenceRequest) -> InvalidRequest:
    """The 400 for a request of a kind its model does not serve (by the entry's `mode:`)."""
    if request.kind == "embedding":
        message = (
            f"Model '{request.model}' does not serve embeddings (its mode is chat); use a "
            "model whose entry has mode: embeddings or both."
        )
    else:
        message = (
            f"Model '{request.model}' serves only embeddings (mode: embeddings); use it "
            "with /v1/embeddings, or a chat model."
        )
    return InvalidRequest(message, param="model")


def check_modes(router: Router) -> None:
    """What each model serves must be clear: the entries of one model agree on it, and an
    entry serves embeddings only when its backend makes them."""
    errors = []
    for name, backends in router.models.items():
        modes = {(b.serves("chat"), b.serves("embedding")) for b in backends}
        if len(modes) > 1:
            errors.append(f"models named '{name}' serve different things: give them one mode")
        errors.extend(
            f"model '{name}': backend '{b.config.backend}' cannot serve embeddings (mode: {b.mode})"
            for b in backends
            if b.serves("embedding") and not b.makes_embeddings()
        )
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(dict.fromkeys(errors)))
