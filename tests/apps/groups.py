"""Agents for the groups tests. Every start is recorded in the test's server
(TEST_REDIS_URL), outside handoff: LIST `gstarts`, one JSON {id, group, attempt, at_ms}
per start (the time taken first); `gends` the same at the end of `capped` tasks.

payloads: {"group": the group it was enqueued with (for the record), "sleep_s",
"limited_s": the first delivery raises RateLimited(limited_s)}
"""

from __future__ import annotations

import time

import orjson

from handoff import Handoff, RateLimited, agent

from apps.flows import client


def _record(task, name: str = "gstarts") -> None:
    at_ms = time.time() * 1000
    record = {"id": task.id, "group": task.group, "attempt": task.attempt, "at_ms": at_ms}
    client().rpush(name, orjson.dumps(record))


@agent("fair", max_concurrent=1)
def fair(task):
    _record(task)
    if task.payload.get("next"):
        return Handoff("fair", {})  # inherits the group
    return task.payload


@agent("paced", max_concurrent=50, group_rate="5/s")
def paced(task):
    _record(task)


@agent("capped", max_concurrent=20, group_concurrency=2)
def capped(task):
    _record(task)
    time.sleep(task.payload.get("sleep_s", 0.2))
    _record(task, "gends")


@agent("courteous", max_concurrent=8)
def courteous(task):
    _record(task)
    limited = task.payload.get("limited_s")
    if limited and client().set(f"limited:{task.id}", 1, nx=True):
        raise RateLimited(limited)
    time.sleep(task.payload.get("sleep_s", 0))


@agent("spender", max_concurrent=50, cost_limit="1000/s")
def spender(task):
    """Charges payload "units" (100 by default): what a model call's tokens would be."""
    _record(task)
    task.charge(task.payload.get("units", 100))
