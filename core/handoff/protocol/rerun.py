"""Rerun: send a run's dead tasks through again, reusing what finished.

Every task of the run that ended dead is enqueued again with fresh attempts (its stored
steps are kept: task.step reuses them); tasks that ended done never run again. The
scopes they reported to are reopened first (rerun.lua): a run's waiters block again
until it ends anew, a join waits for its rerun branches again, and a join's then-task
that was dead-lettered because a branch died (on_dead="fail") waits in its join again,
to fire once they end. result(follow=True) then answers as if the failure had not
happened: the dead ends are gone from the run's and the joins' ends.

Each call is idempotent, and the requeues come last: a rerun that stops half-way (a
crash, Redis gone) is finished by running it again. Exact on a cluster: each scope is
reopened in its own slot, each task requeued in its own.

Runs in: producers and operators (client.rerun, `handoff rerun`). A plan (plan.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from handoff.errors import InvalidPayload
from handoff.protocol.keys import Keys
from handoff.protocol.plan import Call, Plan, Scripts
from handoff.protocol.runs import read_tree
from handoff.protocol.task import agent_of

OPEN = ("queued", "running", "delayed")


@dataclass
class RerunReport:
    """What a rerun did: the tasks requeued, the then-tasks waiting in their join again;
    or why it did nothing (open: tasks of the run still queued or running)."""

    run_id: str
    requeued: list[str] = field(default_factory=list)
    rearmed: list[str] = field(default_factory=list)
    open: int = 0
    gone: list[str] = field(default_factory=list)  # dead tasks whose scope expired

    def line(self) -> str:
        if self.open:
            return (
                f"run {self.run_id} is still in progress ({self.open} task(s) queued or "
                "running): nothing rerun"
            )
        if not self.requeued and not self.rearmed:
            why = f" ({len(self.gone)} dead, their run's records expired)" if self.gone else ""
            return f"run {self.run_id} has nothing to rerun: no task of it ended dead{why}"
        total = len(self.requeued) + len(self.rearmed)
        line = f"run {self.run_id}: {total} dead task(s) sent again"
        if self.rearmed:
            line += f" ({len(self.requeued)} requeued, {len(self.rearmed)} join then-task(s)"
            line += " waiting for their branches again)"
        return line + "; done tasks and stored steps are kept"


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every task of a tree, outer ones first (a join's then after its branches)."""
    level = [node]
    while level:
        yield from level
        nxt: list[dict[str, Any]] = []
        for n in level:
            nxt.extend(n.get("children", []))
            if n.get("then") is not None:
                nxt.append(n["then"])
        level = nxt


def rerun(keys: Keys, run_id: str, result_bytes: int = 50) -> Plan[RerunReport]:
    """Reopen the scopes of the run's dead tasks, then requeue them (see the module)."""
    agent_of(run_id)
    tree = yield from read_tree(keys, run_id, result_bytes)
    if tree is None:
        raise InvalidPayload(f"run {run_id} is unknown (never enqueued, or its tree expired)")
    nodes = list(_nodes(tree))
    report = RerunReport(run_id, open=sum(n["status"] in OPEN for n in nodes))
    dead = [n["id"] for n in nodes if n["status"] == "dead"]
    if report.open or not dead:
        return report
    stored = yield _read_tasks(keys, dead)
    scopes: dict[str, list[str]] = {}  # scope -> its dead tasks, outer scopes first
    joins: set[str] = set()  # dead then-tasks (their own id is their join's scope)
    roots: list[str] = []  # dead tasks that are their own run (no scope to reopen)
    for task_id, raw in zip(dead, stored, strict=True):
        task = _decoded(raw)
        if task.get("join") is not None:
            joins.add(task_id)
        scope = task.get("scope") or task.get("run")
        if isinstance(scope, str):
            scopes.setdefault(scope, []).append(task_id)
        else:
            roots.append(task_id)
    rearm = {scope for scope in scopes if scope in joins}
    calls = [
        ("rerun", keys.agent(agent_of(s)).all(), [s, run_id, s if s in rearm else "", *ids])
        for s, ids in scopes.items()
    ]
    replies = (yield Scripts(calls)) if calls else []
    requeue = list(roots)
    for (scope, ids), reply in zip(scopes.items(), replies, strict=True):
        if reply and reply[0] == b"gone":
            report.gone += ids
            continue
        if scope in rearm and int(reply[1]):
            report.rearmed.append(scope)
        requeue += [i for i in ids if i not in rearm]
    report.requeued = yield from _requeue(keys, requeue)
    return report


def _read_tasks(keys: Keys, ids: list[str]) -> Call:
    def read(client) -> Any:
        pipe = client.pipeline(transaction=False)
        for task_id in ids:
            pipe.hget(keys.agent(agent_of(task_id)).tasks, task_id)
        return pipe.execute()

    return Call(read, n_operations=len(ids))


def _decoded(raw: bytes | None) -> dict[str, Any]:
    try:
        task = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        return {}
    return task if isinstance(task, dict) else {}


def _requeue(keys: Keys, ids: list[str]) -> Plan[list[str]]:
    """Dead tasks back to their queues with fresh attempts (dead_requeue.lua), per agent."""
    by_agent: dict[str, list[str]] = {}
    for task_id in ids:
        by_agent.setdefault(agent_of(task_id), []).append(task_id)
    if not by_agent:
        return []
    calls = [
        ("dead_requeue", keys.agent(agent).all(), [len(group), *group])
        for agent, group in by_agent.items()
    ]
    replies = yield Scripts(calls)
    return [i.decode() for reply in replies for i in reply]
