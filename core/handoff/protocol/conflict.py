"""A repeated key's on_conflict: what an enqueue does when a task already holds its key.

    skip      the task holding the key stays as it is; the enqueue returns its id (the
              default, and what an enqueue with a key always did)
    replace   a task still waiting under the key (queued or delayed) takes the new payload
              and options, keeping its place; a started one runs on, and the new task runs
              after it has ended (its successor: one at a time per key)
    debounce  (debounce_s, debounce_max_s) the task starts debounce_s after the last
              enqueue with the key, with the last payload, and no later than
              debounce_max_s after the first enqueue of that burst; a started one runs on,
              and the new task is its successor, debounced from when it takes the key
    cancel_running  as replace for a waiting task; a started one is cancelled (its handler
              told at once, as client.cancel does) and the new task is its successor: it
              starts once the old handler has ended, and result(id) answers with its result

The successor rule. A key's task id is derived from the key (task.derived_task_id), so
the key's tasks run one after the other under one id, in the agent's slot. While the task
holding the key is leased, the new task waits as its successor (<base>:successors, id ->
JSON; a later enqueue takes its place: the last payload wins). When the leased task ends
for good (done, dead-lettered, cancelled, expired) the successor takes the id in the same
script: the old end is cleared (its record, end notices, dedupe refusal, dead letter,
steps and messages), so result(id) waits for the new task, and it is queued (delayed by
its own delay, or debounce_s, counted from then). A lease lost or reaped is no end: the
successor waits on. cancel_running's old task ends cancelled once its worker lets go of it
(its handler ended, or never started) or its lease runs out: so two tasks of one key never
run at once. client.cancel(id) drops a waiting successor with the task (the key's work is
cancelled). A successor waits at most as long as records live (result_ttl_s, run_ttl_s).

A finished task no longer holds its key for these modes: an enqueue after it clears its
old end and runs. When nothing holds the key the enqueue goes as usual; should another
enqueue store the key's task in between, this one goes through on_conflict again.

A successor's handoffs get ids of their own: every task enqueued with a non-skip
on_conflict carries a generation ("gen") its children's ids are derived with (task.py).

A handler's Handoff(agent, payload, key=K, on_conflict=...) makes the same task a producer
would (a KeyedTask: a root of its own run, see runtime/keyed.py); its worker enqueues it
with handed_plan before it acks the task that handed off.

Runs in: producers (Client.enqueue, AsyncClient.enqueue, `handoff enqueue`), workers (a
keyed Handoff), as a plan (plan.py); the Lua is conflict.lua and lua/lib/successors.lua.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from handoff.config.checks import check_range
from handoff.errors import InvalidPayload
from handoff.protocol.plan import Plan, Scripts
from handoff.protocol.rerun import lift_marks
from handoff.protocol.task import Task, derived_task_id, score_for

ON_CONFLICT = ("skip", "replace", "debounce", "cancel_running")
MAX_DEBOUNCE_S = 366 * 86_400.0
MIN_SUCCESSOR_KEEP_MS = 60_000  # a successor waits at least this long (records kept 0 s)
ATTEMPTS = 3  # enqueues racing for an absent key: each goes through on_conflict again


def key_task_id(agent: str, key: object) -> str:
    """The id every task of `key` shares, or InvalidPayload (one line) for a bad key."""
    if not isinstance(key, str) or not 0 < len(key) <= 256:
        raise InvalidPayload("key: must be a string of 1 to 256 characters")
    return derived_task_id(agent, "key", key)


@dataclass(slots=True)
class KeyedTask(Task):
    """A task a handler handed to by key (Handoff(key=...)): a root (run None), stored as
    Client.enqueue would store it, with what that enqueue takes beside the task."""

    on_conflict: str = "skip"
    debounce_max_s: float | None = None
    handed_by: str = ""  # the task that handed it off (not stored: many may share it)


def handed_plan(
    queue: Any, tasks: Sequence[KeyedTask], *, now_ms: int | None = None
) -> Plan[list[str]]:
    """Enqueue keyed tasks as Client.enqueue would: the skips in one round trip (a key
    already held is left as it is), each other mode through enqueue_keyed. Run again (a
    parent retried after a crash before its ack) it changes nothing under skip, and under
    replace or debounce gives the key's task its payload again."""
    skips = [t for t in tasks if t.on_conflict == "skip"]
    if skips:
        yield from queue.enqueue_plan(skips, now_ms=now_ms)
    settings = queue.settings
    limit = settings.max_payload_bytes
    keep_ms = int(max(settings.result_ttl_s, settings.run_ttl_s) * 1000)  # as Client's
    for task in tasks:
        if task.on_conflict != "skip":
            yield from enqueue_keyed(
                queue, task, task.on_conflict,
                debounce_max_s=task.debounce_max_s, max_bytes=limit, keep_ms=keep_ms,
            )  # fmt: skip
    return [task.id for task in tasks]


def check_on_conflict(
    on_conflict: object,
    key: object,
    *,
    delay_s: object = 0,
    debounce_s: object = None,
    debounce_max_s: object = None,
) -> str:
    """The mode, or InvalidPayload (one line) for an unknown one, one without a key, or
    debounce options that do not go with it."""
    if on_conflict not in ON_CONFLICT:
        raise InvalidPayload(f"on_conflict {on_conflict!r:.40}: one of {', '.join(ON_CONFLICT)}")
    if on_conflict != "skip" and key is None:
        raise InvalidPayload(f"on_conflict={on_conflict!r} needs a key (key=...)")
    if on_conflict != "debounce":
        for name, value in (("debounce_s", debounce_s), ("debounce_max_s", debounce_max_s)):
            if value is not None:
                raise InvalidPayload(f"{name} applies only with on_conflict='debounce'")
        return on_conflict
    if debounce_s is None:
        raise InvalidPayload("on_conflict='debounce' needs debounce_s (seconds, > 0)")
    check_range("debounce_s", debounce_s, 0.001, MAX_DEBOUNCE_S, error=InvalidPayload)
    if debounce_max_s is not None:
        check_range("debounce_max_s", debounce_max_s, 0.001, MAX_DEBOUNCE_S, error=InvalidPayload)
        if debounce_max_s < debounce_s:  # type: ignore[operator]
            raise InvalidPayload(
                f"debounce_max_s {debounce_max_s:g} is less than debounce_s {debounce_s:g}"
            )
    if delay_s:
        raise InvalidPayload("delay_s does not go with on_conflict='debounce': use debounce_s")
    return on_conflict


def enqueue_keyed(
    queue: Any,
    task: Task,
    on_conflict: str,
    *,
    debounce_max_s: float | None,
    max_bytes: int,
    keep_ms: int,
) -> Plan[str]:
    """Client.enqueue with a non-skip on_conflict: the swap (conflict.lua); when nothing
    holds the key, the enqueue as usual. Returns the key's task id."""
    delay_ms = max(0, (task.not_before or 0) - task.enqueued_at)
    max_ms = int(debounce_max_s * 1000) if debounce_max_s else 0
    for _ in range(ATTEMPTS):
        found = yield from swap(queue, task, on_conflict, delay_ms, max_ms, max_bytes, keep_ms)
        if found != "absent":
            break
        (added,) = yield from queue.enqueue_plan([task])
        if added:
            break
    return task.id


def swap(
    queue: Any,
    task: Task,
    on_conflict: str,
    delay_ms: int,
    max_ms: int,
    max_bytes: int,
    keep_ms: int,
) -> Plan[str]:
    """conflict.lua: 'replaced' | 'debounced' (the task waiting took the new JSON), 'after'
    | 'cancelling' (the new task is the started one's successor), 'dead' (left), 'absent'
    (the caller enqueues; a cancelled old task's marks are lifted first)."""
    keep_ms = max(MIN_SUCCESSOR_KEEP_MS, keep_ms)
    score = score_for(task.priority, task.enqueued_at)
    args = [on_conflict, "", max_bytes, task.id, task.to_json(), delay_ms, max_ms, score, keep_ms]
    replies = yield Scripts([("conflict", queue.keys.agent(task.agent).all(), args)])
    reply = replies[0]
    found = reply.decode() if isinstance(reply, bytes) else str(reply)
    if found == "absent marked":  # cancelled before: its marks must not cancel the new one
        yield from lift_marks(queue.keys, [task.id])
        return "absent"
    return found
