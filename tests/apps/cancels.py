"""Agents for the cancellation tests. What the handlers did is recorded in the test's
server (TEST_REDIS_URL), outside handoff:

    ran        LIST  one task id per noop execution
    starts     LIST  one JSON per start of the other agents: {id, agent, run, at_ms}
    stopped    LIST  one JSON per handler that saw its cancel: {id, how, at_ms}

payloads: {"sleep_s": how long to run (60 by default), "coders": n (cplanner)}; single runs
until the test pushes to go:<its id>
"""

from __future__ import annotations

import asyncio
import time

import orjson

from handoff import Handoff, agent

from apps.flows import client


def _now_ms() -> float:
    return time.time() * 1000


def _started(task) -> None:
    record = {"id": task.id, "agent": task.agent, "run": task.run_id, "at_ms": _now_ms()}
    client().rpush("starts", orjson.dumps(record))


def _stopped(task, how: str) -> None:
    at_ms = _now_ms()  # first: the record's own round trip is not the handler's delay
    client().rpush("stopped", orjson.dumps({"id": task.id, "how": how, "at_ms": at_ms}))


@agent("noop", max_concurrent=32)
def noop(task):
    client().rpush("ran", task.id)


@agent("patient", max_concurrent=64)
async def patient(task):
    """An async handler: a cancel reaches it as CancelledError at its await."""
    _started(task)
    try:
        await asyncio.sleep(task.payload.get("sleep_s", 60))
    except asyncio.CancelledError:
        _stopped(task, "CancelledError")
        raise
    return "slept"


@agent("polite", max_concurrent=16)
def polite(task):
    """A sync handler that waits on its cancel flag, as a long call would poll it."""
    _started(task)
    if task.cancelled.wait(task.payload.get("sleep_s", 60)):
        _stopped(task, "flag")
        task.check_cancelled()  # raises TaskCancelled: its outcome is dropped anyway
    return "slept"


@agent("stubborn", max_concurrent=4)
def stubborn(task):
    """A sync handler that ignores its cancel; short tasks beside it must finish once."""
    _started(task)
    time.sleep(task.payload.get("sleep_s", 60))
    client().rpush("ran", task.id)
    return "slept"


@agent("cplanner", max_concurrent=8)
def planner(task):
    _started(task)
    p = task.payload
    return [
        Handoff("ccoder", {"i": i, "sleep_s": p.get("sleep_s", 0.5)}) for i in range(p["coders"])
    ]


@agent("ccoder", max_concurrent=16)
def coder(task):
    _started(task)
    time.sleep(task.payload["sleep_s"])
    return [Handoff("creviewer", {"i": task.payload["i"], "k": k}) for k in range(2)]


@agent("creviewer", max_concurrent=16)
def reviewer(task):
    _started(task)
    time.sleep(0.2)
    return {"reviewed": task.payload["i"]}


@agent("single", max_concurrent=1)
def single(task):
    """One slot: the tasks claimed beside it (prefetch) wait in the worker for it. Records
    its start, then runs until the test pushes to go:<id> (at most 30 s)."""
    _started(task)
    client().blpop([f"go:{task.id}"], 30)
    return "went"
