"""A Handoff with key=: the task it makes is shared by key, in a run of its own.

Why not a child. A handoff's child belongs to its parent's run: the run's scope counts it
open, a Join waits for it, result(follow=True) follows it. A keyed task is shared across
runs by its key: under skip, replace or debounce the handoffs of many runs coalesce into
one task (a skipped handoff makes no task at all, a replaced or debounced one's payload
is overwritten, cancel_running swaps the task out). Counted in one run's scope, such a
task would leave every other run that handed to it, and a run whose handoff was skipped
or swapped, waiting for an end that never comes to it. So a keyed Handoff starts (or
coalesces into) a run of its own: the keyed task is a root, made exactly as
client.enqueue(agent, payload, key=, on_conflict=, debounce_s=, debounce_max_s=) makes
it; the run that handed to it neither waits for it nor follows it, and the handing
task's record links it ({"keyed": [id]}, with "handoff": [ids] beside it when plain
children were handed off too; the run tree shows "handed to keyed ..."). Inngest's
step.sendEvent into a debounced function and Temporal's child workflows with
ParentClosePolicy ABANDON do the same: the sender goes on, the receiver is its own run.

What the keyed task keeps of the Handoff: agent, payload, priority, group (None: the
handing task's, as for any handoff), expires_in_s (its own deadline: the handing run's
run deadline is not its), the handing task's trace span. It has no parent_id: the
handing run's cancel does not reach it (other runs may be waiting on it), and its hops
start again at 0.

Which write first: the worker enqueues it before it acks the task that handed to it,
as it does a child (protocol/waits.enqueue_children, conflict.handed_plan), on the
worker's connection: the key lives in the keyed agent's slot, so it cannot ride in the
ack's script. A crash in between leaves the handing task to be retried, and its keyed
enqueue again changes nothing under skip and rewrites the same payload under replace or
debounce (a debounce's timer starts again).

Runs in: a worker's main thread, and handoff.testing's in-process runner (settle.py).
Pure: no Redis here.
"""

from __future__ import annotations

import os

import orjson

from handoff.config import Settings
from handoff.errors import InvalidPayload
from handoff.protocol import notices as notice
from handoff.protocol.conflict import KeyedTask, check_on_conflict, key_task_id
from handoff.protocol.queue import Completion
from handoff.protocol.task import Task
from handoff.runtime.agents import Handoff, payload_for

OWN_RUN = "a keyed Handoff (key=) runs in a run of its own"


def refused_here(where: str, index: int, what: str) -> str:
    """Why a keyed Handoff cannot be a Join's branch or then, or a Wait's then (one line)."""
    if where == "join branch":
        return f"join branch {index} ({what}): {OWN_RUN}, and a join must wait for its branches"
    if where == "join then":
        return f"join then ({what}): {OWN_RUN}; the then-task continues the join's run"
    return f"{where} ({what}): {OWN_RUN}; the then-task continues the wait's branch"


def has_key_options(handoff: Handoff) -> bool:
    """Whether the Handoff names a key or an on_conflict option (right or wrong)."""
    return (
        handoff.key is not None
        or handoff.on_conflict != "skip"
        or handoff.debounce_s is not None
        or handoff.debounce_max_s is not None
    )


def keyed_task(
    parent: Task, handoff: Handoff, stamp: int, settings: Settings, traceparent: str | None
) -> KeyedTask | str:
    """The task client.enqueue would make of the Handoff's key options, or a one-line
    reason (as enqueue words it) why it cannot be made."""
    mode = handoff.on_conflict
    try:
        check_on_conflict(
            mode, handoff.key, debounce_s=handoff.debounce_s, debounce_max_s=handoff.debounce_max_s
        )
        delay_ms = int(handoff.debounce_s * 1000) if mode == "debounce" else 0  # type: ignore[operator]
        expires_in_s = handoff.expires_in_s
        task = KeyedTask(
            id=key_task_id(handoff.agent, handoff.key),
            agent=handoff.agent,
            payload=payload_for(handoff.agent, handoff.payload),
            priority=handoff.priority,
            created_at=stamp,
            enqueued_at=stamp,
            not_before=stamp + delay_ms if delay_ms else None,
            key=handoff.key,
            expires_at=None if expires_in_s is None else stamp + int(expires_in_s * 1000),
            traceparent=traceparent,
            group=handoff.group if handoff.group is not None else parent.group,
            on_conflict=mode,
            debounce_max_s=handoff.debounce_max_s,
            handed_by=parent.id,
        )
        if mode != "skip":  # its children's ids are its own (conflict.py: the successor rule)
            task.gen = os.urandom(4).hex()
            if mode == "debounce":
                task.burst_at = stamp
        blob = task.to_json()
    except InvalidPayload as e:
        return str(e)
    if len(blob) > settings.max_payload_bytes:
        return f"{len(blob)} bytes, over max_payload_bytes"
    return task


def settle_keyed(
    task: Task,
    made: list[Task],
    keyed: list[KeyedTask],
    limits: tuple[int, int],
    closing: tuple[bytes, ...],
    extras: bytes,
) -> tuple[Completion, None, list[Task]]:
    """A handler that handed to keyed tasks (and maybe to children): its record links
    them; with children its branch goes on in them, without it ends here, as a value's
    would, its result the link."""
    linked = [k.id for k in keyed]
    if made:
        ids = [c.id for c in made]
        result_json = orjson.dumps({"handoff": ids, "keyed": linked})
        step = notice.stepped(task.scope_id, task.run_id, task.id, ids, *limits)
        completion = Completion(task, result_json, len(made), (*closing, step), extras)
        return completion, None, [*keyed, *made]
    result_json = orjson.dumps({"keyed": linked})
    handed: list[Task] = [*keyed]
    if task.run is None:
        return Completion(task, result_json, 0, (notice.ROOT_DONE,), extras), None, handed
    end_json = notice.done_end(task.id, task.agent, task.branch, result_json)
    ending = notice.ended(task.scope_id, task.run, task.id, task.branch, "done", end_json)
    return Completion(task, result_json, 0, (*closing, ending), extras), None, handed
