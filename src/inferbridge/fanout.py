"""Run several event streams at once and merge them into one, as choices 0..k-1.

Used for `n > 1` and for lists of prompts on backends that take one prompt and one choice
per call: sub-stream k becomes choice k. Batches are passed on as they arrive, so the merged
stream interleaves choices like OpenAI's does. Usage is summed (prompt tokens counted once
per distinct prompt) and reported only when every sub-stream reported it. The first failure
cancels the other sub-streams and is raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from inferbridge.events import Event, Usage

_END = object()


async def fan_out(
    streams: list[AsyncIterator[Sequence[Event]]], prompt_of: list[int]
) -> AsyncIterator[list[Event]]:
    """`prompt_of[k]` says which prompt sub-stream k answers (for counting prompt tokens)."""
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()

    async def pump(k: int, stream: AsyncIterator[Sequence[Event]]) -> None:
        try:
            async for batch in stream:
                await queue.put((k, batch))
            await queue.put((k, _END))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put((k, exc))

    tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(streams)]
    usages: dict[int, Usage] = {}
    remaining = len(tasks)
    try:
        while remaining:
            k, item = await queue.get()
            if item is _END:
                remaining -= 1
                continue
            if isinstance(item, Exception):
                raise item
            out: list[Event] = []
            for ev in item:  # type: ignore[attr-defined]
                if isinstance(ev, Usage):
                    usages[k] = ev
                    continue
                ev.index = k
                out.append(ev)
            if out:
                yield out
        if len(usages) == len(tasks):
            prompt_tokens: dict[int, int] = {}
            for k, u in usages.items():
                prompt_tokens.setdefault(prompt_of[k], u.prompt_tokens)
            yield [
                Usage(
                    sum(prompt_tokens.values()),
                    sum(u.completion_tokens for u in usages.values()),
                    estimated=any(u.estimated for u in usages.values()),
                )
            ]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
