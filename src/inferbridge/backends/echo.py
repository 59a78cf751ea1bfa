"""The built-in `echo` backend: deterministic replies with no upstream.

The reply is the last user message (chat) or the prompt (completions), one word per token.
It honours `max_tokens` (counted in words: finish_reason "length"), stop strings (finish
"stop"), and reports usage (words in the prompt side, words generated). `delay:` in the
entry adds that many seconds before each token, to watch streaming by eye or in tests.

It is the default model when no config is given, and the workhorse of the test suite.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from pydantic import Field

from inferbridge.backends.base import Backend
from inferbridge.config import DeploymentConfig
from inferbridge.events import Event, Finish, TextDelta, Usage
from inferbridge.request import InferenceRequest, last_user_text, message_text
from inferbridge.stops import StopCutter


class EchoSettings(DeploymentConfig):
    delay: float = Field(default=0.0, ge=0, description="Seconds before each token.")


def _words(text: str) -> list[str]:
    return text.split()


class EchoBackend(Backend):
    """Accepts every parameter: the ones it does not act on are ignored and named in the
    `x-inferbridge-ignored-params` response header (it stands in for any backend)."""

    Settings = EchoSettings
    supported_params = frozenset(
        {
            "max_tokens",
            "stop",
            "temperature",
            "top_p",
            "seed",
            "presence_penalty",
            "frequency_penalty",
        }
    )

    def __init__(self, config: DeploymentConfig) -> None:
        super().__init__(config)
        self.drop_unsupported = True

    async def stream(self, request: InferenceRequest) -> AsyncIterator[list[Event]]:
        assert isinstance(self.config, EchoSettings)
        if request.kind == "chat":
            messages: list[dict[str, Any]] = request.messages or []
            source = last_user_text(messages)
            prompt_tokens = sum(len(_words(message_text(m.get("content")))) for m in messages)
        else:
            source = request.prompt if isinstance(request.prompt, str) else ""
            prompt_tokens = len(_words(source))
        words = _words(source)
        limit = request.max_tokens
        cutter = StopCutter(request.stop)
        delay = self.config.delay
        produced = 0
        batch: list[Event] = []
        for i, word in enumerate(words):
            if limit is not None and produced >= limit:
                break
            token = word if i == 0 else " " + word
            text = cutter.feed(token)
            produced += 1
            if text:
                batch.append(TextDelta(text))
            if cutter.stopped:
                break
            if delay:
                await asyncio.sleep(delay)
                yield batch
                batch = []
        rest = cutter.flush()
        if rest:
            batch.append(TextDelta(rest))
        if cutter.stopped:
            reason = "stop"
        elif limit is not None and produced >= limit and produced < len(words):
            reason = "length"
        else:
            reason = "stop"
        batch.append(Finish(reason))
        batch.append(Usage(prompt_tokens, produced))
        yield batch
