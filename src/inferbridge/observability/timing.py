"""The instants of one request (`RequestTimer`) and what the proxy's overhead is."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from inferbridge.request import InferenceRequest, RouteInfo

if TYPE_CHECKING:
    pass

_now = time.perf_counter


def ms(seconds: float) -> float:
    """Seconds as milliseconds to the microsecond (`round(x, 3)` formats a string inside)."""
    return int(seconds * 1_000_000 + 0.5) / 1000


class RequestTimer:
    """Instants of one request, from `time.perf_counter()`."""

    __slots__ = ("disconnected", "first", "last", "overhead", "routed", "start", "status")

    def __init__(self) -> None:
        self.start = _now()
        self.routed = 0.0
        self.first = 0.0
        self.last = 0.0
        self.status = 0
        self.disconnected = False
        self.overhead = 0.0

    def overhead_so_far(self) -> float:
        """Seconds spent in the proxy up to now, excluding the upstream's time."""
        pre = (self.routed or self.start) - self.start
        answered = self.last or self.first
        return pre + (_now() - answered if answered else 0.0)


Finished = tuple[
    InferenceRequest, RouteInfo, RequestTimer, dict[str, Any] | None, Exception | None, Any, float
]
"""A finished request waiting for `Observability.drain`: `record`'s arguments and when it
ended (`perf_counter`)."""
