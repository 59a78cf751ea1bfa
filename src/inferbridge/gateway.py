"""The running service: backends built from the config, auth, and request dispatch.

One `Gateway` exists per server process. It creates one adapter per config entry, opens
their clients at start-up (and the optional health checks) and closes them at shutdown once
requests in progress have ended, checks API keys, and turns a normalized request into a
stream of event batches: `routing.attempts.routed_stream`, which picks deployments through
the `Router`, retries and falls back before the first token, and enforces the timeouts.

Keys (`keys.KeyRing`: who is calling, which models they may use) and limits
(`quotas.Quotas`: per key and per model) are checked here too. With `state: {store: redis}`
the router's state and the limits live in Redis (`inferbridge.shared`), shared by every
replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from inferbridge.backends import registry
from inferbridge.config import Config
from inferbridge.config_source import ConfigError
from inferbridge.errors import InvalidRequest, ModelNotFound
from inferbridge.events import Event
from inferbridge.keys import Identity, KeyRing
from inferbridge.observability import Observability
from inferbridge.quotas import Admission, MemoryQuotaStore, Quotas, QuotaStore
from inferbridge.request import InferenceRequest, RouteInfo
from inferbridge.router import Router
from inferbridge.routing.attempts import prompt_list, routed_stream
from inferbridge.routing.drain import Drain
from inferbridge.routing.health import HealthChecker
from inferbridge.usage import estimate_prompt_tokens

log = logging.getLogger("inferbridge")


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        drop = config.server.drop_unsupported_params
        self.backends = [
            registry.create(entry, drop_unsupported_default=drop) for entry in config.models
        ]
        self.keys = KeyRing(config.auth)
        self.shared: Any = None
        quota_store: QuotaStore = MemoryQuotaStore()
        if config.state.store == "redis":
            from inferbridge.shared import open_shared

            self.shared, state, quota_store = open_shared(config)
            self.router = Router(
                self.backends, config.router, config.model_aliases, store=state, clock=time.time
            )
        else:
            self.router = Router(self.backends, config.router, config.model_aliases)
        check_modes(self.router)
        self.observability = Observability(
            log_prompts=config.server.log_prompts,
            access_log=config.server.access_log,
            router=self.router,
        )
        if self.shared is not None:
            self.shared.observability = self.observability
        self.quotas = Quotas(
            quota_store,
            config.router,
            self.observability,
            on_store_error=config.state.on_store_error,
            shared=self.shared is not None,
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
        if self.shared is not None:
            await self.shared.start()
        # at once: a backend that asks its server something at start-up (a chat template)
        # waits a few seconds for an unreachable one, and those waits must not add up
        await asyncio.gather(*(backend.start() for backend in self.backends))
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
        if self.shared is not None:
            await self.shared.close()  # after the drain: the last releases are sent

    def readiness(self) -> tuple[bool, dict]:
        """(ready, report) for `GET /health/readiness`: each deployment's state."""
        return self.router.readiness()

    # -- auth -----------------------------------------------------------------------------
    @property
    def auth_required(self) -> bool:
        return self.keys.required

    def authenticate(
        self, authorization: str | None, api_key: str | None = None
    ) -> Identity | None:
        """The caller's key (`Authorization: Bearer KEY`, or an `api-key` header), checked
        in constant time; None when no keys are configured. 401 when missing, wrong or
        expired."""
        if not self.keys.required:
            return None
        presented = api_key
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() == "bearer":
                presented = token.strip()
        return self.keys.authenticate(presented)

    def allows(self, identity: Identity | None, name: str) -> bool:
        """May `identity` use model (or alias) `name`? (Others are answered 404.)"""
        if identity is None or identity.models is None:
            return True
        return identity.allows(name, self.router.aliases.get(name))

    # -- dispatch -------------------------------------------------------------------------
    def open_stream(
        self, request: InferenceRequest, route: RouteInfo, identity: Identity | None = None
    ) -> tuple[AsyncIterator[Sequence[Event]], int]:
        """Start routing `request`; returns (event stream, choice count).

        An unknown model, or one `identity` may not use, raises here (404). Everything else
        that can fail before the first token (no deployment available, limits full,
        upstream errors after retries and fallbacks, unsupported parameters) is raised by
        the stream's first step, before the OpenAI layer sends any header. `route` is
        filled in as deployments are tried.
        """
        if not self.allows(identity, request.model):
            raise ModelNotFound(request.model)
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

    async def admit(self, identity: Identity | None, request: InferenceRequest) -> Admission:
        """Check the key's and the model's limits (429 when one is reached); the admission
        carries the answer's rate-limit headers and must be finished when the request
        ends."""
        model = self.router.resolve(request.model).name
        admission = await self.quotas.admit(identity, model, request.model)
        if admission.subjects and any(s.tpm for s in admission.subjects):
            admission.estimate = estimate_prompt_tokens(request)
        return admission


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
