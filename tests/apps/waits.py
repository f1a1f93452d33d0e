"""Agents for the waits tests. What the then-handler saw is recorded in the test's server
(TEST_REDIS_URL), outside handoff, so a test can count its executions:

    after_runs   LIST  one JSON per `after` execution: {id, i, event, timed_out, run}

payloads:
    asker  {"i", "event", "timeout_s" (None: none), "on_timeout", "bad": a Wait to refuse}
    after  {"i"}
"""

from __future__ import annotations

import os
import time

import orjson

from handoff import Handoff, Join, Wait, agent
from harness.procs import plain_client

_clients: dict[tuple[int, str], object] = {}


def client():
    where = (os.getpid(), os.environ["TEST_REDIS_URL"])
    if where not in _clients:
        _clients[where] = plain_client(where[1])
    return _clients[where]


@agent("asker", max_concurrent=8)
def ask(task):
    p = task.payload
    then = Handoff("after", {"i": p.get("i", 0)})
    if p.get("bad") == "then":
        then = {"agent": "after"}
    elif p.get("bad") == "event":
        p = {**p, "event": ""}
    elif p.get("bad") == "timeout":
        p = {**p, "timeout_s": -1}
    return Wait(p["event"], then, p.get("timeout_s"), p.get("on_timeout", "fail"))


@agent("after", max_concurrent=8)
def after(task):
    record = {
        "id": task.id, "i": task.payload["i"], "event": task.event,
        "timed_out": task.timed_out, "run": task.run_id,
    }  # fmt: skip
    client().rpush("after_runs", orjson.dumps(record))
    return {"event": task.event, "timed_out": task.timed_out}


@agent("joiner")
def joiner(task):
    branches = [
        Handoff("asker", {"i": i, "event": event, "timeout_s": 30})
        for i, event in enumerate(task.payload["events"])
    ]
    return Join(branches, then=Handoff("gather", {}))


@agent("gather")
def gather(task):
    return [end["result"]["event"] for ends in task.branches for end in ends]


# Messages. listener {"n": messages to read, "timeout_s", "hang_after": read this many on
# a first delivery, then hang (the test kills the worker)}: records each delivery's reads
# in `heard` ({id, deliveries, pid, got}) as it goes, returns what it read.
@agent("listener", max_concurrent=2)
def listen(task):
    p = task.payload
    got = []
    client().rpush("listening", orjson.dumps({"id": task.id, "pid": os.getpid()}))
    for _ in range(p["n"]):
        got.append(task.receive(p.get("timeout_s")))
        client().rpush("heard", orjson.dumps({"deliveries": task.deliveries, "got": got}))
        if task.deliveries == 1 and len(got) == p.get("hang_after"):
            time.sleep(60)
    return got


@agent("alistener")
async def alisten(task):
    client().rpush("listening", orjson.dumps({"id": task.id, "pid": os.getpid()}))
    got = []
    async for message in task.messages(timeout_s=task.payload.get("timeout_s")):
        got.append(message)
        if len(got) == task.payload["n"]:
            break
    return got
