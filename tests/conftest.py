"""Shared fixtures: a running inferbridge server factory and the echo-only server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.redis_server import RedisServer
from tests.redis_server import missing as redis_missing
from tests.server import InferbridgeServer


@pytest.fixture
def serve() -> Iterator[Callable[..., InferbridgeServer]]:
    """`serve(config_dict)` starts a server for this test and stops it afterwards."""
    started: list[InferbridgeServer] = []

    def start(config: dict[str, Any], **kw: Any) -> InferbridgeServer:
        server = InferbridgeServer(config, **kw).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def echo_server() -> Iterator[InferbridgeServer]:
    with InferbridgeServer(
        {
            "models": [
                {"name": "echo", "backend": "echo"},
                {"name": "slow-echo", "backend": "echo", "delay": 0.05},
            ]
        }
    ) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server for the shared-state tests (skipped when it is not installed)."""
    reason = redis_missing()
    if reason:
        pytest.skip(reason)
    with RedisServer() as server:
        yield server
