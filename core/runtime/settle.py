"""From a handler's outcome to what goes back to Redis: an ack (with its children) or a
failure, and the checks on a typed payload at claim.

Runs in: a worker's main thread, and handoff.testing's in-process runner, so a test
settles tasks exactly as production does. Pure: no Redis here.
"""

from __future__ import annotations

from typing import Any

import orjson

from handoff.config import Settings
from handoff.errors import InvalidPayload
from handoff.protocol.queue import Completion, Failure
from handoff.protocol.task import Task, derived_task_id, has_non_finite, now_ms
from handoff.runtime.agents import AgentSpec, Handoff, payload_for
from handoff.runtime.payload_types import plain
from handoff.runtime.runner import Outcome

MIXED_RESULT = (
    "result is a list mixing Handoff and other values: return Handoffs only (a fan-out) "
    "or data only"
)

Settled = tuple[Completion | None, Failure | None, list[Task]]


def check_payload(spec: AgentSpec, task: Task) -> Failure | None:
    """A typed agent's payload becomes its model (task.payload); one that does not match
    (an older producer, or a hand-written task) is dead-lettered, not retried."""
    if spec.payload_type is None:
        return None
    try:
        task.payload = spec.payload_type.validate(task.payload)
    except ValueError as e:
        return Failure(task, f"payload {e}", dead_now=True)
    return None


def settle(outcome: Outcome, spec: AgentSpec, settings: Settings) -> Settled:
    """(completion, failure, children): exactly one of completion and failure is set."""
    task = outcome.task
    if outcome.error is not None:
        failure = Failure(task, outcome.error, outcome.traceback, retry_delay_s=spec.retry_delay_s)
        return None, failure, []
    value = outcome.value
    if isinstance(value, Handoff) or (
        isinstance(value, list) and value and any(isinstance(v, Handoff) for v in value)
    ):
        handoffs = [value] if isinstance(value, Handoff) else value
        if not all(isinstance(v, Handoff) for v in handoffs):
            return None, Failure(task, MIXED_RESULT, dead_now=True), []
        made = children_of(task, handoffs, settings)
        if isinstance(made, Failure):
            return None, made, []
        result_json = orjson.dumps({"handoff": [c.id for c in made]})
        return Completion(task, result_json, len(made)), None, made
    if spec.result_type is not None:
        try:
            value = spec.result_type.to_data(value)
        except ValueError as e:  # retried: a model's output may well differ next time
            failure = Failure(task, f"result {e}", retry_delay_s=spec.retry_delay_s)
            return None, failure, []
    result_json, problem = result_json_of(plain(value), settings.max_result_bytes)
    if problem:
        return None, Failure(task, problem, dead_now=True), []
    return Completion(task, result_json), None, []


def result_json_of(value: Any, limit: int) -> tuple[bytes, str]:
    """The result as JSON, or a one-line reason it cannot be stored as returned."""
    try:
        result_json = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError) as e:
        return b"", f"result is not JSON-serialisable: {e}"
    # orjson writes NaN and infinities as null: look only when a null is there at all.
    if b"null" in result_json and has_non_finite(value):
        return b"", "result holds a NaN or infinite number, which JSON cannot represent"
    if len(result_json) > limit:
        return b"", f"result is {len(result_json)} bytes, over max_result_bytes ({limit})"
    return result_json, ""


def children_of(parent: Task, handoffs: list[Handoff], settings: Settings) -> list[Task] | Failure:
    """The child tasks of a handoff or fan-out, each checked as an enqueue would be."""
    trace = [*parent.trace, parent.id]
    if len(trace) > settings.max_hops:
        reason = f"handoff hop limit reached ({settings.max_hops} hops)"
        return Failure(parent, reason, dead_now=True)
    stamp = now_ms()
    children = []
    for index, handoff in enumerate(handoffs):
        try:
            child = Task(
                # Deterministic: a redelivered parent makes the same child id, deduplicated.
                id=derived_task_id(handoff.agent, parent.id, str(index)),
                agent=handoff.agent,
                payload=payload_for(handoff.agent, handoff.payload),
                priority=handoff.priority,
                created_at=stamp,
                enqueued_at=stamp,
                parent_id=parent.id,
                trace=trace,
            )
            size = len(child.to_json())
        except InvalidPayload as e:
            return Failure(parent, f"handoff to {handoff.agent}: {e}", dead_now=True)
        if size > settings.max_payload_bytes:
            reason = f"handoff to {handoff.agent}: {size} bytes, over max_payload_bytes"
            return Failure(parent, reason, dead_now=True)
        children.append(child)
    return children
