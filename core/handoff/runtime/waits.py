"""Wait: what a handler returns to stop its branch until an event is signalled.

Runs in: a worker's main thread (settling a handler's outcome), and handoff.testing's
in-process runner. Pure: the then-task is built here; protocol/waits.py parks it.

A Wait settles like a handoff of one child, its then-task: the task that returned it is
done (its record says {"wait": {"event", "then"}}), the then-task takes its place in the
run (the same step notice a handoff sends), and it waits in its agent's slot, holding no
process, slot or lease, until the event is signalled or its timeout passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from handoff.errors import InvalidPayload
from handoff.protocol import notices as notice
from handoff.protocol.queue import Completion, Failure
from handoff.protocol.task import Task, now_ms
from handoff.protocol.waits import ON_TIMEOUT, check_event, check_timeout, wait_record
from handoff.runtime.agents import Handoff


@dataclass(frozen=True)
class Wait:
    """Returned by a handler: run `then` once `event` is signalled (client.signal), with
    task.event = the signal's data; or, when timeout_s passes first, dead-letter it
    (on_timeout="fail") or run it with task.timed_out True ("continue")."""

    event: str
    then: Handoff
    timeout_s: float | None = None
    on_timeout: str = "fail"


def wait_problem(wait: Wait) -> str:
    """Why a Wait cannot start (one line), or ""."""
    if not isinstance(wait.then, Handoff):
        return f"wait then must be a Handoff, not {type(wait.then).__name__}"
    if wait.on_timeout not in ON_TIMEOUT:
        return f"wait on_timeout {wait.on_timeout!r:.40} is not one of {', '.join(ON_TIMEOUT)}"
    try:
        check_event(wait.event)
        check_timeout(wait.timeout_s)
    except InvalidPayload as e:
        return str(e)
    return ""


def settle_wait(
    task: Task,
    wait: Wait,
    made: list[Task] | Failure,
    limits: tuple[int, int],
    closing: tuple[bytes, ...],
    extras: bytes,
) -> tuple[Completion | None, Failure | None, list[Task]]:
    """(completion, failure, [then-task]) for a handler that returned a Wait. made: its
    then-task as settle.children_of made it (checked as a handoff is); limits and closing:
    what settle gives every step notice."""
    problem = wait_problem(wait)
    if problem:
        return None, Failure(task, problem, dead_now=True), []
    if isinstance(made, Failure):
        return None, made, []
    then = made[0]
    then.id = task.child_id(then.agent, "wait")  # not a handoff's id: its own
    then.wait = wait_record(wait.event, wait.on_timeout, wait.timeout_s, now_ms())
    result: Any = {"wait": {"event": wait.event, "then": then.id}}
    step = notice.stepped(task.scope_id, task.run_id, task.id, [then.id], *limits)
    completion = Completion(task, orjson.dumps(result), 1, (*closing, step), extras)
    return completion, None, [then]
