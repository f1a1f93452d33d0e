"""Agents for the steps and reruns tests. What the step functions did is recorded in the
test's server (TEST_REDIS_URL), outside handoff, so a test can count their calls:

    step_events   LIST  "<task id>|<step>|call|<pid>" when a step's function starts, and
                        "<task id>|<step>|ret|<pid>" when task.step returned to the handler
    model_calls   HASH  task id -> calls of the "model" step's function
    poisoned      STRING while "1", the branches with "poison" in their payload fail

payloads:
    stepper   {"sleep_s": up to this long in each step, "fail_attempts": fail after the
              steps on attempts up to this, "stall_s": the first delivery's model sleeps}
    badstep   {"case": "dup" | "object" | "nan" | "big" | "name"}
"""

from __future__ import annotations

import asyncio
import os
import random
import time

from handoff import Join, agent
from harness.procs import plain_client

_clients: dict[tuple[int, str], object] = {}
STEPS = ("model", "second", "third")


def client():
    where = (os.getpid(), os.environ["TEST_REDIS_URL"])
    if where not in _clients:
        _clients[where] = plain_client(where[1])
    return _clients[where]


def _event(task_id: str, name: str, what: str) -> None:
    client().rpush("step_events", f"{task_id}|{name}|{what}|{os.getpid()}")


def _call(task_id: str, name: str, sleep_s: float) -> dict:
    _event(task_id, name, "call")
    if name == "model":
        client().hincrby("model_calls", task_id, 1)
    time.sleep(sleep_s)
    return {"step": name, "task": task_id}


@agent("stepper", max_concurrent=2, max_attempts=20, retry_delay_s=0.01)
def stepper(task):
    p = task.payload
    values = []
    for name in STEPS:
        sleep_s = random.uniform(0, p.get("sleep_s", 0))
        if name == "model" and task.deliveries <= 1:
            sleep_s += p.get("stall_s", 0)
        values.append(task.step(name, _call, task.id, name, sleep_s))
        _event(task.id, name, "ret")
    if task.attempt <= p.get("fail_attempts", 0):
        raise RuntimeError("flaky after its steps")
    return [v["step"] for v in values]


async def _acall(task_id: str, name: str) -> dict:
    _event(task_id, name, "call")
    await asyncio.sleep(0)
    return {"step": name}


@agent("astepper", max_attempts=5, retry_delay_s=0.01)
async def astepper(task):
    first = await task.step("model", _acall, task.id, "model")
    second = task.step("plain", _call, task.id, "plain", 0)  # a sync step in a coroutine
    if task.attempt <= task.payload.get("fail_attempts", 0):
        raise RuntimeError("flaky after its steps")
    return [first["step"], second["step"]]


@agent("badstep", max_attempts=1)
def badstep(task):
    case = task.payload["case"]
    if case == "dup":
        task.step("a", lambda: 1)
        task.step("a", lambda: 2)
    elif case == "object":
        task.step("obj", object)
    elif case == "nan":
        task.step("nan", float, "nan")
    elif case == "big":
        task.step("big", lambda: "x" * 5000)
    elif case == "name":
        task.step("", lambda: 1)
    return "unreachable"


# -- a run to rerun: planner -> join of branches -> integrator -----------------------------


@agent("rplanner")
def planner(task):
    n, poison = task.payload["n"], set(task.payload.get("poison", []))
    branches = [("worker_step", {"i": i, "poison": i in poison}) for i in range(n)]
    from handoff import Handoff

    return Join([Handoff(a, p) for a, p in branches], then=Handoff("rintegrator", {}))


@agent("worker_step", max_attempts=1)
def worker_step(task):
    i = task.payload["i"]
    value = task.step("model", _call, task.id, "model", 0)
    if task.payload["poison"] and client().get("poisoned") == b"1":
        raise RuntimeError(f"branch {i} poisoned")
    client().rpush("branch_runs", task.id)
    return {"i": i, "model": value["step"]}


@agent("rintegrator", max_attempts=1)
def integrator(task):
    client().rpush("integrator_runs", task.id)
    if client().get("integrator_poisoned") == b"1":
        raise RuntimeError("integrator poisoned")
    return sorted(end["result"]["i"] for ends in task.branches for end in ends if end["result"])
