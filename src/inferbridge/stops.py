"""Stop strings enforced on the proxy side, for backends that cannot (or not all of them).

`StopCutter` sits on a text stream: it emits text as early as it safely can, holding back
only a tail that could still turn into a stop string, and reports when a stop string
appeared (the text before it is emitted, the stop string and everything after is not).

`covering_stops` reduces a list of stop strings to the ones that matter for *halting*
generation, for backends that accept only a few of them (TGI: `max_stop_sequences`).
"""

from __future__ import annotations

from collections.abc import Iterable


def covering_stops(stops: Iterable[str]) -> list[str]:
    """The covering set of `stops`: without empty strings, duplicates, and every stop that
    contains another one. If A is a substring of B, generation halts at A no later than B
    completes, so a backend told about A never needs B (`<bot>:` covers `\n<bot>:`).
    Order is kept (first occurrences).

    This is about halting only: where the text is cut still depends on every stop (B may
    start before A does), so the full list goes to `StopCutter`.
    """
    unique = list(dict.fromkeys(s for s in stops if s))
    return [s for s in unique if not any(o in s for o in unique if o != s)]


class StopCutter:
    __slots__ = ("_buf", "_keep", "stopped", "stops")

    def __init__(self, stops: list[str] | tuple[str, ...]) -> None:
        self.stops = list(dict.fromkeys(s for s in stops if s))
        self._keep = max((len(s) for s in self.stops), default=1) - 1
        self._buf = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add generated text; return what may be emitted now. Check `.stopped` after."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._buf + text
        cut = -1
        for stop in self.stops:
            at = buf.find(stop)
            if at != -1 and (cut == -1 or at < cut):
                cut = at
        if cut != -1:
            self.stopped = True
            self._buf = ""
            return buf[:cut]
        # Hold back the longest tail that is a prefix of some stop string.
        hold = 0
        for k in range(min(self._keep, len(buf)), 0, -1):
            tail = buf[-k:]
            if any(stop.startswith(tail) for stop in self.stops):
                hold = k
                break
        if hold:
            self._buf = buf[-hold:]
            return buf[:-hold]
        self._buf = ""
        return buf

    def flush(self) -> str:
        """The held-back tail, once the stream ended without a stop string."""
        rest, self._buf = self._buf, ""
        return "" if self.stopped else rest
