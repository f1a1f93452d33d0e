"""Agents for the runs and joins tests. What the then-handler saw is recorded in the
test's server (TEST_REDIS_URL), outside handoff, so a test can count its executions:

    merged          LIST  one JSON per merge execution: {id, at_ms, branches, run}
    step_ends       LIST  one JSON per step that returned a value: {id, at_ms, run}
    planned         LIST  one splitter task id per splitter execution

payloads:
    splitter  {"n": branches, "splitter_sleep_s", "hops": handoffs per branch, "fan": split
              every branch in two at its first hop (or "fan_at": [the indices that split]),
              "poison": [branch indices that fail], "on_dead",
              "nest": [branch indices that join again]}
    step     {"i", "hops", "fan", "poison", "nest", "sleep_s"} (splitter's "step_sleep_s")
"""

from __future__ import annotations

import os
import time

import orjson

from handoff import Handoff, Join, RateLimited, agent
from harness.procs import plain_client

_clients: dict[tuple[int, str], object] = {}


def client():
    """A client of the test's server, per process and per URL (one test process runs
    tests against a server and a cluster in turn)."""
    where = (os.getpid(), os.environ["TEST_REDIS_URL"])
    if where not in _clients:
        _clients[where] = plain_client(where[1])
    return _clients[where]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@agent("splitter", max_concurrent=4)
def splitter(task):
    p = task.payload
    client().rpush("planned", task.id)
    time.sleep(p.get("splitter_sleep_s", 0))
    fan_at = set(p.get("fan_at", range(p["n"]) if p.get("fan") else []))
    branches = [
        Handoff(
            "step",
            {
                "i": i,
                "hops": p.get("hops", 0),
                "fan": i in fan_at,
                "poison": i in p.get("poison", []),
                "nest": i in p.get("nest", []),
                "sleep_s": p.get("step_sleep_s", 0),
            },
        )
        for i in range(p["n"])
    ]
    return Join(branches, then=Handoff("merge", {"run": task.id}), on_dead=p.get("on_dead", "fail"))


@agent("step", max_concurrent=16, max_attempts=1)
def step(task):
    p = task.payload
    if p.get("sleep_s"):
        time.sleep(p["sleep_s"])
    if p.get("poison"):
        raise RuntimeError(f"poisoned branch {p['i']}")
    if p.get("nest"):
        inner = [Handoff("step", {"i": p["i"] * 100 + k, "hops": 0}) for k in range(2)]
        return Join(inner, then=Handoff("step", {"i": p["i"], "hops": 0, "after_nest": True}))
    if p.get("hops", 0) > 0:
        nxt = {**p, "hops": p["hops"] - 1, "fan": False}
        if p.get("fan"):
            return [Handoff("step", {**nxt, "i": p["i"]}), Handoff("step", {**nxt, "i": p["i"]})]
        return Handoff("step", nxt)
    if p.get("after_nest"):
        inner = [[end["result"] for end in ends] for ends in task.branches]
        _step_ended(task)
        return {"i": p["i"], "inner": inner}
    _step_ended(task)
    return {"i": p["i"]}


def _step_ended(task) -> None:
    record = {"id": task.id, "at_ms": _now_ms(), "run": task.run_id}
    client().rpush("step_ends", orjson.dumps(record))


@agent("merge", max_concurrent=4)
def merge(task):
    record = {"id": task.id, "at_ms": _now_ms(), "branches": task.branches, "run": task.run_id}
    client().rpush("merged", orjson.dumps(record))
    return {"merged": [[end.get("result") for end in ends] for ends in task.branches]}


@agent("echo")
def echo(task):
    p = task.payload
    if isinstance(p, dict) and p.get("next"):
        return Handoff(p["next"], {k: v for k, v in p.items() if k != "next"})
    return p


@agent("metered", max_concurrent=50, rate="5/s")
def metered(task):
    """Records its start (wall clock, ms) in `starts`: the rate-limit tests. (The time is
    taken first: a process's first client() builds its connection.)"""
    started_ms = time.time() * 1000
    client().rpush("starts", orjson.dumps({"id": task.id, "at_ms": started_ms}))
    return task.payload


@agent("throttled", max_concurrent=4)
def throttled(task):
    """The first delivery of a task whose payload has "limited_s" is told to slow down;
    every start is recorded in `throttled` ({id, attempt, at_ms})."""
    record = {"id": task.id, "attempt": task.attempt, "at_ms": time.time() * 1000}
    client().rpush("throttled", orjson.dumps(record))  # (the time taken first, as above)
    if task.payload.get("limited_s") and client().set(f"limited:{task.id}", 1, nx=True):
        raise RateLimited(task.payload["limited_s"])
    return task.payload
