"""Where responses made with `store: true` are kept, for `GET /v1/responses/{id}` and for
`previous_response_id`.

`ResponseStore` is the interface (async, so a shared store such as Redis can implement it);
`MemoryResponseStore` keeps records in this process: a least-recently-used map bounded in
count and in bytes, each record expiring `ttl` seconds after it was stored. Records are
kept serialized (orjson), which is what the byte bound counts and what a shared store
would hold.

A record is self-contained: the response object and every input item that led to it (the
earlier turns included), so a continuation never depends on an older record that expired
or was evicted.

Records belong to the API key that made them (`owner`, a hash of the key; empty when auth is
off): another key sees them as unknown.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

log = logging.getLogger("inferbridge")


@dataclass(slots=True)
class StoredResponse:
    id: str
    owner: str
    response: dict[str, Any]
    """The response object, as `GET /v1/responses/{id}` answers it."""
    input_items: list[dict[str, Any]]
    """Every input item that led to it: the earlier turns' input and output, then its own."""


class ResponseStore(Protocol):
    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        """The record, or None when unknown, expired, or someone else's."""
        ...

    async def put(self, record: StoredResponse) -> None: ...

    async def delete(self, response_id: str, owner: str) -> bool:
        """Whether there was such a record (of that owner) to delete."""
        ...


class MemoryResponseStore:
    """In-process, bounded: at most `max_items` records and `max_bytes` of them (serialized);
    the least recently used go first. `max_items: 0` stores nothing."""

    def __init__(
        self,
        *,
        ttl: float = 3600.0,
        max_items: int = 10_000,
        max_bytes: int = 128 * 1024 * 1024,
        clock: Any = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.clock = clock
        self.bytes = 0
        self._records: OrderedDict[str, tuple[str, float, bytes]] = OrderedDict()
        self._next_sweep = 0.0

    def __len__(self) -> int:
        return len(self._records)

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        found = self._records.get(response_id)
        if found is None:
            return None
        who, expires, blob = found
        if expires <= self.clock():
            self._drop(response_id)
            return None
        if who != owner:
            return None
        self._records.move_to_end(response_id)
        data = orjson.loads(blob)
        return StoredResponse(response_id, who, data["response"], data["input_items"])

    async def put(self, record: StoredResponse) -> None:
        if self.max_items <= 0:
            return
        blob = orjson.dumps({"response": record.response, "input_items": record.input_items})
        if len(blob) > self.max_bytes:
            log.warning(
                "response %s not stored: %d bytes, more than responses.max_stored_bytes",
                record.id,
                len(blob),
            )
            return
        now = self.clock()
        self._sweep(now)
        self._drop(record.id)
        self._records[record.id] = (record.owner, now + self.ttl, blob)
        self.bytes += len(blob)
        while len(self._records) > self.max_items or self.bytes > self.max_bytes:
            self._drop(next(iter(self._records)))

    async def delete(self, response_id: str, owner: str) -> bool:
        found = self._records.get(response_id)
        if found is None or found[0] != owner:
            return False
        expired = found[1] <= self.clock()
        self._drop(response_id)
        return not expired

    def _drop(self, response_id: str) -> None:
        found = self._records.pop(response_id, None)
        if found is not None:
            self.bytes -= len(found[2])

    def _sweep(self, now: float) -> None:
        """Drop expired records (at most once a second: a scan of the whole map)."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + min(1.0, self.ttl)
        for key in [k for k, (_, expires, _) in self._records.items() if expires <= now]:
            self._drop(key)
