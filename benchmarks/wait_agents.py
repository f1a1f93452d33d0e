"""Agents for `python -m benchmarks waits` and the drains of `python -m benchmarks steps`
(HANDOFF_APP=benchmarks.wait_agents).

Runs in: handoff worker processes started by those benchmarks (the project root on
PYTHONPATH), and in the benchmark itself (handoff.testing.InProcessApp parks the waits and
stores the steps with the workers' own code). Start times are wall clock (time.time: one
machine, one clock), pushed to a probe server outside handoff (BENCH_PROBE_URL) as
"<kind> <start> <t0>" on the list BENCH_PROBE_KEY; kind "signal" has t0 0 (the benchmark
takes it just before client.signal).

    asker    {"event", "timeout_s"}: Wait(event, then=Handoff("resumed", {"kind": "signal"}))
             {"handoff": 1}: Handoff("resumed", {"kind": "handoff", "t0": now}), t0 taken
             just before the return (the plain handoff the signal is measured beside)
    resumed  records its start
    bulk     a noop behind benchmarks/agents.py's gate (BENCH_GATE_DIR): the drains
    stepper  three memoized steps (task.step), each a trivial function
"""

from __future__ import annotations

import os
import time

from benchmarks.agents import noop as gated_noop
from handoff import Handoff, Wait, agent

_probe = None
_probe_pid = 0


def _push(line: str) -> None:
    global _probe, _probe_pid
    url = os.environ.get("BENCH_PROBE_URL")
    if not url:
        return
    if _probe is None or _probe_pid != os.getpid():
        import redis

        _probe, _probe_pid = redis.Redis.from_url(url), os.getpid()
    _probe.rpush(os.environ.get("BENCH_PROBE_KEY", "starts"), line)


@agent("asker", max_concurrent=8)
def asker(task):
    p = task.payload
    if "event" in p:
        return Wait(p["event"], Handoff("resumed", {"kind": "signal"}), p.get("timeout_s"))
    return Handoff("resumed", {"kind": "handoff", "t0": time.time()})


@agent("resumed", max_concurrent=8)
def resumed(task):
    start = time.time()
    _push(f"{task.payload['kind']} {start!r} {task.payload.get('t0', 0)!r}")


@agent("bulk", max_concurrent=8)
def bulk(task):
    gated_noop(task)


def _answer(n: int) -> dict:
    return {"answer": "a short model reply", "n": n}


@agent("stepper", max_concurrent=8)
def stepper(task):
    return [task.step(name, _answer, i) for i, name in enumerate(("plan", "call", "check"))]
