"""Agents for `python -m benchmarks runs` (HANDOFF_APP=benchmarks.run_agents).

Runs in: handoff worker processes started by that benchmark (the project root on
PYTHONPATH). Times are wall-clock ms (time.time), recorded in the broker under keys
outside handoff's prefix:

    bench:last_end:<run>   the latest end of a leaf of that run (a leaf's handler return)
    bench:then_start:<run> when gather's handler started (one run, one gather)

joiner  payload {"n"}: Join of n leaves, then gather
fanner  payload {"n"}: a fan-out of n leaves (no join: the run ends with its last leaf)
"""

from __future__ import annotations

import os
import time

import redis

from handoff import Handoff, Join, agent

_MAX = """
local v = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > v then redis.call('SET', KEYS[1], ARGV[1]) end
"""
_client: redis.Redis | None = None
_pid = 0


def _broker() -> redis.Redis:
    global _client, _pid
    if _client is None or _pid != os.getpid():
        _client, _pid = redis.Redis.from_url(os.environ["HANDOFF_REDIS_URL"]), os.getpid()
    return _client


def _now_ms() -> float:
    return time.time() * 1000


@agent("joiner", max_concurrent=2)
def joiner(task):
    leaves = [Handoff("leaf", i) for i in range(task.payload["n"])]
    return Join(leaves, then=Handoff("gather", {}))


@agent("fanner", max_concurrent=2)
def fanner(task):
    return [Handoff("leaf", i) for i in range(task.payload["n"])]


@agent("leaf", max_concurrent=8)
def leaf(task):
    _broker().eval(_MAX, 1, f"bench:last_end:{task.run_id}", _now_ms())
    return task.payload


@agent("gather", max_concurrent=2)
def gather(task):
    _broker().set(f"bench:then_start:{task.run_id}", _now_ms())
    return sum(len(ends) for ends in task.branches)
