"""Reading runs and results: where a task or a run stands (task_reads.result_plan, with
or without follow), waiting for their end notices, and a run's tree (its nodes' status
from task_status.py, as Client.status has it). Each is a plan
(plan.py): TaskQueue.run performs it blocking, AsyncTaskQueue.run awaiting it.

Runs in: producers and operators (client, `handoff inspect tree`). Reads only, but for
the waiter flag the follow script sets. See notices.py for how runs are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from handoff.errors import InvalidPayload
from handoff.protocol.ends import decode_ends
from handoff.protocol.keys import AgentKeys, Keys
from handoff.protocol.plan import Call, Plan, Scripts
from handoff.protocol.task import agent_of
from handoff.protocol.task_status import task_status

TREE_LEVEL_CHUNK = 500  # tasks read per pipeline while walking a tree


@dataclass
class RunState:
    """What the follow script said: kind is ended | single | dead | wait | unknown."""

    kind: str
    ends: list[dict] = field(default_factory=list)  # ended: in the order they arrived
    dropped: int = 0  # ends over max_ends_per_branch, not kept
    record: dict | None = None  # single (done): the root's (the task's) record
    reason: str = ""  # dead: why the root was dead-lettered


def run_state(keys: Keys, root: str, waiter_ttl_ms: int) -> Plan[RunState]:
    """One call of the follow script: the run's ends, or a waiter flag set if it is open
    (kind ended | single | dead | wait | unknown)."""
    return _state(keys, "follow", root, waiter_ttl_ms)


def task_state(keys: Keys, task_id: str, waiter_ttl_ms: int) -> Plan[RunState]:
    """One call of the await script: the task's record or dead letter, or a waiter flag
    set if it has not ended (kind done | dead | wait | unknown)."""
    return _state(keys, "await", task_id, waiter_ttl_ms)


def _state(keys: Keys, script: str, task_id: str, waiter_ttl_ms: int) -> Plan[RunState]:
    agent_keys = keys.agent(agent_of(task_id))
    replies = yield Scripts([(script, agent_keys.all(), [task_id, waiter_ttl_ms])])
    reply = replies[0]
    kind = reply[0].decode()
    if kind == "ended":
        return RunState(kind, ends=decode_ends(reply[2]), dropped=int(reply[1]))
    if kind in ("single", "done"):
        return RunState(kind, record=orjson.loads(reply[1]))
    if kind == "dead":
        return RunState(kind, reason=str(orjson.loads(reply[1]).get("reason", "")))
    return RunState(kind)


def wait_done(keys: Keys, task_id: str, timeout_s: float) -> Plan[None]:
    """Block (no polling) until the task's end notice, or timeout_s."""
    yield _block_on(keys.agent(agent_of(task_id)).done(task_id), timeout_s)


def wait_ended(keys: Keys, root: str, timeout_s: float) -> Plan[None]:
    """Block (no polling) until the run's end notice, or timeout_s."""
    yield _block_on(keys.agent(agent_of(root)).ended(root), timeout_s)


def _block_on(notice_list: str, timeout_s: float) -> Call:
    """BLMOVE of the list onto itself: every waiter sees the token, and it stays for late
    ones (the list expires on its own)."""
    return Call(
        lambda c: c.blmove(notice_list, notice_list, timeout_s, src="RIGHT", dest="LEFT"),
        blocking=True,
    )


def run_of(keys: Keys, task_id: str) -> Plan[str]:
    """The root of the run task_id belongs to (its own id for a root, or when unknown)."""
    agent_keys = keys.agent(agent_of(task_id))

    def read(client) -> Any:
        pipe = client.pipeline(transaction=False)
        pipe.hget(agent_keys.tasks, task_id)
        pipe.get(agent_keys.result(task_id))
        return pipe.execute()

    for raw in (yield Call(read)):
        if raw is None:
            continue
        try:
            run = orjson.loads(raw).get("run")
        except (orjson.JSONDecodeError, AttributeError):
            continue
        if isinstance(run, str):
            return run
    return task_id


# -- the tree ---------------------------------------------------------------------------


def tree_plan(keys: Keys, run_id: str, result_bytes: int) -> Plan[dict[str, Any]]:
    """Client.tree: the run's tree (read_tree), an unknown run a one-line InvalidPayload."""
    agent_of(run_id)
    tree = yield from read_tree(keys, run_id, result_bytes)
    if tree is None:
        raise InvalidPayload(f"run {run_id} is unknown (never enqueued, or its tree expired)")
    return tree


def read_tree(keys: Keys, run_id: str, result_bytes: int = 200) -> Plan[dict[str, Any] | None]:
    """The run as nested dicts (children, and a join's then), or None if nothing of it
    is known: finished tasks from their records, live ones from the queue's state. A
    join's children carry their branch index and a label (their payload in short)."""
    root = (yield from _read_nodes(keys, [run_id], result_bytes))[0]
    if root["status"] == "unknown":
        return None
    level = [root]
    while level:
        # (node, "children" | "then", id, a join branch's index and label, or None)
        pending: list[tuple[dict, str, str, tuple | None]] = []
        for node in level:
            labels = node.pop("_labels", None)
            for i, child in enumerate(node.pop("_children", [])):
                branch = None if labels is None else (i, labels[i] if i < len(labels) else "")
                pending.append((node, "children", child, branch))
            if node.get("_then"):
                pending.append((node, "then", node.pop("_then"), None))
        level = []
        for start in range(0, len(pending), TREE_LEVEL_CHUNK):
            chunk = pending[start : start + TREE_LEVEL_CHUNK]
            ids = [task_id for _, _, task_id, _ in chunk]
            nodes = yield from _read_nodes(keys, ids, result_bytes)
            for (parent, slot, _, branch), node in zip(chunk, nodes, strict=True):
                if slot == "then":
                    if node["status"] == "unknown":
                        node["status"] = "waiting"  # its join has not fired yet
                    parent["then"] = node
                else:
                    if branch is not None:  # a join's branch: its index, its payload in short
                        node["branch"], node["label"] = branch
                    parent["children"].append(node)
                level.append(node)
    return root


_READS_PER_TASK = 9


def _read_nodes(keys: Keys, ids: list[str], result_bytes: int) -> Plan[list[dict[str, Any]]]:
    all_keys = [keys.agent(agent_of(task_id)) for task_id in ids]

    def read(client) -> Any:
        pipe = client.pipeline(transaction=False)
        for task_id, agent_keys in zip(ids, all_keys, strict=True):
            pipe.get(agent_keys.result(task_id))
            pipe.hget(agent_keys.tasks, task_id)
            pipe.zscore(agent_keys.dead, task_id)
            pipe.hget(agent_keys.dead_reasons, task_id)
            pipe.zscore(agent_keys.leases, task_id)
            pipe.zscore(agent_keys.delayed, task_id)
            pipe.zscore(agent_keys.queue, task_id)
            pipe.hget(agent_keys.deliveries, task_id)
            pipe.hget(agent_keys.failures, task_id)
        return pipe.execute()

    replies = yield Call(read, n_operations=len(ids) * _READS_PER_TASK)
    nodes = []
    for i, (task_id, agent_keys) in enumerate(zip(ids, all_keys, strict=True)):
        parts = replies[i * _READS_PER_TASK : (i + 1) * _READS_PER_TASK]
        nodes.append(_node(task_id, agent_keys, parts, result_bytes))
    return nodes


def _node(task_id: str, keys: AgentKeys, parts: list, result_bytes: int) -> dict[str, Any]:
    record, stored, dead, reason, leased, delayed, queued, deliveries, failures = parts
    task = _stored_task(stored) if record is None else {}
    grouped = isinstance(task, dict) and task.get("group") is not None
    status = task_status(
        record,
        dead=dead is not None,
        running=leased is not None,
        delayed=delayed is not None,
        queued=queued is not None or grouped,  # (a grouped task waits in its group's set)
        waiting=isinstance(task, dict) and "wait" in task and "woke" not in task,
    )
    node: dict[str, Any] = {"id": task_id, "agent": keys.agent, "status": status}
    node["children"] = []
    if record is not None:
        return _finished_node(node, orjson.loads(record), result_bytes)
    node["enqueued_at"] = task.get("enqueued_at") if isinstance(task, dict) else None
    node["attempt"] = int(failures or 0) + 1
    node["deliveries"] = int(deliveries or 0)
    if dead is not None:
        why = orjson.loads(reason) if reason else {}
        node.update(finished_at=int(dead), attempt=int(failures or 0))
        node["reason"] = str(why.get("reason", ""))[:result_bytes]
    elif status == "unknown" and stored is None:
        node.pop("enqueued_at", None)
        node.pop("attempt", None)
        node.pop("deliveries", None)
    return node


def _stored_task(stored: bytes | None) -> Any:
    """The stored task (its payload, run, group), {} when gone or corrupt."""
    if stored is None:
        return {}
    try:
        return orjson.loads(stored)
    except orjson.JSONDecodeError:
        return {}


def _finished_node(node: dict[str, Any], data: dict, result_bytes: int) -> dict[str, Any]:
    """A finished task's node, from its record: times, and its handoffs or join to walk
    next (the private _children, _labels, _then), else its (shortened) result."""
    finished = data.get("finished_at")
    ran_ms = data.get("ran_ms")
    node["attempt"] = data.get("attempt")
    node["finished_at"] = finished
    node.update(enqueued_at=data.get("enqueued_at"), ran_ms=ran_ms)
    if "steps" in data:  # [[name, "ran" | "reused", ms], ...] (task.step)
        node["steps"] = data["steps"]
    if isinstance(finished, int) and isinstance(ran_ms, int | float):
        node["started_at"] = int(finished - ran_ms)
    result = data.get("result")
    if isinstance(result, dict) and "keyed" in result and set(result) <= {"handoff", "keyed"}:
        # handed to keyed tasks (runtime/keyed.py): roots of runs of their own, linked here
        node["handed_to"] = list(result["keyed"])
        node["_children"] = list(result.get("handoff", []))
    elif isinstance(result, dict) and set(result) == {"handoff"}:
        node["_children"] = list(result["handoff"])
    elif isinstance(result, dict) and set(result) == {"wait"}:  # (runtime/waits.py)
        node["_children"] = [result["wait"].get("then")]
        node["wait"] = result["wait"].get("event")
    elif isinstance(result, dict) and set(result) == {"join"}:
        node["_children"] = list(result["join"].get("branches", []))
        node["_labels"] = list(result["join"].get("labels") or [])
        node["_then"] = result["join"].get("then")
        node["join"] = True
    elif node["status"] == "expired":
        node["reason"] = "not started by its deadline"
    else:
        node["result"] = _shortened(result, result_bytes)
    return node


def _shortened(value: Any, limit: int) -> Any:
    """The value itself when its JSON fits the limit, else the JSON text cut to it."""
    text = orjson.dumps(value)
    if len(text) <= limit:
        return value
    return text[:limit].decode(errors="ignore") + "..."
