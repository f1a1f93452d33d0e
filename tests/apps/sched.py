"""An app with a schedule, for tests/test_schedules.py: `ticker` records every tick it runs
in the test's server (TEST_REDIS_URL), so a test can count ticks from outside.

    ticks  LIST  "<tick ms> <task id> <lateness ms> <pid>" per execution

SCHEDULE_EVERY_S (default 1) sets the interval of the `every-second` schedule.
"""

from __future__ import annotations

import os

from handoff import agent, schedule
from handoff.runtime.schedules import tick_of
from harness.procs import plain_client

_client = None
_client_pid = 0


def _redis():
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        _client = plain_client(os.environ["TEST_REDIS_URL"])
        _client_pid = os.getpid()
    return _client


@agent("ticker", max_concurrent=4)
def ticker(task):
    """Records its tick and how late its task was created after the tick."""
    _name, tick = tick_of(task) or ("", 0)
    _redis().rpush("ticks", f"{tick} {task.id} {task.created_at - tick} {os.getpid()}")
    return tick


schedule(
    "every-second",
    every_s=float(os.environ.get("SCHEDULE_EVERY_S", "1")),
    agent="ticker",
    payload={"from": "code"},
)
