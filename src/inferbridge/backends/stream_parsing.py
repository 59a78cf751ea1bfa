"""Reading a streamed upstream body as events: the `StreamParser` contract and `ItemParser`,
the usual one (a decoder cuts the body into items, a function turns each into events)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from inferbridge.decoders import NDJSONDecoder, SSEDecoder
from inferbridge.errors import (
    UpstreamError,
)
from inferbridge.events import Event


class StreamParser(Protocol):
    """Turns a streamed body into events for `HttpUpstream.events`; one per answer."""

    done: bool
    """The protocol's own end was seen (e.g. `data: [DONE]`): the rest is not read."""
    error: UpstreamError | None
    """Set instead of raising, so the events decoded before the error still go out."""

    def feed(self, data: bytes) -> list[Event]:
        """Events of the next piece of body (bytes may split anywhere)."""
        ...

    def finish(self) -> list[Event]:
        """Events left at the end of the body; sets `error` if the answer was cut short."""
        ...


class ItemParser:
    """The usual `StreamParser`: a decoder cuts the body into items (SSE events, NDJSON
    lines) and `take(item, batch)` appends each item's events to the batch, returning True
    at the protocol's end marker; adapters pass `take` or override the method. An
    `UpstreamError` raised by `take` stops the stream after the events before it; a body
    that ends before the marker is truncated (unless `complete_without_marker`).
    """

    __slots__ = ("_take", "decoder", "done", "error", "label")

    def __init__(
        self,
        label: str,
        decoder: SSEDecoder | NDJSONDecoder,
        take: Callable[[Any, list[Event]], bool] | None = None,
    ) -> None:
        self.label = label
        self.decoder = decoder
        self._take = take
        self.done = False
        self.error: UpstreamError | None = None

    def take(self, item: Any, batch: list[Event]) -> bool:
        """Append the events of one item to `batch`; True at the protocol's end marker."""
        raise NotImplementedError

    def feed(self, data: bytes) -> list[Event]:
        return self._items(self.decoder.feed(data))

    def finish(self) -> list[Event]:
        batch = self._items(self.decoder.flush())
        if not self.done and self.error is None and not self.complete_without_marker():
            self.error = UpstreamError.truncated(self.label)
        return batch

    def complete_without_marker(self) -> bool:
        """Whether an answer whose end marker never came is whole anyway (no, by default)."""
        return False

    def _items(self, items: list[Any]) -> list[Event]:
        batch: list[Event] = []
        if self.done or self.error is not None:
            return batch
        take = self._take or self.take
        try:
            for item in items:
                if take(item, batch):
                    self.done = True
                    break
        except UpstreamError as exc:
            self.error = exc
        return batch


# What a failed exchange raises (TimeoutError is an OSError).
