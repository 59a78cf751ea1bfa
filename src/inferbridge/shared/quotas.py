"""`RedisQuotaStore`: key and model limits and usage counters shared by every replica.

One check is one script call (`scripts.ADMIT`): every limit of the key and of the model is
read and, when none is reached, the request is counted and its `max_parallel` slot taken,
atomically on the server. What happens when a request ends (tokens charged, slot freed,
usage counted) is one script call too (`scripts.FINISH`), queued and sent in the background
(`RedisClient.enqueue`).

Keys (under `state.prefix`): `rl:<key|model>:<name>:requests` and `:tokens` (hashes of
one-second buckets), `rl:<...>:parallel` (leases), `usage:<YYYY-MM-DD>` (a hash of
`<key>\\x1f<model>\\x1f<requests|prompt|completion>` counters, kept three days).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from inferbridge.quotas import Reading, Subject, UsageRow, Verdict, utc_day
from inferbridge.shared.client import RedisClient

SEP = "\x1f"
USAGE_TTL = 3 * 86_400
FIELDS = ("requests", "prompt", "completion")


class RedisQuotaStore:
    def __init__(self, client: RedisClient) -> None:
        self.client = client

    def _keys(self, s: Subject) -> list[str]:
        base = self.client.key("rl", s.kind, s.name)
        return [f"{base}:requests", f"{base}:tokens", f"{base}:parallel"]

    async def admit(
        self, subjects: Sequence[Subject], lease: str, now: float | None = None
    ) -> Verdict:
        keys: list[str] = []
        args: list[Any] = ["" if now is None else repr(now), lease, self.client.lease_ttl]
        for s in subjects:
            keys += self._keys(s)
            args += [s.rpm or 0, s.tpm or 0, s.max_parallel or 0]
        raw = await self.client.call("admit", "admit", keys, args)
        admitted = int(raw[0]) == 1
        readings = []
        for i in range(len(subjects)):
            r = [int(v) for v in raw[1 + 7 * i : 8 + 7 * i]]
            readings.append(
                Reading(r[0], r[1] / 1000, r[2] / 1000, r[3], r[4] / 1000, r[5] / 1000, r[6])
            )
        if admitted:
            for s in subjects:
                if s.max_parallel:
                    self.client.hold(self._keys(s)[2], lease)
        return Verdict(admitted, readings)

    def finish(
        self,
        subjects: Sequence[Subject],
        lease: str,
        tokens: int,
        usage: UsageRow | None,
        now: float | None = None,
    ) -> None:
        client = self.client
        charged = [self._keys(s)[1] for s in subjects if s.tpm] if tokens > 0 else []
        parallel = [self._keys(s)[2] for s in subjects if s.max_parallel]
        for zkey in parallel:
            client.forget(zkey, lease)
        keys = charged + parallel
        args: list[Any] = ["" if now is None else repr(now), len(charged), len(parallel)]
        args += [tokens, lease, USAGE_TTL]
        if usage is not None:
            key, model, prompt, completion = usage
            keys.append(client.key("usage", utc_day(time.time() if now is None else now)))
            base = f"{key}{SEP}{model}{SEP}"
            for name, amount in zip(FIELDS, (1, prompt, completion), strict=True):
                if amount:
                    args += [base + name, amount]
        if keys:
            client.enqueue(lambda pipe: client.evalsha(pipe, "finish", keys, args))

    async def usage(self, days: Sequence[str]) -> dict[str, dict[tuple[str, str], list[int]]]:
        client = self.client
        out: dict[str, dict[tuple[str, str], list[int]]] = {}
        for day in days:
            found = await client.call_command("usage", "hgetall", client.key("usage", day))
            rows: dict[tuple[str, str], list[int]] = {}
            for name, value in found.items():
                key, _, rest = name.partition(SEP)
                model, _, field = rest.rpartition(SEP)
                if field not in FIELDS:
                    continue
                row = rows.setdefault((key, model), [0, 0, 0])
                row[FIELDS.index(field)] += int(value)
            out[day] = rows
        return out
