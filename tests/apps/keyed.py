"""Agents for the repeated-key tests (test_conflict.py). What each handler did is recorded
in the test's server (TEST_REDIS_URL), outside handoff, one JSON per entry:

    keyed:started  LIST  {key, v} as a handler starts
    keyed:runs     LIST  {key, v, start, end, how} as a handler ends (how: "done", or
                         "stopped" when it was told of its cancel; start and end: time.time())

payloads: {"v": which message of its key, "sleep_s": how long the handler runs,
"linger_s": how long it takes to stop once told (its clean-up: 0 by default)}.
"""

from __future__ import annotations

import asyncio
import time

import orjson

from handoff import agent

from apps.flows import client


def _started(task) -> float:
    client().rpush("keyed:started", orjson.dumps({"key": task.key, "v": task.payload["v"]}))
    return time.time()


def _ended(task, start: float, how: str) -> None:
    run = {"key": task.key, "v": task.payload["v"], "start": start, "end": time.time()}
    client().rpush("keyed:runs", orjson.dumps({**run, "how": how}))


@agent("keyed", max_concurrent=1100)  # the 1,000 keys at once
async def keyed(task):
    """An async handler: a cancel reaches it as CancelledError at its await."""
    start, how = _started(task), "done"
    try:
        await asyncio.sleep(task.payload.get("sleep_s", 0.005))
    except asyncio.CancelledError:
        how = "stopped"
        await asyncio.sleep(task.payload.get("linger_s", 0))
        raise
    finally:
        _ended(task, start, how)
    return task.payload["v"]


@agent("skeyed", max_concurrent=16)
def skeyed(task):
    """A sync handler that waits on its cancel flag, as a long call would poll it."""
    start = _started(task)
    stopped = task.cancelled.wait(task.payload.get("sleep_s", 0.005))
    if stopped:
        time.sleep(task.payload.get("linger_s", 0))
    _ended(task, start, "stopped" if stopped else "done")
    return task.payload["v"]
