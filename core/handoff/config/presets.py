"""Named starting points for the pool: partial overrides, applied before the file and env.

Keys are flat ("redis.pool_size") like every other layer, so a preset is just the
lowest layer above the dataclass defaults.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

PRESETS: dict[str, MappingProxyType[str, Any]] = {
    # A laptop: few connections, rotated quickly so restarts of a dev server are noticed.
    "development": MappingProxyType(
        {"redis.pool_size": 10, "redis.min_idle_conns": 2, "redis.max_conn_age_s": 120.0}
    ),
    "production": MappingProxyType(
        {"redis.pool_size": 50, "redis.min_idle_conns": 10, "redis.max_conn_age_s": 600.0}
    ),
    # Failover-aware: notice a dead primary sooner, keep retrying through the switch, and
    # probe again 1 s after the breaker opens (a Sentinel failover takes a few seconds:
    # the default 5 s cooldown would leave workers idle after the new primary is up).
    "high_availability": MappingProxyType(
        {
            "redis.pool_size": 30,
            "redis.min_idle_conns": 8,
            "redis.health_check_interval_s": 15.0,
            "redis.max_retries": 10,
            "redis.breaker_cooldown_s": 1.0,
        }
    ),
}
