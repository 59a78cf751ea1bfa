"""State shared by every replica through Redis (or Valkey): `state: {store: redis}`.

- `client`: the connection, its timeout and failure policy, the background task;
- `scripts`: the Lua scripts (each one atomic on the server);
- `state`: the router's `StateStore` (in-flight slots, failures, cooldowns, probes);
- `quotas`: key and model limits, usage counters.

`open_shared(config, observability)` builds them; with `store: memory` inferbridge never
imports this package (nor redis-py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inferbridge.config import Config
    from inferbridge.observability import Observability
    from inferbridge.shared.client import RedisClient
    from inferbridge.shared.quotas import RedisQuotaStore
    from inferbridge.shared.state import RedisStateStore


def open_shared(
    config: Config, observability: Observability | None = None
) -> tuple[RedisClient, RedisStateStore, RedisQuotaStore]:
    from inferbridge.shared.client import RedisClient
    from inferbridge.shared.quotas import RedisQuotaStore
    from inferbridge.shared.state import RedisStateStore

    client = RedisClient(config.state, observability)
    state = RedisStateStore(
        client,
        [m.id or m.name for m in config.models],
        fail_window=config.router.fail_window,
        latency_window=config.router.latency_window,
    )
    return client, state, RedisQuotaStore(client)
