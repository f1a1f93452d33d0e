"""AsyncRedisManager: RedisManager's contract on redis-py's asyncio client.

Runs in: an event loop of any process (AsyncClient). The same pool settings (size, wait
for a free connection, timeouts, TLS, credentials, db, client name), the same retry policy
and error translation, the same circuit breaker and call metrics as the blocking manager;
calls are awaited, never run in threads. What it leaves to the blocking pool: warming,
rotation by age and idle reaping (an asyncio pool opens connections as it needs them).

Process and loop: a manager belongs to the process and the event loop that first used
it (asyncio connections are bound to their loop). AsyncClient checks both and builds a
fresh manager when either changed, dropping, never closing, the old one's sockets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.connection import SSLConnection as BlockingSSLConnection

from handoff.config import RedisPoolConfig
from handoff.connection.manager import call_guards, pool_kwargs
from handoff.connection.pool_metrics import HealthTracker, MetricsRecorder
from handoff.connection.process import current_pid
from handoff.connection.topology import Seeds, parse_seeds, seed_credentials
from handoff.errors import WrongProcess

T = TypeVar("T")


class AsyncRedisManager:
    """One process's and one event loop's asyncio Redis client, with retry and breaker."""

    def __init__(self, config: RedisPoolConfig) -> None:
        self.config = config
        self.pid = current_pid()
        self.loop: asyncio.AbstractEventLoop | None = None  # set by the first call
        self.recorder = MetricsRecorder()
        self.health = HealthTracker()
        self.breaker, self.retry = call_guards(config, self.health, self.health.success)
        self.mode = config.mode
        self.is_cluster = self.mode == "cluster"
        self._client: Any = None

    def __repr__(self) -> str:
        return f"<AsyncRedisManager {self.config.redacted_url} mode={self.mode} pid={self.pid}>"

    def owned_here(self) -> bool:
        """Built in this process, and unused or used on the running loop."""
        if current_pid() != self.pid:
            return False
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:  # looked at outside a loop (its keys, say): nothing to rebuild
            return True
        return self.loop is None or self.loop is running

    async def execute(self, fn: Callable[[Any], Awaitable[T]], *, retry: bool = True) -> T:
        """Await fn(client) with the breaker, the retry budget, and latency metrics."""
        if current_pid() != self.pid:
            raise WrongProcess(
                f"AsyncRedisManager built in pid {self.pid} used in pid {current_pid()}"
            )
        self.loop = self.loop or asyncio.get_running_loop()
        started = time.perf_counter()
        ok = False
        try:
            result = await self.retry.acall(self._call(fn), retry=retry)
            ok = True
            return result
        finally:
            self.recorder.request(time.perf_counter() - started, ok, pipelined_ops=0)

    def _call(self, fn: Callable[[Any], Awaitable[T]]) -> Callable[[], Awaitable[T]]:
        async def call() -> T:
            if self._client is None:
                self._client = await self._open()
            return await fn(self._client)

        return call

    async def _open(self) -> Any:
        options = _async_options(pool_kwargs(self.config))
        if self.mode == "sentinel":
            return _sentinel_client(self.config, options)
        if self.is_cluster:
            client = _cluster_client(self.config, options)
            await client.initialize()
            return client
        pool = aredis.BlockingConnectionPool(**{**parse_url(self.config.url), **options})
        return aredis.Redis(connection_pool=pool)

    async def close(self) -> None:
        """Close this manager's sockets (when they are this process's and this loop's)."""
        client, self._client = self._client, None
        if client is not None and self.owned_here():
            await client.aclose()


def _async_options(options: dict[str, Any]) -> dict[str, Any]:
    """The blocking pool's keyword arguments, for the asyncio pool."""
    options = {**options, "retry": Retry(NoBackoff(), 0)}
    if options.get("connection_class") is BlockingSSLConnection:
        options["connection_class"] = SSLConnection
    return options


def _sentinel_client(config: RedisPoolConfig, options: dict[str, Any]) -> aredis.Redis:
    seeds = parse_seeds(config.url, "sentinel")
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": config.dial_timeout_s,
        "socket_connect_timeout": config.dial_timeout_s,
    }
    if config.sentinel_password is not None:
        sentinel_kwargs["password"] = config.sentinel_password
    sentinel = Sentinel(list(seeds.hosts), sentinel_kwargs=sentinel_kwargs)
    kwargs = {**options, **seed_credentials(seeds, config)}
    kwargs.pop("connection_class", None)  # the sentinel pool picks its own
    kwargs.pop("timeout", None)  # (a blocking pool's wait: not a sentinel pool's)
    return sentinel.master_for(seeds.service, **kwargs)


def _cluster_client(config: RedisPoolConfig, options: dict[str, Any]) -> RedisCluster:
    if config.url.lower().startswith("redis+cluster:"):
        seeds = parse_seeds(config.url, "cluster")
    else:
        parsed = parse_url(config.url)
        host, port = parsed.get("host", "127.0.0.1"), parsed.get("port", 6379)
        seeds = Seeds(((host, port),), parsed.get("username"), parsed.get("password"), "")
    kwargs = {**options, **seed_credentials(seeds, config)}
    for name in ("timeout", "connection_class", "health_check_interval", "db"):
        kwargs.pop(name, None)
    kwargs["max_connections"] = kwargs.pop("max_connections", config.pool_size)
    if config.use_tls:
        kwargs["ssl"] = True
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in seeds.hosts], **kwargs)
