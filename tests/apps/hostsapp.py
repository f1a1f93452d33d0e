"""Agents for the tests on several hosts (tests/test_hosts.py). Each records, in the test's
server (TEST_REDIS_URL), which host (HOST_NAME) and process did what:

    executed   LIST  "<host> <pid> <task id>" per handler start
    finished   LIST  "<host> <pid> <task id>" per handler end
    then       LIST  "<host> <run id>" per start of a join's then-task
    stopped    LIST  "<host> <task id>" per handler that saw its cancel

Leases are short (1.5 s) so that a host cut off loses its tasks within seconds.
"""

from __future__ import annotations

import os
import time

from handoff import Handoff, Join, agent
from harness.procs import plain_client

HOST = os.environ.get("HOST_NAME", "?")
_client = None
_pid = 0


def client():
    global _client, _pid
    if _client is None or _pid != os.getpid():
        _client, _pid = plain_client(os.environ["TEST_REDIS_URL"]), os.getpid()
    return _client


def _say(key: str, what: str) -> None:
    client().rpush(key, f"{HOST} {os.getpid()} {what}")


@agent("hwork", max_concurrent=4, lease_s=1.5)
def hwork(task):
    """Works payload['sleep_s'] (0.3 s); returns who did it."""
    _say("executed", task.id)
    time.sleep(task.payload.get("sleep_s", 0.3))
    _say("finished", task.id)
    return {"host": HOST, "pid": os.getpid()}


@agent("hsplit", max_concurrent=2, lease_s=1.5)
def hsplit(task):
    """Fans out payload['fan'] hwork branches and joins them into hthen."""
    branches = [Handoff("hwork", {"sleep_s": task.payload["sleep_s"]})] * task.payload["fan"]
    return Join(branches, then=Handoff("hthen", {"run": task.id}))


@agent("hthen", max_concurrent=2, lease_s=1.5)
def hthen(task):
    client().rpush("then", f"{HOST} {task.payload['run']}")
    return len(task.branches)


@agent("hlong", max_concurrent=2, lease_s=1.5)
def hlong(task):
    """Runs until cancelled (or payload['sleep_s'], 30 s)."""
    _say("executed", task.id)
    if task.cancelled.wait(task.payload.get("sleep_s", 30)):
        _say("stopped", task.id)
        task.check_cancelled()
    return "slept"


@agent("hfan", max_concurrent=2, lease_s=1.5)
def hfan(task):
    """Hands off payload['fan'] hlong tasks (one run, no join)."""
    return [Handoff("hlong", {})] * task.payload["fan"]
