"""One client for whichever deployment the config names: one server, Sentinel, or Cluster.

Runs in: every process (called by RedisManager after fork). The rest of handoff sees one
redis-py client and one pool-like object, so the protocol, the worker and the monitor
share one code path for the three modes; where a mode really differs (scripts in a
cluster, WAIT after enqueue) core/cluster_calls.py and core/protocol.py say so.

- server: ManagedConnectionPool (blocking, warmed, rotated, counted) on one address.
- sentinel: the same pool, whose connections ask the sentinels for the primary on every
  connect; a connection that meets READONLY (the old primary, demoted) is dropped and the
  call is retried, so the next connect finds the new primary.
- cluster: redis-py's RedisCluster, with one ManagedConnectionPool per node (so warming,
  rotation and pool figures work per node) and redis-py's own retry off: the manager's
  RetryPolicy is the only retry layer, and redirections (MOVED/ASK/TRYAGAIN) are followed
  inside the call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import SSLConnection, parse_url
from redis.exceptions import AuthenticationError, RedisClusterException
from redis.retry import Retry
from redis.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPoolProxy,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)

from handoff.config import RedisPoolConfig
from handoff.connection.kernel_timeouts import kernel_timed
from handoff.connection.pool import ManagedConnectionPool
from handoff.connection.pool_metrics import MetricsRecorder

DEFAULT_PORTS = {"sentinel": 26379, "cluster": 6379}


@dataclass(frozen=True)
class Seeds:
    """What a sentinel or cluster URL names: seed addresses, credentials, service."""

    hosts: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    service: str


def parse_seeds(url: str, mode: str) -> Seeds:
    """redis+sentinel://[user:pass@]h1:p1,h2:p2/service or redis+cluster://[...@]h1:p1,h2:p2."""
    parts = urlsplit(url)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    hosts = []
    for item in hostlist.split(","):
        one = urlsplit(f"//{item}")
        hosts.append((one.hostname or "127.0.0.1", one.port or DEFAULT_PORTS[mode]))
    return Seeds(tuple(hosts), username, password, parts.path.strip("/"))


def managed_pool_factory(
    config: RedisPoolConfig, recorder: MetricsRecorder, pool_class: type | None = None
):
    """A managed pool's constructor with this config's lifecycle settings bound."""
    return functools.partial(
        pool_class or ManagedConnectionPool,
        max_conn_age_s=config.max_conn_age_s,
        idle_timeout_s=config.idle_timeout_s,
        min_idle_conns=config.min_idle_conns,
        recorder=recorder,
    )


class _SentinelProxy(SentinelConnectionPoolProxy):
    """redis-py's proxy, with a one-line error when no sentinel names a primary (its own
    message repeats the repr of every sentinel client, a screenful per attempt)."""

    def get_master_address(self):
        try:
            return super().get_master_address()
        except MasterNotFoundError:
            sentinels = ", ".join(
                f"{c.connection_pool.connection_kwargs.get('host')}:"
                f"{c.connection_pool.connection_kwargs.get('port')}"
                for c in self.sentinel_manager.sentinels
            )
            raise MasterNotFoundError(
                f"no sentinel at {sentinels} names a primary for service "
                f"{self.service_name!r} (unreachable, wrong service name, or a sentinel "
                "password that sentinel_password does not give)"
            ) from None


class ManagedSentinelPool(ManagedConnectionPool):
    """The managed pool whose connections go to whichever server the sentinels call primary."""

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        ssl = kwargs.get("connection_class") is SSLConnection
        kwargs["connection_class"] = (
            SentinelManagedSSLConnection if ssl else SentinelManagedConnection
        )
        self.service_name = service_name
        # The connections read is_master & co from the proxy, their `connection_pool`.
        self.proxy = _SentinelProxy(
            connection_pool=self,
            is_master=True,
            check_connection=False,
            service_name=service_name,
            sentinel_manager=sentinel_manager,
        )
        super().__init__(**kwargs)
        self.connection_kwargs["connection_pool"] = self.proxy

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} service={self.service_name} pool_size={self.max_connections}>"
        )

    def owns_connection(self, connection) -> bool:
        """A connection to a previous primary is not ours any more: released, it is closed
        (and its slot reconnects to the primary the sentinels name now)."""
        address = self.proxy.master_address
        current = address is None or address == (connection.host, connection.port)
        return current and super().owns_connection(connection)

    def get_master_address(self):
        return self.proxy.get_master_address()


class ClusterPools:
    """The per-node pools of a RedisCluster, seen as one pool (warm, reap, count, close).

    `cluster()` returns the client, or None while it could not be built yet (no node
    reachable at start): then there are no pools, and nothing to warm or close.
    """

    def __init__(self, cluster: Callable[[], RedisCluster | None]) -> None:
        self.cluster = cluster

    def pools(self) -> list[ManagedConnectionPool]:
        cluster = self.cluster()
        if cluster is None:
            return []
        found = []
        for node in cluster.get_nodes():
            if node.redis_connection is not None:
                found.append(node.redis_connection.connection_pool)
        return found

    @property
    def _connections(self) -> list:
        """Every node's connections (the attribute a single pool has: same duck type)."""
        return [c for pool in self.pools() for c in pool._connections]

    def warm(self) -> int:
        return sum(pool.warm() for pool in self.pools())

    def reap_idle(self) -> int:
        return sum(pool.reap_idle() for pool in self.pools())

    def connected_count(self) -> int:
        return sum(pool.connected_count() for pool in self.pools())

    def idle_connected_count(self) -> int:
        return sum(pool.idle_connected_count() for pool in self.pools())

    def disconnect(self) -> None:
        cluster = self.cluster()
        if cluster is not None:
            cluster.close()

    def __repr__(self) -> str:
        return f"<ClusterPools nodes={len(self.pools())}>"


def open_client(
    config: RedisPoolConfig, options: dict[str, Any], recorder: MetricsRecorder
) -> tuple[Any, Any]:
    """(client, pool) for one server or Sentinel; options are the connection-pool keyword
    arguments. A cluster client is built by open_cluster, when first needed."""
    mode = config.mode
    if mode == "sentinel":
        return _open_sentinel(config, options, recorder)
    # Not from_url(): there the URL's password and db would override the config's.
    kwargs = kernel_timed({**parse_url(config.url), **options})
    pool = managed_pool_factory(config, recorder)(**kwargs)
    return redis.Redis(connection_pool=pool), pool


def seed_credentials(seeds: Seeds, config: RedisPoolConfig) -> dict[str, Any]:
    """The data nodes' credentials: the config's fields win over the URL's."""
    out: dict[str, Any] = {}
    username = config.username if config.username is not None else seeds.username
    password = config.password if config.password is not None else seeds.password
    if username is not None:
        out["username"] = username
    if password is not None:
        out["password"] = password
    return out


def _open_sentinel(config: RedisPoolConfig, options: dict[str, Any], recorder: MetricsRecorder):
    seeds = parse_seeds(config.url, "sentinel")
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": config.dial_timeout_s,
        "socket_connect_timeout": config.dial_timeout_s,
        "retry": Retry(NoBackoff(), 0),
    }
    if config.sentinel_password is not None:
        sentinel_kwargs["password"] = config.sentinel_password
    sentinel = Sentinel(list(seeds.hosts), sentinel_kwargs=sentinel_kwargs)
    kwargs = {**options, **seed_credentials(seeds, config)}
    if config.db:
        kwargs["db"] = config.db
    pool = managed_pool_factory(config, recorder, ManagedSentinelPool)(
        service_name=seeds.service, sentinel_manager=sentinel, **kwargs
    )
    return redis.Redis(connection_pool=pool), pool


def open_cluster(
    config: RedisPoolConfig, options: dict[str, Any], recorder: MetricsRecorder
) -> RedisCluster:
    """A RedisCluster on the config's seeds. redis-py reads the slot map right here: when
    no seed answers, this raises ConnectionError (retriable), so a worker started before
    its cluster waits for it like a worker started before its server."""
    if config.url.lower().startswith("redis+cluster:"):
        seeds = parse_seeds(config.url, "cluster")
    else:  # cluster = true on a plain URL: that one address is the seed
        parsed = parse_url(config.url)
        seeds = Seeds(
            ((parsed.get("host", "127.0.0.1"), parsed.get("port", 6379)),),
            parsed.get("username"),
            parsed.get("password"),
            "",
        )
    kwargs = {**options, **seed_credentials(seeds, config)}
    if config.use_tls:  # a rediss:// seed: its scheme is not in the url given below
        kwargs["connection_class"] = SSLConnection
    kwargs.pop("retry", None)  # the cluster client takes its retry as an argument
    kwargs.pop("health_check_interval", None)
    kwargs.pop("db", None)
    (host, port), rest = seeds.hosts[0], seeds.hosts[1:]
    try:
        return RedisCluster(
            # A url (without secrets) makes redis-py build each node's pool with
            # connection_pool_class: our managed pool, per node.
            url=f"redis://{host}:{port}",
            startup_nodes=[ClusterNode(h, p) for h, p in rest],
            connection_pool_class=managed_pool_factory(config, recorder),
            retry=Retry(NoBackoff(), 0),
            **kwargs,
        )
    except RedisClusterException as e:
        text = str(e)
        if any(sign in text for sign in ("WRONGPASS", "NOAUTH", "invalid username-password")):
            raise AuthenticationError(text.rpartition(": ")[2] or text) from None
        reason = text.rpartition(": ")[2]
        raise redis.ConnectionError(f"no cluster node reachable: {reason}") from None
