"""What a page reads beyond the monitor's snapshot: an agent's queue head, delayed tasks
and dead letters; the parked waits; a task; a run's tree.

Runs in: the dashboard, in a worker thread of the web server (redis-py blocks). Each read
is bounded (LIST_LIMIT entries) and pipelined: an agent's page is two round trips, a task
two, a tree one per level. The hub calls these once per tick per watched page, never once
per viewer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import orjson

from handoff.config import Settings
from handoff.protocol.cancel import CancelReport
from handoff.protocol.inspect import enqueued_ms_from_score
from handoff.protocol.queue import TaskQueue
from handoff.protocol.rerun import RerunReport
from handoff.protocol.runs import run_of
from handoff.protocol.task import PRIORITY_SHIFT, agent_of
from handoff.protocol.task_reads import task_info

LIST_LIMIT = 50  # entries per list on an agent's page (the head, delayed, dead)
WAIT_LIST_LIMIT = 100  # parked waits per agent on the waiting page, the oldest first
EVENTS_SHOWN = 30  # a run's latest events on its page


class Operations(Protocol):
    """What the dashboard asks of a handoff Client. The monitor command hands one over:
    observation sits below the client layer, so it is given a client, never imports one."""

    settings: Settings

    @property
    def queue(self) -> TaskQueue: ...

    def tree(self, run_id: str) -> dict[str, Any]: ...

    def cancel(self, task_id: str, *, run: bool = False) -> CancelReport: ...

    def rerun(self, run_id: str) -> RerunReport: ...

    def dead_requeue(self, agent: str, ids: Sequence[str] = (), limit: int = 1000) -> list[str]: ...

    def dead_purge(self, agent: str, ids: Sequence[str] = (), limit: int = 1000) -> int: ...

    def signal(self, event: str, data: Any = None) -> int: ...


def run_events(queue: TaskQueue, root: str, limit: int = EVENTS_SHOWN) -> list[dict]:
    """A run's latest events (task.progress, task.emit), oldest first: one command."""
    key = queue.keys.agent(agent_of(root)).stream(root)
    entries = queue.manager.execute(lambda c: c.xrevrange(key, count=limit))
    events = []
    for entry_id, fields in reversed(entries):
        kind = fields.get(b"kind", b"").decode(errors="replace")
        if kind == "end":
            continue
        data, _ = _loads(fields.get(b"data"))
        events.append({
            "at_ms": int(entry_id.split(b"-")[0]),
            "task": fields.get(b"task", b"").decode(errors="replace"),
            "agent": fields.get(b"agent", b"").decode(errors="replace"),
            "kind": kind,
            "delivery": fields.get(b"delivery", b"1").decode(errors="replace"),
            "data": orjson.dumps(data).decode()[:300],
        })  # fmt: skip
    return events


def _loads(raw: bytes | None) -> tuple[Any, bool]:
    """(value, corrupt): a stored JSON value, or its text when it does not parse."""
    if raw is None:
        return None, False
    try:
        return orjson.loads(raw), False
    except orjson.JSONDecodeError:
        return raw.decode(errors="replace"), True


def agent_lists(queue: TaskQueue, agent: str, limit: int = LIST_LIMIT) -> dict[str, list[dict]]:
    """The queue's head (next to run first), the delayed tasks (soonest first) and the
    dead letters (newest first), each with its payload; dead ones with reason and
    traceback. Two round trips, whatever the queue's length."""
    keys = queue.keys.agent(agent)

    def ranges(client) -> list:
        pipe = client.pipeline(transaction=False)
        pipe.zrange(keys.queue, 0, limit - 1, withscores=True)
        pipe.zrange(keys.delayed, 0, limit - 1, withscores=True)
        pipe.zrevrange(keys.dead, 0, limit - 1, withscores=True)
        pipe.zrange(keys.groups, 0, limit - 1)
        return pipe.execute()

    head, delayed, dead, groups = queue.manager.execute(ranges)
    if groups:  # grouped tasks wait in their groups' sets: each group's next, in turn order
        head = (head + _group_heads(queue, keys, groups))[:limit]
    ids = [member for member, _ in (*head, *delayed, *dead)]
    dead_ids = [member for member, _ in dead]

    def details(client) -> list:
        pipe = client.pipeline(transaction=False)
        pipe.hmget(keys.tasks, ids)
        if dead_ids:
            pipe.hmget(keys.dead_reasons, dead_ids)
        return pipe.execute()

    stored, *why = queue.manager.execute(details) if ids else ([],)
    records = dict(zip(ids, stored, strict=True))
    reasons = dict(zip(dead_ids, why[0] if why else [], strict=True))
    return {
        "head": [
            _entry(m, records[m], enqueued_at=enqueued_ms_from_score(s),
                   priority=int(s) // PRIORITY_SHIFT)
            for m, s in head
        ],
        "delayed": [_entry(m, records[m], due_at=int(s)) for m, s in delayed],
        "dead": [_dead_entry(m, records[m], reasons[m], int(s)) for m, s in dead],
    }  # fmt: skip


def waiting_lists(
    queue: TaskQueue, agents: Sequence[str], limit: int = WAIT_LIST_LIMIT
) -> dict[str, list[dict[str, Any]]]:
    """Per agent, its oldest parked waits (the head of <base>:waiting_since: no scan of
    the waits): task, run, event, since, when it times out. Two round trips, at most
    `limit` waits an agent however many are parked."""
    if not agents:
        return {}

    def heads(client) -> list:
        pipe = client.pipeline(transaction=False)
        for agent in agents:
            pipe.zrange(queue.keys.agent(agent).waiting_since, 0, limit - 1, withscores=True)
        return pipe.execute()

    listed = queue.manager.execute_pipelined(heads, len(agents))
    wanted = [(agent, entries) for agent, entries in zip(agents, listed, strict=True) if entries]

    def details(client) -> list:
        pipe = client.pipeline(transaction=False)
        for agent, entries in wanted:
            ids = [member for member, _ in entries]
            pipe.hmget(queue.keys.agent(agent).tasks, ids)
            pipe.zmscore(queue.keys.agent(agent).waiting, ids)
        return pipe.execute()

    got = queue.manager.execute_pipelined(details, 2 * len(wanted)) if wanted else []
    out: dict[str, list[dict[str, Any]]] = {}
    for k, (agent, entries) in enumerate(wanted):
        records, dues = got[2 * k], got[2 * k + 1]
        out[agent] = [
            _wait_entry(member, int(since), record, due)
            for (member, since), record, due in zip(entries, records, dues, strict=True)
        ]
    return out


def _wait_entry(member: bytes, since: int, record: bytes | None, due: float | None) -> dict:
    """One parked wait: what its then-task's "wait" says, and when it leaves the set
    unsignalled (its timeout or its run's deadline, the earlier; None: never)."""
    entry = _entry(member, record, since=since)
    task, _ = _loads(record)
    wait = task.get("wait") if isinstance(task, dict) else None
    wait = wait if isinstance(wait, dict) else {}
    entry["event"] = str(wait.get("event", ""))
    entry["on_timeout"] = str(wait.get("on_timeout", ""))
    entry["timeout_at"] = wait.get("timeout_at") or None
    entry["due_at"] = int(due) if due is not None and due != float("inf") else None
    entry["run"] = entry.get("run") or entry["id"]
    return entry


def _group_heads(queue: TaskQueue, keys, groups: list[bytes]) -> list[tuple[bytes, float]]:
    """The next task of each of these groups (the rotation's order): one round trip."""

    def heads(client) -> list:
        pipe = client.pipeline(transaction=False)
        for group in groups:
            pipe.zrange(keys.group_queue(group.decode()), 0, 0, withscores=True)
        return pipe.execute()

    return [first[0] for first in queue.manager.execute(heads) if first]


def _entry(member: bytes, record: bytes | None, **fields: Any) -> dict[str, Any]:
    task, corrupt = _loads(record)
    entry: dict[str, Any] = {"id": member.decode(errors="replace"), **fields}
    if isinstance(task, dict):
        entry["payload"] = task.get("payload")
        entry["run"] = task.get("run")
    else:  # gone meanwhile (None), or not a task record
        entry["payload"] = task
    entry["corrupt"] = corrupt
    return entry


def _dead_entry(member: bytes, record: bytes | None, reason: bytes | None, at_ms: int) -> dict:
    entry = _entry(member, record, dead_at=at_ms)
    why, _ = _loads(reason)
    if not isinstance(why, dict):
        why = {"reason": why or ""}
    entry["reason"] = str(why.get("reason", ""))
    entry["traceback"] = str(why.get("traceback") or "")
    entry["attempt"] = why.get("attempt")
    return entry


def task_view(ops: Operations, task_id: str) -> dict[str, Any]:
    """Everything known about one task (the protocol's task_info, as Client.task), and
    the run it belongs to."""
    info = ops.queue.run(task_info(ops.queue.keys, task_id))
    task = info.get("task")
    run = task.get("run") if isinstance(task, dict) else None
    info["run"] = run if isinstance(run, str) else None
    return info


def root_of(ops: Operations, task_id: str) -> str:
    """The root of the run task_id belongs to (its own id for a root or an unknown id)."""
    return ops.queue.run(run_of(ops.queue.keys, task_id))
