"""Agents for the keyed-Handoff tests (test_handoff_key.py). What each did is recorded in
the test's server (TEST_REDIS_URL), outside handoff, one JSON per entry:

    handkey:parents  LIST  {id, v, at} as a hander's handler starts (every delivery)
    handkey:runs     LIST  {id, key, v, run} as the keyed agent's handler runs

hander payload: {"v": any, "hand": Handoff's keyword arguments for the keyed task
(agent "hkeyed" unless "agent" is given), "plain": also hand a plain child to "hplain",
"sleep_s": how long the handler takes first}.
"""

from __future__ import annotations

import time

import orjson

from handoff import Handoff, Join, Wait, agent

from apps.flows import client


def _keyed(p: dict) -> Handoff:
    options = dict(p["hand"])
    return Handoff(options.pop("agent", "hkeyed"), {"v": p["v"]}, **options)


@agent("hander", max_concurrent=1)  # one at a time: the parents hand off in their order
def hander(task):
    p = task.payload
    client().rpush("handkey:parents", orjson.dumps({"id": task.id, "v": p["v"], "at": time.time()}))
    time.sleep(p.get("sleep_s", 0))
    keyed = _keyed(p)
    return [Handoff("hplain", {"v": p["v"]}), keyed] if p.get("plain") else keyed


@agent("hjoiner")
def hjoiner(task):
    """A keyed Handoff where a Join or a Wait would have to wait for it: refused."""
    p, keyed = task.payload, _keyed(task.payload)
    plain = Handoff("hplain", {"v": p["v"]})
    if p["where"] == "branch":
        return Join([plain, keyed], then=plain)
    if p["where"] == "then":
        return Join([plain], then=keyed)
    return Wait("never", then=keyed)


@agent("hkeyed", max_concurrent=8)
def hkeyed(task):
    run = {"id": task.id, "key": task.key, "v": task.payload["v"], "run": task.run_id}
    client().rpush("handkey:runs", orjson.dumps(run))
    return task.payload["v"]


@agent("hplain", max_concurrent=8)
def hplain(task):
    return {"plain": task.payload["v"]}
