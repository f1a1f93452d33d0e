"""handoff's side of the rate-limit benchmark: rate="10/s", held in the claim across every
worker. Runs in: `handoff worker limited` processes (HANDOFF_APP=app_rate_handoff)."""

import os
import time

import redis

from handoff import agent

_stats = redis.Redis.from_url(os.environ.get("BENCH_STATS_URL", "redis://127.0.0.1:1/1"))


@agent("limited", max_concurrent=50, rate="10/s")
def limited(task):
    _stats.rpush("starts", time.time() * 1000)
