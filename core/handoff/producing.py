"""Building tasks for enqueue: every field validated, ids made, before anything is sent.

Runs in: producers (Client, AsyncClient). At the client layer, not in protocol/: a task's
payload is checked against its agent's declared type (runtime.agents) and carries the
caller's trace (runtime.tracing), both above the protocol layer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from handoff.config.checks import check_range
from handoff.errors import InvalidPayload, TaskRejected
from handoff.protocol.conflict import check_on_conflict, key_task_id
from handoff.protocol.groups import check_group
from handoff.protocol.keys import check_agent
from handoff.protocol.plan import Plan
from handoff.protocol.queue import QueueBase
from handoff.protocol.task import Task, check_priority, derived_task_id, new_task_id, now_ms
from handoff.runtime import tracing
from handoff.runtime.agents import payload_for, registered
from handoff.runtime.payload_types import JSON_TYPES

MAX_DELAY_S = 366 * 86_400.0


def build_task(
    agent: str,
    payload: Any,
    *,
    priority: int = 0,
    delay_s: float = 0,
    key: str | None = None,
    max_attempts: int | None = None,
    timeout_s: float | None = None,
    at_ms: int | None = None,
    expires_in_s: float | None = None,
    run_deadline_s: float | None = None,
) -> Task:
    """Validate one task's fields and build it (no Redis)."""
    check_agent(agent)
    check_priority(priority)
    delay_ms = check_delay_ms(delay_s)
    if max_attempts is not None:
        check_number("max_attempts", max_attempts, 1, 1000, integer=True)
    if timeout_s is not None:
        check_number("timeout_s", timeout_s, 0.001, 86_400 * 7)
    stamp = now_ms() if at_ms is None else at_ms
    task_id = key_task_id(agent, key) if key is not None else new_task_id(agent, stamp)
    expires_at, run_deadline_at = deadlines_at(stamp, expires_in_s, run_deadline_s)
    return Task(
        id=task_id,
        agent=agent,
        payload=payload_for(agent, payload),
        priority=priority,
        max_attempts=max_attempts,
        timeout_s=timeout_s,
        created_at=stamp,
        enqueued_at=stamp,
        not_before=stamp + delay_ms if delay_ms > 0 else None,
        key=key,
        expires_at=expires_at,
        run_deadline_at=run_deadline_at,
    )


def deadlines_at(
    stamp: int, expires_in_s: float | None, run_deadline_s: float | None
) -> tuple[int | None, int | None]:
    """(expires_at, run_deadline_at) in ms: a task's own deadline is its run's too, at most."""
    expires_at = run_deadline_at = None
    if expires_in_s is not None:
        check_number("expires_in_s", expires_in_s, 0.001, MAX_DELAY_S)
        expires_at = stamp + int(expires_in_s * 1000)
    if run_deadline_s is not None:
        check_number("run_deadline_s", run_deadline_s, 0.001, MAX_DELAY_S)
        run_deadline_at = stamp + int(run_deadline_s * 1000)
        expires_at = run_deadline_at if expires_at is None else min(expires_at, run_deadline_at)
    return expires_at, run_deadline_at


def check_number(name: str, value: object, low: float, high: float, integer=False) -> None:
    """A number in range, or an InvalidPayload naming the field."""
    check_range(name, value, low, high, integer=integer, error=InvalidPayload)


def check_delay_ms(delay_s: object) -> int:
    """delay_s as whole milliseconds; rejects negatives, NaN, infinities and > a year."""
    check_number("delay_s", delay_s, 0, MAX_DELAY_S)
    return int(delay_s * 1000)  # type: ignore[operator]


def one_task(
    agent: str,
    payload: Any,
    *,
    group: str | None = None,
    on_conflict: str = "skip",
    debounce_s: float | None = None,
    debounce_max_s: float | None = None,
    **options: Any,
) -> Task:
    """Client.enqueue's task: validated (build_task), in the caller's trace, in its group;
    with a non-skip on_conflict, its generation (and a debounce's delay and burst start)."""
    if on_conflict != "skip" or debounce_s is not None or debounce_max_s is not None:
        check_on_conflict(
            on_conflict, options.get("key"), delay_s=options.get("delay_s", 0),
            debounce_s=debounce_s, debounce_max_s=debounce_max_s,
        )  # fmt: skip
        if on_conflict == "debounce":
            options["delay_s"] = debounce_s
    task = build_task(agent, payload, **options)
    task.traceparent = tracing.current_traceparent(agent)  # the run's parent span, if any
    if group is not None:
        task.group = check_group(group)
    if on_conflict != "skip":  # a key's tasks share one id: its children's ids are its own
        task.gen = os.urandom(4).hex()
        if on_conflict == "debounce":
            task.burst_at = task.enqueued_at
    return task


def many_tasks(
    agent: str,
    payloads: Iterable[Any],
    *,
    priority: int,
    delay_s: float,
    keys: Sequence[str] | None,
    expires_in_s: float | None,
    run_deadline_s: float | None,
    group: str | None,
) -> list[Task]:
    """Client.enqueue_many's tasks, every one validated before any is sent."""
    check_agent(agent)
    check_priority(priority)
    delay_ms = check_delay_ms(delay_s)
    payloads = list(payloads)
    if keys is not None and len(keys) != len(payloads):
        raise InvalidPayload(f"keys: {len(keys)} given for {len(payloads)} payloads")
    stamp = now_ms()
    not_before = stamp + delay_ms if delay_ms > 0 else None
    expires_at, run_deadline_at = deadlines_at(stamp, expires_in_s, run_deadline_s)
    tasks = []
    append = tasks.append
    traceparent = tracing.current_traceparent(agent)  # the runs' parent span, if any
    if group is not None:
        check_group(group)
    spec = registered(agent)
    typed = spec is not None and spec.payload_type is not None
    for index, payload in enumerate(payloads):
        if typed or type(payload) not in JSON_TYPES:  # a model, or a declared type
            try:
                payload = payload_for(agent, payload)
            except InvalidPayload as e:
                raise TaskRejected(index, str(e), f"payloads[{index}]") from None
        key = None if keys is None else keys[index]
        if key is None:
            task_id = new_task_id(agent, stamp)
        elif isinstance(key, str) and 0 < len(key) <= 256:
            task_id = derived_task_id(agent, "key", key)
        else:
            raise TaskRejected(index, "must be a string of 1 to 256 characters", f"keys[{index}]")
        append(
            Task(
                id=task_id,
                agent=agent,
                payload=payload,
                priority=priority,
                created_at=stamp,
                enqueued_at=stamp,
                not_before=not_before,
                key=key,
                expires_at=expires_at,
                run_deadline_at=run_deadline_at,
                traceparent=traceparent,
                group=group,
            )
        )
    return tasks


def enqueue_many_plan(queue: QueueBase, tasks: list[Task]) -> Plan[list[str]]:
    """Store a batch; a rejected task is named by its place among the payloads."""
    if tasks:
        try:
            yield from queue.enqueue_plan(tasks)
        except TaskRejected as e:
            raise TaskRejected(e.index, e.detail, f"payloads[{e.index}]") from None
    return [task.id for task in tasks]
