"""RedisManager: the per-process owner of the pool, its health, retries, breaker and metrics.

Runs in: every process, built lazily after fork. `get_manager()` returns this process's
one manager; `os.register_at_fork` drops the parent's manager in the child (only the
process that opened a socket ever shuts it down), and a manager used from the wrong
process raises WrongProcess instead of sharing sockets.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.connection import SSLConnection
from redis.retry import Retry

from handoff.config import RedisPoolConfig, redact_url
from handoff.connection.breaker import CircuitBreaker
from handoff.connection.lane import NOT_TAKEN, CommandLane, call_all
from handoff.connection.outage import not_ready_reason
from handoff.connection.pool_metrics import (
    HealthStatus,
    HealthTracker,
    MetricsRecorder,
    RedisPoolMetrics,
)
from handoff.connection.process import current_pid
from handoff.connection.retry import RetryPolicy, already_recorded
from handoff.connection.topology import ClusterPools, open_client, open_cluster
from handoff.errors import WrongProcess

log = logging.getLogger(__name__)
T = TypeVar("T")
LANE_MAX = 4  # connections the lane for single commands keeps (lane.py)


def pool_kwargs(config: RedisPoolConfig) -> dict[str, Any]:
    """Connection-pool keyword arguments from the config (no retry layer of redis-py's own)."""
    kwargs: dict[str, Any] = {
        "max_connections": config.pool_size,
        "timeout": config.pool_timeout_s,
        "socket_connect_timeout": config.dial_timeout_s,
        # One socket timeout covers reads and writes in Python; the larger of the two wins.
        "socket_timeout": max(config.read_timeout_s, config.write_timeout_s),
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
        "client_name": f"handoff-{current_pid()}",
    }
    if config.password is not None:
        kwargs["password"] = config.password
    if config.username is not None:
        kwargs["username"] = config.username
    if config.db:  # 0 is the default: the URL's db (redis://h/3, unix://...?db=3) stands
        kwargs["db"] = config.db
    if config.use_tls:
        if not config.url.startswith("rediss:"):
            kwargs["connection_class"] = SSLConnection
        kwargs["ssl_ca_certs"] = config.tls_ca_file
        kwargs["ssl_certfile"] = config.tls_cert_file
        kwargs["ssl_keyfile"] = config.tls_key_file
        kwargs["ssl_check_hostname"] = config.tls_check_hostname
    return kwargs


def call_guards(
    config: RedisPoolConfig,
    health: HealthTracker,
    on_success: Callable[[], None],
    before_probe: Callable[[], None] | None = None,
) -> tuple[CircuitBreaker, RetryPolicy]:
    """The circuit breaker and retry policy a manager's calls go through (the blocking
    one's and AsyncRedisManager's alike): failures go to health, errors name the
    redacted URL."""
    breaker = CircuitBreaker(config.breaker_failure_threshold, config.breaker_cooldown_s)
    retry = RetryPolicy(
        config.max_retries,
        config.min_retry_backoff_ms,
        config.max_retry_backoff_ms,
        breaker,
        on_failure=lambda e: health.failure(f"{type(e).__name__}: {e}"),
        on_success=on_success,
        describe_target=lambda: redact_url(config.url),
        before_probe=before_probe,
    )
    return breaker, retry


class RedisManager:
    """One process's Redis: pool, health checker, retry, breaker, metrics, and operations."""

    def __init__(self, config: RedisPoolConfig, *, background: bool = True) -> None:
        self.config = config
        self.pid = current_pid()
        self.recorder = MetricsRecorder()
        self.health = HealthTracker()
        self.breaker, self.retry = call_guards(
            config, self.health, self._on_call_success, before_probe=self._find_server_again
        )
        self.mode = config.mode  # "server", "sentinel" or "cluster"
        self.is_cluster = self.mode == "cluster"
        self._options = pool_kwargs(config)
        self._client: Any = None
        self._open_lock = threading.Lock()
        if self.is_cluster:  # built on first use: the cluster may not be up yet
            self.pool: Any = ClusterPools(lambda: self._client)
        else:
            self._client, self.pool = open_client(config, self._options, self.recorder)
        # A quarter of the pool (at most LANE_MAX) serves single commands (lane.py).
        lane_size = 0 if self.is_cluster else min(LANE_MAX, config.pool_size // 4)
        self._lane = CommandLane(self.pool, lane_size) if lane_size else None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        if background:
            self.start_background()

    def __repr__(self) -> str:
        return (
            f"<RedisManager {self.config.redacted_url} mode={self.mode} pid={self.pid} "
            f"pool_size={self.config.pool_size} breaker={self.breaker.state}>"
        )

    # -- process ownership -----------------------------------------------------------------

    def _check_process(self) -> None:
        if current_pid() != self.pid:
            raise WrongProcess(
                f"RedisManager built in pid {self.pid} used in pid {current_pid()}: "
                "call core.manager.get_manager() in the new process"
            )

    @property
    def client(self) -> redis.Redis:
        """The raw client. Calls through it skip retry and metrics; prefer execute()."""
        self._check_process()
        return self._get_client()

    def _get_client(self) -> Any:
        """The client; a cluster's is built here on first use (ConnectionError, retried
        like any other, while no node answers)."""
        client = self._client
        if client is None:
            with self._open_lock:
                if self._client is None:
                    self._client = open_cluster(self.config, self._options, self.recorder)
                client = self._client
        return client

    # -- calling Redis ---------------------------------------------------------------------

    def execute(self, fn: Callable[[redis.Redis], T], *, retry: bool = True) -> T:
        """Run fn(client) with the breaker, the retry budget, and latency metrics."""
        return self._call(fn, retry=retry, n_operations=0)

    def send(self, client: Any, *args: Any) -> Any:
        """One command's raw reply (no response callback), inside an execute() fn: on a
        lane connection when one is free (lane.py), else through the client."""
        lane = self._lane
        if lane is not None and client is self._client:
            reply = lane.call(*args)
            if reply is not NOT_TAKEN:
                return reply
        return client.execute_command(*args)

    def send_all(self, client: Any, commands: list[tuple]) -> list:
        """Raw replies to commands sent in one packet, inside an execute() fn: on a lane
        connection when one is free, else on one from the pool (lane.py); through a
        pipeline on a cluster, or a client that is not ours."""
        if client is self._client and not self.is_cluster:
            lane = self._lane
            if lane is not None:
                replies = lane.call_all(commands)
                if replies is not NOT_TAKEN:
                    return replies
            return call_all(self.pool, commands)
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return pipe.execute()

    def execute_batch(
        self, operations: Sequence[Callable[[Any], Any]], *, transaction: bool = False
    ) -> list:
        """Run many operations in one pipeline (one round trip); returns their replies."""

        def run(client: redis.Redis) -> list:
            pipe = client.pipeline(transaction=transaction)
            for operation in operations:
                operation(pipe)
            return pipe.execute()

        return self.execute_pipelined(run, len(operations))

    def execute_pipelined(self, fn: Callable[[redis.Redis], T], n_operations: int) -> T:
        """Like execute(), for a fn that sends n_operations in one pipeline (metrics)."""
        return self._call(fn, retry=True, n_operations=n_operations)

    def _call(self, fn: Callable[[redis.Redis], T], *, retry: bool, n_operations: int) -> T:
        self._check_process()
        started = time.perf_counter()
        ok = False
        try:
            result = self.retry.call(lambda: fn(self._get_client()), retry=retry)
            ok = True
            return result
        finally:
            self.recorder.request(time.perf_counter() - started, ok, pipelined_ops=n_operations)

    def _find_server_again(self) -> None:
        """Before a half-open probe: re-read the cluster's slot map, or ask the sentinels
        for the primary (which drops idle connections to a previous one). Best effort:
        if nothing answers, the probe itself fails and says so."""
        try:
            if self.is_cluster and self._client is not None:
                self._client.nodes_manager.initialize()
            elif self.mode == "sentinel":
                self.pool.get_master_address()
        except (redis.RedisError, OSError) as e:
            log.debug("could not look for the server again: %s", e)

    def _on_call_success(self) -> None:
        if not self.health.is_healthy_fast():
            self.health.success()

    # -- every primary ----------------------------------------------------------------------

    def node_clients(self) -> list[redis.Redis]:
        """One plain client per primary: the server itself, or each cluster primary.

        For what a cluster client cannot route by key: SCAN, INFO, CONFIG. Calls through
        these skip retry and metrics; wrap them in execute().
        """
        self._check_process()
        if not self.is_cluster:
            return [self._client]
        return self.execute(lambda c: [node.redis_connection for node in c.get_primaries()])

    def execute_batch_on(
        self, node: redis.Redis, operations: Sequence[Callable[[Any], Any]]
    ) -> list:
        """execute_batch() on one given node's client (see node_clients())."""

        def run(_client) -> list:
            pipe = node.pipeline(transaction=False)
            for operation in operations:
                operation(pipe)
            return pipe.execute()

        return self.execute_pipelined(run, len(operations))

    # -- health and metrics ----------------------------------------------------------------

    def ping(self) -> bool:
        """One health probe, outside the retry budget but through the breaker."""
        try:
            self.execute(lambda c: c.ping(), retry=False)
        except Exception as e:
            if not already_recorded(e):  # connection failures were counted once already
                self.health.failure(f"{type(e).__name__}: {e}")
            return False
        self.health.success()
        return True

    def sample_memory(self) -> None:
        try:
            used = 0
            for node in self.node_clients():
                info = self.execute(lambda _c, node=node: node.info("memory"), retry=False)
                used += int(info.get("used_memory", 0))
            self.recorder.memory_usage_bytes = used
        except Exception:  # the health probe has already recorded the failure
            pass

    def get_health(self) -> HealthStatus:
        return self.health.snapshot()

    def is_healthy(self) -> bool:
        return self.health.snapshot().is_healthy

    def get_detailed_metrics(self) -> RedisPoolMetrics:
        return self.recorder.snapshot(
            total_conns=self.pool.connected_count(), idle_conns=self.pool.idle_connected_count()
        )

    def get_pool_stats(self) -> dict[str, Any]:
        metrics = self.get_detailed_metrics()
        return {
            "total_conns": metrics.total_conns,
            "idle_conns": metrics.idle_conns,
            "stale_conns": metrics.stale_conns,
            "hits": metrics.hits,
            "misses": metrics.misses,
            "timeouts": metrics.timeouts,
            "pool_size": self.config.pool_size,
            "breaker": self.breaker.state,
        }

    # -- background threads ----------------------------------------------------------------

    def start_background(self) -> None:
        """Warm the pool, then run the health checker and the idle reaper."""
        self._spawn("redis-health", self.config.health_check_interval_s, self._health_tick)
        self._spawn("redis-pool-maintenance", self.config.idle_check_freq_s, self._maintain)
        try:
            self.pool.warm()
        except Exception as e:  # the server may be down at start: say so, retry each tick
            self.health.failure(f"{type(e).__name__}: {e}")
            # A server still starting is not an error: said at INFO (once, at start).
            level = logging.INFO if not_ready_reason(e) else logging.WARNING
            log.log(level, "could not warm the Redis pool: %s", e)

    def _spawn(self, name: str, interval_s: float, tick: Callable[[], None]) -> None:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    tick()
                except Exception:  # a housekeeping failure must not kill the thread
                    log.debug("%s tick failed", name, exc_info=True)

        thread = threading.Thread(target=loop, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _health_tick(self) -> None:
        if self.ping():
            self.sample_memory()

    def _maintain(self) -> None:
        self.pool.reap_idle()
        self.pool.warm()

    def close(self) -> None:
        """Stop the threads and close this process's sockets (never another process's)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2)
        if current_pid() == self.pid:
            self.pool.disconnect()


_manager: RedisManager | None = None
_manager_lock = threading.Lock()


def get_manager(config: RedisPoolConfig | None = None) -> RedisManager:
    """This process's manager, built on first use (after fork, in a child)."""
    global _manager
    current = _manager
    if current is not None and current.pid == current_pid():
        return current
    with _manager_lock:
        if _manager is None or _manager.pid != current_pid():
            if config is None:
                from handoff.config import load_settings

                config = load_settings().redis
            _manager = RedisManager(config)
        return _manager


def reset_manager() -> None:
    """Forget this process's manager (closing it when it is ours)."""
    global _manager
    with _manager_lock:
        if _manager is not None and _manager.pid == current_pid():
            _manager.close()
        _manager = None


def _forget_after_fork() -> None:
    # In the child: drop the reference without touching the parent's sockets.
    global _manager, _manager_lock
    _manager = None
    _manager_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
