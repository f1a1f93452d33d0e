"""Test harness: every pytest-xdist worker starts its own real server and stops it at the end.

Tests never touch a server they did not start (the system Redis on 6379 is left alone).
The server listens on a unix socket in a private temp folder, and on a free TCP port
for tests that need a TCP path (the fault proxy).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from handoff.connection.embedded_server import ServerProcess, spawn_server  # noqa: E402
from harness.procs import free_tcp_port, plain_client  # noqa: E402

# Fixtures that only make sense against one server: a test using any of them runs on the
# one server even in a module that also runs its tests against a cluster.
_SERVER_ONLY = {"redis_server", "redis_tcp_addr", "private_server"}


def pytest_generate_tests(metafunc):
    """A module with BACKENDS = ("server", "cluster") runs each of its tests on each; a
    test marked @pytest.mark.backends("server", "cluster") does so on its own."""
    marker = metafunc.definition.get_closest_marker("backends")
    backends = marker.args if marker else getattr(metafunc.module, "BACKENDS", None)
    if not backends or "backend" not in metafunc.fixturenames:
        return
    if _SERVER_ONLY & set(metafunc.fixturenames):
        backends = ("server",)
    metafunc.parametrize("backend", backends, indirect=True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> ServerProcess:
    folder = tmp_path_factory.mktemp("redis")
    server = spawn_server(
        port=free_tcp_port(), unix_socket=str(folder / "redis.sock"), data_dir=str(folder)
    )
    yield server
    server.stop()


@pytest.fixture
def private_server(tmp_path) -> ServerProcess:
    """A TCP-only server of this test's own: nothing else talks to it, so CLIENT LIST and
    INFO counts are the test's alone, and the test may stop, restart or lock it."""
    server = spawn_server(port=free_tcp_port(), data_dir=str(tmp_path))
    yield server
    server.stop()


@pytest.fixture
def make_manager(request):
    """make(url, **fields) -> a RedisManager closed at the end of the test. Fields default
    to the test module's MANAGER_DEFAULTS (quiet background threads, say)."""
    from handoff.config import RedisPoolConfig
    from handoff.connection.manager import RedisManager

    defaults = getattr(request.module, "MANAGER_DEFAULTS", {})
    made: list = []

    def make(url: str, **fields):
        manager = RedisManager(RedisPoolConfig(url=url, **{**defaults, **fields}))
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.close()


@pytest.fixture(scope="session")
def redis_tcp_addr(redis_server) -> tuple[str, int]:
    return ("127.0.0.1", redis_server.port)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """This xdist worker's own 3-primary cluster, started on first use."""
    from harness.topologies import start_cluster

    cluster = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture
def backend(request) -> str:
    """ "server" or "cluster": what redis_url points at (see pytest_generate_tests)."""
    return getattr(request, "param", "server")


@pytest.fixture
def redis_url(request, backend) -> str:
    """A clean database on this worker's private server (or cluster)."""
    if backend == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        cluster.flushall()
        return cluster.url
    redis_server = request.getfixturevalue("redis_server")
    with redis_server.client() as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
def raw_redis(redis_url):
    """A plain redis-py client (a cluster client on a cluster) for assertions, not the
    code under test."""
    client = plain_client(redis_url)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _no_ambient_redis_url(monkeypatch):
    """Nothing in a test may fall back to a server it did not start."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    for name in list(os.environ):
        if name.startswith("HANDOFF_"):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def client(redis_url):
    """A handoff Client on this test's clean server."""
    from handoff.client import Client
    from handoff.config import RedisPoolConfig, Settings

    with Client(settings=Settings(redis=RedisPoolConfig(url=redis_url))) as c:
        yield c


@pytest.fixture(params=["Client", "AsyncClient"])
def either_client(request, redis_url):
    """Client, then AsyncClient (driven from the test's threads: harness/async_facade.py):
    a behaviour test taking this fixture holds for both."""
    from handoff.config import RedisPoolConfig, Settings
    from harness.async_facade import either

    settings = Settings(redis=RedisPoolConfig(url=redis_url))
    with either(request.param, settings) as c:
        yield c


@pytest.fixture
def start(redis_url, tmp_path):
    """start(args, **settings) -> a running `handoff` process (test agents from
    tests/apps/probe.py); every one is killed, with its whole session, at the end."""
    from harness.procs import HandoffProcess, handoff_env

    started: list = []

    def _start(args: list[str], url: str | None = None, app: str = "apps.probe", **settings):
        """url: where handoff connects (e.g. through a fault proxy); the test agents
        always record to the test's server directly. app: the module of test agents."""
        env = handoff_env(redis_url, app=app, **settings)
        if url is not None:
            env["HANDOFF_REDIS_URL"] = url
        proc = HandoffProcess(args, env, tmp_path / f"proc{len(started)}.log")
        started.append(proc)
        return proc

    yield _start
    for proc in started:
        proc.stop()


@pytest.fixture
def flows_app(redis_url, monkeypatch):
    """The runs and joins test agents (tests/apps/flows.py) run in-process, on a virtual
    clock; they record to this test's server."""
    from handoff.testing import InProcessApp

    monkeypatch.setenv("TEST_REDIS_URL", redis_url)
    made = InProcessApp("apps.flows", redis_url, agents=["splitter", "step", "merge", "echo"])
    yield made
    made.close()
