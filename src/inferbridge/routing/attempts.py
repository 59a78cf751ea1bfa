"""The attempt loop: one routed request as a stream of event batches.

`routed_stream` is what `Gateway.open_stream` returns. Until the first batch of events has
been produced nothing has reached the client, so a retryable failure (refused connection,
5xx, 429, timeout, time to first token exceeded) is retried:

1. on another deployment of the model that has not been tried yet, at once;
2. then on one already tried, after a jittered exponential backoff (`retry_backoff`,
   doubling, at most `retry_backoff_max`) and never before the upstream's `Retry-After`
   (a deployment asking for more than `retry_after_max` seconds is not retried);
3. at most `retries` + 1 attempts per model; then the model's `fallbacks`, in order, each
   with its own deployments, strategy and retries.

A non-retryable error (the backend rejected the request itself: 400, 413, 422, an
unsupported parameter) is raised at once. A refusal that is the deployment's fault (its
401/403: the entry's key; 404: its path or model; 405) is a retryable 502. Once a batch
has been yielded nothing is retried: a later failure is raised to the OpenAI layer, which
ends the stream with an error event (or answers 502).

After the first batch the loop costs one generator step per batch (plus two attribute
writes when the deployment sets `stream_idle_timeout`: see `watchdog`).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from inferbridge.backends.base import Backend
from inferbridge.backends.upstream_errors import deployment_failure, shown
from inferbridge.errors import InferbridgeError, RateLimited, UpstreamError, UpstreamTimeout
from inferbridge.events import Event, aclose
from inferbridge.fanout import fan_out
from inferbridge.request import InferenceRequest, RouteInfo
from inferbridge.router import Deployment, ModelGroup, Router
from inferbridge.routing.drain import Drain
from inferbridge.routing.watchdog import IdleWatchdog

log = logging.getLogger("inferbridge.router")

Batches = AsyncIterator[Sequence[Event]]


async def routed_stream(
    router: Router, group: ModelGroup, request: InferenceRequest, route: RouteInfo, drain: Drain
) -> AsyncIterator[Sequence[Event]]:
    drain.enter()
    dep: Deployment | None = None
    stream: Batches | None = None
    try:
        dep, stream, first = await first_answer(router, group, request, route)
        if first is None:
            return
        yield first
        idle = dep.idle_timeout
        if idle is None:
            async for batch in stream:
                yield batch
            return
        watch = IdleWatchdog(idle)
        try:
            while True:
                watch.since = watch.loop.time()
                try:
                    batch = await stream.__anext__()
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if not watch.expired():
                        raise
                    label = dep.backend.label
                    raise UpstreamTimeout(
                        f"{label} sent nothing for {idle:g} s (stream_idle_timeout); "
                        "the stream was cut",
                        backend=label,
                    ) from None
                watch.since = None
                yield batch
        finally:
            watch.stop()
    except UpstreamError as caught:
        exc = deployment_failure(caught)
        if dep is not None:
            shown(exc, dep.backend.secrets)
            if exc.retryable:
                router.failed(dep)  # died mid-stream: counts against the deployment
        if exc is caught:
            raise
        raise exc from caught
    finally:
        if dep is not None:
            router.release(dep)
        if stream is not None:
            await aclose(stream)
        drain.leave()


async def first_answer(
    router: Router, group: ModelGroup, request: InferenceRequest, route: RouteInfo
) -> tuple[Deployment, Batches, Sequence[Event] | None]:
    """Try the model, then its fallbacks; return the deployment that produced the first
    batch (its slot still held), its stream, and that batch (None: it ended empty)."""
    primary: InferbridgeError | None = None
    for model in group.chain:
        if model is not group and not model.deployments[0].backend.serves(request.kind):
            continue  # a chat-only fallback of an embeddings model, or the other way round
        route.fallback = model is not group
        outcome = await _try_model(router, model, request, route)
        if isinstance(outcome, tuple):
            return outcome
        if primary is None:
            primary = outcome
        log.warning("request %s: model %s failed: %s", request.request_id, model.name, outcome)
    assert primary is not None
    raise primary


async def _try_model(
    router: Router, group: ModelGroup, request: InferenceRequest, route: RouteInfo
) -> tuple[Deployment, Batches, Sequence[Event] | None] | InferbridgeError:
    clock = router.clock
    tried: dict[str, float | None] = {}
    error: InferbridgeError | None = None
    pauses = 0
    for _ in range(group.retries + 1):
        usable = router.usable(group, clock())
        if not usable:
            return error or router.unavailable(group, clock())
        pool = [d for d in usable if d.id not in tried] if tried else usable
        if not pool:
            pool = await _pause(router, usable, tried, pauses)
            pauses += 1
            if not pool:
                break
        try:
            dep, probe = await router.acquire(group, pool)
        except RateLimited as exc:
            return exc
        backend = dep.backend
        route.model = group.name
        route.deployment = dep.id
        route.backend = backend.config.backend
        route.attempts += 1
        stream: Batches | None = None
        started = clock()
        try:
            stream = start_attempt(backend, request, route)
            first = await _first_batch(stream, dep, request.stream)
        except UpstreamError as caught:
            exc = deployment_failure(caught)  # a deployment's own 404 is its failure
            shown(exc, backend.secrets)
            router.release(dep)
            if exc.retryable:
                router.failed(dep, probe)
            elif probe:
                router.breaker.abandon_probe(dep.id)
            await aclose(stream)
            if not exc.retryable:
                raise
            error = exc
            tried[dep.id] = retry_at(exc, clock(), router.settings.retry_after_max)
            log.info(
                "request %s: attempt %d on %s failed: %s",
                request.request_id,
                route.attempts,
                dep.id,
                exc,
            )
            continue
        except BaseException:
            router.release(dep)
            if probe:
                router.breaker.abandon_probe(dep.id)
            await aclose(stream)
            raise
        router.succeeded(dep, clock() - started, probe)
        return dep, stream, first
    assert error is not None
    return error


async def _pause(
    router: Router, usable: list[Deployment], tried: dict[str, float | None], n: int
) -> list[Deployment]:
    """Every usable deployment was tried: wait, then return those that may be retried."""
    ready = [(at, d) for d in usable if (at := tried.get(d.id)) is not None]
    if not ready:
        return []
    now = router.clock()
    delay = max(router.backoff(n), min(at for at, _ in ready) - now)
    await asyncio.sleep(delay)
    due = now + delay  # not the clock: timers may fire a hair early
    now = router.clock()
    return [d for at, d in ready if at <= due and router.breaker.usable(d.id, now)]


async def _first_batch(stream: Batches, dep: Deployment, streaming: bool) -> Sequence[Event] | None:
    ttft = dep.ttft_timeout if streaming else None
    try:
        if ttft is None:
            return await stream.__anext__()
        timer = asyncio.timeout(ttft)
        try:
            async with timer:
                return await stream.__anext__()
        except TimeoutError:
            if not timer.expired():
                raise
            label = dep.backend.label
            raise UpstreamTimeout(
                f"{label} sent no token within {ttft:g} s (ttft_timeout)", backend=label
            ) from None
    except StopAsyncIteration:
        return None


def retry_at(exc: InferbridgeError, now: float, cap: float) -> float | None:
    """When a deployment that failed with `exc` may be tried again (None: not in this
    request, its Retry-After is longer than `cap`)."""
    value = exc.headers.get("Retry-After") if exc.headers else None
    seconds = retry_after_seconds(value) if value else None
    if seconds is None:
        return now
    return None if seconds > cap else now + seconds


def retry_after_seconds(value: str) -> float | None:
    """`Retry-After` as seconds: delta-seconds (fractions accepted) or an HTTP date."""
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# -- one attempt on one deployment ----------------------------------------------------------
def start_attempt(
    backend: Backend, original: InferenceRequest, route: RouteInfo | None = None
) -> Batches:
    """Prepare a copy of the request for `backend` and start it (fanning out n > 1 and
    prompt lists for backends that cannot do them natively)."""
    request = original.copy()
    n = request.n
    if not backend.native_n and n > 1:
        request.params.pop("n", None)
        request.body.pop("n", None)
    backend.prepare(request)
    if route is not None:
        route.ignored = request.ignored
    if request.kind == "embedding":
        return backend.embeddings(request).__aiter__()
    prompts = prompt_list(request)
    if backend.native_n or (n == 1 and (prompts is None or len(prompts) == 1)):
        if prompts is not None and len(prompts) == 1:
            request.prompt = prompts[0]
        return backend.stream(request).__aiter__()
    streams = []
    prompt_of = []
    for p, prompt in enumerate(prompts or [request.prompt]):
        for _ in range(n):
            sub = replace(request, prompt=prompt, params=dict(request.params))
            streams.append(backend.stream(sub))
            prompt_of.append(p)
    return fan_out(streams, prompt_of)


def prompt_list(request: InferenceRequest) -> list[Any] | None:
    """A legacy completion's prompts when it carries several (list of strings or of token
    lists); None for a single prompt."""
    prompt = request.prompt
    if request.kind != "completion" or not isinstance(prompt, list) or not prompt:
        return None
    if isinstance(prompt[0], int):
        return None  # one prompt given as token ids
    return prompt
