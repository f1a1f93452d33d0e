"""A repeated key's on_conflict: what an enqueue does when a task already holds its key.

    skip      the task holding the key stays as it is; the enqueue returns its id (the
              default, and what an enqueue with a key always did)
    replace   a task still waiting under the key (queued or delayed) takes the new payload
              and options, keeping its place; a started or finished one is left (skip)
    debounce  as replace, and its due time moves to now + delay_s: a burst of enqueues
              runs once, delay_s after the last
    cancel_running  as replace for a waiting task; a started one is cancelled (its handler
              told, as client.cancel does) and the new task enqueued under the same id

A key's task id is derived from the key (task.derived_task_id), so the task holding it
lives in the agent's slot and the swap is one script (conflict.lua). When nothing holds
the key the enqueue goes as usual; two racing enqueues then dedupe as skip does.

Runs in: producers (Client.enqueue, AsyncClient.enqueue), as a plan (plan.py).
"""

from __future__ import annotations

from handoff.errors import InvalidPayload
from handoff.protocol.cancel import cancel
from handoff.protocol.keys import Keys
from handoff.protocol.plan import Call, Plan, Scripts
from handoff.protocol.rerun import lift_marks
from handoff.protocol.task import Task, now_ms

ON_CONFLICT = ("skip", "replace", "debounce", "cancel_running")


def check_on_conflict(on_conflict: object, key: object) -> str:
    """The mode, or InvalidPayload (one line) for an unknown one or one without a key."""
    if on_conflict not in ON_CONFLICT:
        raise InvalidPayload(f"on_conflict {on_conflict!r:.40}: one of {', '.join(ON_CONFLICT)}")
    if on_conflict != "skip" and key is None:
        raise InvalidPayload(f"on_conflict={on_conflict!r} needs a key (key=...)")
    return on_conflict


def swap(keys: Keys, task: Task, on_conflict: str, max_bytes: int) -> Plan[str]:
    """Give the task waiting under task.id the new task's JSON ('replaced' | 'debounced'),
    or say what holds the key ('absent': enqueue as usual, 'running', 'dead')."""
    delay_ms = max(0, (task.not_before or 0) - now_ms())
    args = [on_conflict, "", max_bytes, task.id, task.to_json(), delay_ms]
    replies = yield Scripts([("conflict", keys.agent(task.agent).all(), args)])
    reply = replies[0]
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def resolve(queue, task: Task, on_conflict: str, max_bytes: int, keep_ms: int) -> Plan[str]:
    """What a non-skip on_conflict did: 'replaced' | 'debounced' (the task returned is the
    one waiting), 'absent' (the caller enqueues the task as usual), 'running' | 'dead'
    (left as they are). cancel_running cancels a started task first (its handler is
    told), lifts its cancel marks and forgets its cancelled record: then 'absent'."""
    mode = "replace" if on_conflict == "cancel_running" else on_conflict
    found = yield from swap(queue.keys, task, mode, max_bytes)
    if found != "running" or on_conflict != "cancel_running":
        return found
    yield from cancel(queue, task.id, run=False, keep_ms=keep_ms)
    yield from lift_marks(queue.keys, [task.id])
    agent_keys = queue.keys.agent(task.agent)

    def forget(client):
        pipe = client.pipeline(transaction=False)
        pipe.delete(agent_keys.result(task.id))
        pipe.zrem(agent_keys.finished, task.id)
        return pipe.execute()  # (an awaitable on an asyncio client)

    yield Call(forget, n_operations=2)
    return "absent"
