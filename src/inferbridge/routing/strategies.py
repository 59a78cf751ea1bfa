"""How a model's deployments share its traffic: one function per `strategy:` name.

Each strategy picks one deployment among candidates that are all usable and have a free
slot (the router has filtered out the rest):

- `simple-shuffle` (default): weighted random by each entry's `weight:`;
- `least-busy`: the fewest requests in flight (ties broken at random);
- `latency-based`: the lowest recent time to first token. A deployment without a fresh
  measurement is tried first, so every one is measured and none is avoided forever on the
  strength of an old sample (see `MemoryStateStore` for the decay).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from inferbridge.routing.state import StateStore

if TYPE_CHECKING:
    from inferbridge.router import Deployment

Strategy = Callable[[Sequence["Deployment"], StateStore, float], "Deployment"]


def simple_shuffle(candidates: Sequence[Deployment], store: StateStore, now: float) -> Deployment:
    return random.choices(candidates, weights=[d.weight for d in candidates])[0]


def least_busy(candidates: Sequence[Deployment], store: StateStore, now: float) -> Deployment:
    best: list[Deployment] = []
    low = -1
    for d in candidates:
        load = store.in_flight(d.id)
        if not best or load < low:
            best, low = [d], load
        elif load == low:
            best.append(d)
    return best[0] if len(best) == 1 else random.choice(best)


def latency_based(candidates: Sequence[Deployment], store: StateStore, now: float) -> Deployment:
    unknown: list[Deployment] = []
    best: Deployment | None = None
    low = 0.0
    for d in candidates:
        latency = store.latency(d.id, now)
        if latency is None:
            unknown.append(d)
        elif best is None or latency < low:
            best, low = d, latency
    if unknown:
        return random.choice(unknown)
    assert best is not None
    return best


STRATEGIES: dict[str, Strategy] = {
    "simple-shuffle": simple_shuffle,
    "least-busy": least_busy,
    "latency-based": latency_based,
}
