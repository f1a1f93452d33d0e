"""Rerun: send a run's dead or cancelled tasks through again, reusing what finished.

Every task of the run that ended dead or cancelled is enqueued again with fresh attempts
(its stored steps are kept: task.step reuses them; a cancelled task's JSON is kept in its
record for this), the run's cancel marks lifted; tasks that ended done never run again. The
scopes they reported to are reopened first (rerun.lua): a run's waiters block again
until it ends anew, a join waits for its rerun branches again, and a join's then-task
that was dead-lettered because a branch died (on_dead="fail"), or cancelled, waits in
its join again,
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
            why = f" ({len(self.gone)} whose records expired)" if self.gone else ""
            return (
                f"run {self.run_id} has nothing to rerun: no task of it ended dead or "
                f"cancelled{why}"
            )
        total = len(self.requeued) + len(self.rearmed)
        line = f"run {self.run_id}: {total} dead or cancelled task(s) sent again"
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
    """Lift the run's cancel marks, reopen the scopes of its dead and cancelled tasks,
    then send those tasks again (see the module)."""
    agent_of(run_id)
    tree = yield from read_tree(keys, run_id, result_bytes)
    if tree is None:
        raise InvalidPayload(f"run {run_id} is unknown (never enqueued, or its tree expired)")
    nodes = list(_nodes(tree))
    report = RerunReport(run_id, open=sum(n["status"] in OPEN for n in nodes))
    ended = [(n["id"], n["status"]) for n in nodes if n["status"] in ("dead", "cancelled")]
    if report.open or not ended:
        return report
    stored = yield from _read_tasks(keys, ended)
    scopes: dict[str, list[str]] = {}  # scope -> its tasks to send again, outer first
    joins: set[str] = set()  # then-tasks among them (their own id is their join's scope)
    cancelled = {task_id for task_id, status in ended if status == "cancelled"}
    sent: list[str] = []  # in the order found
    for (task_id, _), task in zip(ended, stored, strict=True):
        if not task:  # a cancelled task whose JSON was not kept
            report.gone.append(task_id)
            continue
        sent.append(task_id)
        if task.get("join") is not None:
            joins.add(task_id)
        scope = task.get("scope") or task.get("run")
        if isinstance(scope, str):
            scopes.setdefault(scope, []).append(task_id)
    if cancelled:
        yield from lift_marks(keys, [run_id, *cancelled])
    rearm = {scope for scope in scopes if scope in joins}
    calls = [
        ("rerun", keys.agent(agent_of(s)).all(), [s, run_id, s if s in rearm else "", *ids])
        for s, ids in scopes.items()
    ]
    replies = (yield Scripts(calls)) if calls else []
    skip = set(rearm)
    for (scope, ids), reply in zip(scopes.items(), replies, strict=True):
        if reply and reply[0] == b"gone":
            report.gone += ids
            skip.update(ids)
        elif scope in rearm and int(reply[1]):
            report.rearmed.append(scope)
    again = [i for i in sent if i not in skip]
    report.requeued = yield from _send_again(keys, again, cancelled)
    return report


def _read_tasks(keys: Keys, ended: list[tuple[str, str]]) -> Plan[list[dict[str, Any]]]:
    """Each task's JSON: a dead one's from the tasks hash, a cancelled one's from its
    record (end_cancelled keeps it there); {} when there is none."""

    def read(client) -> Any:
        pipe = client.pipeline(transaction=False)
        for task_id, status in ended:
            agent_keys = keys.agent(agent_of(task_id))
            if status == "dead":
                pipe.hget(agent_keys.tasks, task_id)
            else:
                pipe.get(agent_keys.result(task_id))
        return pipe.execute()

    replies = yield Call(read, n_operations=len(ended))
    tasks = []
    for (_, status), raw in zip(ended, replies, strict=True):
        decoded = _decoded(raw)
        tasks.append(decoded if status == "dead" else _decoded_task(decoded))
    return tasks


def _decoded_task(record: dict[str, Any]) -> dict[str, Any]:
    task = record.get("task")
    return task if isinstance(task, dict) else {}


def _decoded(raw: bytes | None) -> dict[str, Any]:
    try:
        task = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        return {}
    return task if isinstance(task, dict) else {}


def lift_marks(keys: Keys, ids: list[str]) -> Plan[None]:
    """The run's cancel marks (and its cancelled tasks' own), in every agent's slot: its
    tasks sent again must not end cancelled at claim."""
    agents = yield Call(lambda c: c.smembers(keys.agents))

    def lift(client) -> Any:
        pipe = client.pipeline(transaction=False)
        for agent in sorted(agents or ()):
            pipe.zrem(keys.agent(agent.decode()).cancelled, *ids)
        return pipe.execute()

    if agents:
        yield Call(lift, n_operations=len(agents))


def _send_again(keys: Keys, ids: list[str], cancelled: set[str]) -> Plan[list[str]]:
    """Dead tasks back to their queues with fresh attempts (dead_requeue.lua), cancelled
    ones stored again from their records (restore.lua): one call per agent and kind."""
    groups: dict[tuple[str, str], list[str]] = {}
    for task_id in ids:
        kind = "restore" if task_id in cancelled else "dead_requeue"
        groups.setdefault((kind, agent_of(task_id)), []).append(task_id)
    if not groups:
        return []
    calls = [
        (kind, keys.agent(agent).all(), [len(group) if kind == "dead_requeue" else "", *group])
        for (kind, agent), group in groups.items()
    ]
    replies = yield Scripts(calls)
    return [i.decode() for reply in replies for i in reply]
