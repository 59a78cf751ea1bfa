"""Where responses made with `store: true` are kept, for `GET /v1/responses/{id}` and for
`previous_response_id`.

`ResponseStore` is the interface (async, so a shared store can implement it):

- `MemoryResponseStore` keeps records in this process: a least-recently-used map bounded in
  count and in bytes, each record expiring `ttl` seconds after it was stored. Records are
  kept serialized (orjson), which is what the byte bound counts.
- `RedisResponseStore` keeps them in the state store's Redis (`state: {store: redis}`),
  shared by every replica: one key per response, expiring `ttl` seconds after it was stored.

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
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from inferbridge.quotas import StoreError, StoreUnavailable

if TYPE_CHECKING:
    from inferbridge.shared.client import RedisClient

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
        """The record, or None when unknown, expired, or someone else's; StoreUnavailable
        (503) when a shared store does not answer."""
        ...

    async def put(self, record: StoredResponse) -> None:
        """Keep `record`, or log a warning why not (never raises: the answer goes out)."""
        ...

    async def delete(self, response_id: str, owner: str) -> bool:
        """Whether there was such a record (of that owner) to delete; StoreUnavailable (503)
        when a shared store does not answer."""
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


def response_store_unavailable() -> StoreUnavailable:
    return StoreUnavailable(
        "The response store is unavailable: stored responses cannot be read or deleted "
        "now. Retry after 1 s.",
        headers={"Retry-After": "1"},
    )


class RedisResponseStore:
    """In the state store's Redis, shared by every replica: a response made through one
    replica is retrieved, continued and deleted through any other.

    One key per response, `{state.prefix}:response:{owner}:{id}` (owner `-` without keys),
    holding the record as orjson (`SET ... PX ttl`: it expires `ttl` seconds after it was
    stored). The owner is part of the key, so another API key's look-up misses exactly as
    in the memory store, and a delete is one `DEL`.

    Bounds: the TTL and `max_record_bytes` per record (a larger record is not stored, with
    a warning); `max_stored`/`max_stored_bytes` bound the memory store only, the rest is
    Redis's memory (`maxmemory`).

    Every call takes at most `state.timeout` (`RedisClient.request_command`). Whatever
    `on_store_error` says, a record cannot be made up: `get` and `delete` raise
    StoreUnavailable (503) when Redis does not answer; `put` logs a warning and returns,
    and the answer still goes out (unstored).
    """

    def __init__(
        self, client: RedisClient, *, ttl: float = 3600.0, max_record_bytes: int = 1 << 20
    ) -> None:
        self.client = client
        self.ttl_ms = max(1, round(ttl * 1000))
        self.max_record_bytes = max_record_bytes

    def key(self, response_id: str, owner: str) -> str:
        return self.client.key("response", owner or "-", response_id)

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        try:
            blob = await self.client.request_command(
                "response_get", "get", self.key(response_id, owner)
            )
        except StoreError:
            raise response_store_unavailable() from None
        if blob is None:
            return None
        try:
            data = orjson.loads(blob)
            return StoredResponse(response_id, owner, data["response"], data["input_items"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("stored response %s is unreadable; answered as unknown", response_id)
            return None

    async def put(self, record: StoredResponse) -> None:
        blob = orjson.dumps(
            {
                "id": record.id,
                "owner": record.owner,
                "response": record.response,
                "input_items": record.input_items,
            }
        )
        if len(blob) > self.max_record_bytes:
            log.warning(
                "response %s not stored: %d bytes, more than responses.max_record_bytes (%d)",
                record.id,
                len(blob),
                self.max_record_bytes,
            )
            return
        try:
            await self.client.request_command(
                "response_put", "set", self.key(record.id, record.owner), blob, px=self.ttl_ms
            )
        except StoreError as exc:
            log.warning(
                "response %s not stored: the state store did not answer (%s)",
                record.id,
                str(exc) or "no answer within state.timeout",
            )

    async def delete(self, response_id: str, owner: str) -> bool:
        try:
            deleted = await self.client.request_command(
                "response_delete", "delete", self.key(response_id, owner)
            )
        except StoreError:
            raise response_store_unavailable() from None
        return bool(deleted)
