"""The pool manager's operations, over a RedisManager: set with expiry, ZADD
and ZPOPMIN in batches, SCAN-based cleanup of idle keys, and the opt-in server memory
settings (`redis.memory_optimization`).

Kept beside the manager rather than in it: the manager owns the pool and how calls are
made; these are calls a user may want, built on its execute()/execute_batch().
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import redis

from handoff.connection.manager import RedisManager
from handoff.errors import RedisCommandError

log = logging.getLogger(__name__)

# Compact encodings and lazy freeing. Never maxmemory-policy: eviction deletes tasks.
MEMORY_SETTINGS = {
    "lazyfree-lazy-expire": "yes",
    "lazyfree-lazy-server-del": "yes",
    "activedefrag": "no",
    "hash-max-listpack-entries": "512",
    "zset-max-listpack-entries": "256",
}


def set_with_expiry(manager: RedisManager, key: str, value: bytes | str, ttl_s: float) -> bool:
    ttl_ms = max(1, int(ttl_s * 1000))
    return bool(manager.execute(lambda c: c.set(key, value, px=ttl_ms)))


def zadd_batch(manager: RedisManager, key: str, members: dict[str | bytes, float]) -> int:
    return int(manager.execute(lambda c: c.zadd(key, members)))


def zpopmin_batch(
    manager: RedisManager, keys: Sequence[str], count: int
) -> dict[str, list[tuple[bytes, float]]]:
    """ZPOPMIN up to count members from each of several queues in one pipeline."""
    replies = manager.execute_batch([lambda p, k=k: p.zpopmin(k, count) for k in keys])
    return dict(zip(keys, replies, strict=True))


def cleanup_expired_keys(
    manager: RedisManager,
    patterns: Sequence[str],
    *,
    idle_longer_than_s: float,
    scan_count: int = 500,
) -> int:
    """Unlink keys matching patterns that no one has touched for idle_longer_than_s.

    SCAN (never KEYS) walks the keyspace in bounded steps, on each primary of a
    cluster; expired keys it meets are removed by the server on the way. Idle time
    comes from OBJECT IDLETIME in one pipeline per SCAN page, and the victims go in
    one pipeline of UNLINKs per page (one key each: keys of a page span slots).
    """
    removed = 0
    for node in manager.node_clients():
        for pattern in patterns:
            removed += _cleanup_node(manager, node, pattern, idle_longer_than_s, scan_count)
    return removed


def _cleanup_node(
    manager: RedisManager, node: redis.Redis, pattern: str, idle_s: float, count: int
) -> int:
    removed, cursor = 0, 0
    while True:
        cursor, keys = manager.execute(
            lambda _c, cur=cursor: node.scan(cur, match=pattern, count=count)
        )
        if keys:
            idle = manager.execute_batch_on(
                node, [lambda p, k=k: p.object("idletime", k) for k in keys]
            )
            stale = [k for k, s in zip(keys, idle, strict=True) if s is not None and s > idle_s]
            if stale:
                gone = manager.execute_batch_on(node, [lambda p, k=k: p.unlink(k) for k in stale])
                removed += sum(int(n) for n in gone)
        if cursor == 0:
            return removed


def apply_memory_settings(manager: RedisManager) -> dict[str, str]:
    """CONFIG SET the memory settings on every primary; returns those that took.

    Runs when `redis.memory_optimization` is on, once per supervisor start. A setting the
    server refuses (managed servers often forbid CONFIG) is logged and skipped.
    """
    applied = {}
    for name, value in MEMORY_SETTINGS.items():
        try:
            for node in manager.node_clients():
                manager.execute(lambda _c, n=name, v=value, node=node: node.config_set(n, v))
            applied[name] = value
        except RedisCommandError as e:
            log.warning("could not set %s: %s", name, e)
    return applied
