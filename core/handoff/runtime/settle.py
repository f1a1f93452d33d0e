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
from handoff.protocol import notices as notice
from handoff.protocol import steps
from handoff.protocol.conflict import KeyedTask
from handoff.protocol.queue import Completion, Failure
from handoff.protocol.task import Task, has_non_finite, now_ms
from handoff.runtime.agents import ON_DEAD, AgentSpec, Handoff, Join, payload_for
from handoff.runtime.keyed import has_key_options, keyed_task, refused_here, settle_keyed
from handoff.runtime.payload_types import plain
from handoff.runtime.runner import Outcome
from handoff.runtime.waits import Wait, settle_wait

MIXED_RESULT = (
    "result is a list mixing Handoff and other values: return Handoffs only (a fan-out) "
    "or data only"
)

Settled = tuple[Completion | None, Failure | None, list[Task]]
Settled3 = tuple[list[Completion], list[Failure], list[Task]]  # a batch: acks, nacks, children
ROOT_DONE = (notice.ROOT_DONE,)
# A join's record labels its first branches with their payloads in short, for the tree.
LABELLED_BRANCHES = 400
BRANCH_LABEL_CHARS = 40


def check_payload(spec: AgentSpec, task: Task) -> Failure | None:
    """A typed agent's payload becomes its model (task.payload); one that does not match
    (an older producer, or a hand-written task) is dead-lettered, not retried. A join's
    then-task whose join fails on a dead branch is dead-lettered naming that end."""
    dead = task.first_dead
    if dead is not None and task.join is not None and task.join.get("on_dead") == "fail":
        reason = f"join branch {dead.get('branch')} ended {dead.get('status')}: task "
        reason += f"{dead.get('id')} ({dead.get('agent')}): {str(dead.get('reason', ''))[:300]}"
        return Failure(task, reason, dead_now=True)
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
    extras = _tree_fields(outcome, settings)
    # The tasks it creates carry its span (or, untraced here, the one it came with).
    traceparent = outcome.traceparent or task.traceparent
    if isinstance(value, Join):
        return _settle_join(task, value, settings, extras, traceparent)
    if isinstance(value, Wait):
        then = [value.then] if isinstance(value.then, Handoff) else []
        made = children_of(task, then, settings, traceparent, refused="wait then")
        return settle_wait(task, value, made, _limits(settings), _closing(task), extras)
    if isinstance(value, Handoff) or (
        isinstance(value, list) and value and any(isinstance(v, Handoff) for v in value)
    ):
        handoffs = [value] if isinstance(value, Handoff) else value
        if not all(isinstance(v, Handoff) for v in handoffs):
            return None, Failure(task, MIXED_RESULT, dead_now=True), []
        keyed: list[KeyedTask] = []  # Handoffs with key=: roots of their own (keyed.py)
        made = children_of(task, handoffs, settings, traceparent, keyed)
        if isinstance(made, Failure):
            return None, made, []
        if keyed:
            return settle_keyed(task, made, keyed, _limits(settings), _closing(task), extras)
        ids = [c.id for c in made]
        result_json = orjson.dumps({"handoff": ids})
        step = notice.stepped(task.scope_id, task.run_id, task.id, ids, *_limits(settings))
        notices = (*_closing(task), step)
        return Completion(task, result_json, len(made), notices, extras), None, made
    if spec.result_type is not None:
        try:
            value = spec.result_type.to_data(value)
        except ValueError as e:  # retried: a model's output may well differ next time
            failure = Failure(task, f"result {e}", retry_delay_s=spec.retry_delay_s)
            return None, failure, []
    result_json, problem = result_json_of(plain(value), settings.max_result_bytes)
    if problem:
        return None, Failure(task, problem, dead_now=True), []
    if task.run is None:
        return Completion(task, result_json, 0, ROOT_DONE, extras), None, []
    end_json = notice.done_end(task.id, task.agent, task.branch, result_json)
    ending = notice.ended(task.scope_id, task.run, task.id, task.branch, "done", end_json)
    return Completion(task, result_json, 0, (*_closing(task), ending), extras), None, []


def handoffs_refused(
    completions: list[Completion],
    failures: list[Failure],
    children: list[Task],
    why: str,
    spec: AgentSpec,
) -> Settled3:
    """A batch whose children the server refused (out of memory, noeviction): the tasks
    that handed off cannot be acked (their children would be lost), nor held (their
    leases renewed while the server stays full). Each is retried later with backoff,
    as a failure naming why; the rest of the batch goes as it was, without children.
    The nack that frees their leases is allowed at the limit (scripts.ALLOW_OOM)."""
    parents = {getattr(child, "handed_by", child.parent_id) for child in children}
    kept, retried = [], list(failures)
    for done in completions:
        if done.handoffs or done.task.id in parents:
            reason = f"handoff not stored: {why}"
            retried.append(Failure(done.task, reason, retry_delay_s=spec.retry_delay_s))
        else:
            kept.append(done)
    return kept, retried, []


def _limits(settings: Settings) -> tuple[int, int]:
    """What a run or join keeps: ends per branch, and how long after it ended (ms)."""
    keep_s = max(60.0, settings.result_ttl_s, settings.run_ttl_s)
    return settings.max_ends_per_branch, int(keep_s * 1000)


def _closing(task: Task) -> tuple[bytes, ...]:
    """A then-task that finishes lets its join's state go."""
    return (notice.dropped(task.id),) if task.join is not None else ()


def _tree_fields(outcome: Outcome, settings: Settings) -> bytes:
    """The record's fields for the run tree: run time, attempt, enqueue time, lineage."""
    if settings.run_ttl_s <= 0:
        return b""
    task = outcome.task
    fields = b',"ran_ms":%.1f,"attempt":%d,"enqueued_at":%d' % (
        outcome.elapsed_s * 1000, task.attempt, task.enqueued_at,
    )  # fmt: skip
    if task.run is not None:
        parent = (task.parent_id or "").encode()
        fields += b',"run":"%s","parent":"%s"' % (task.run.encode(), parent)
    if task.step_log is not None:
        fields += steps.tree_fields(task)
    return fields + _kept_payload(task.payload, settings.kept_payload_bytes)


def _kept_payload(payload: object, limit: int) -> bytes:
    """The payload for the finished task's record (`inspect task`, the dashboard): for an
    LLM pipeline it is the prompt. Over `limit` bytes only its size is kept."""
    if limit <= 0:
        return b""
    try:
        raw = orjson.dumps(payload, default=plain)
    except (TypeError, orjson.JSONEncodeError):
        return b""
    if len(raw) > limit:
        return b',"payload_bytes":%d' % len(raw)
    return b',"payload":' + raw


def _settle_join(
    task: Task, join: Join, settings: Settings, extras: bytes, traceparent: str | None
) -> Settled:
    """A Join: its branches' first tasks are children (enqueued before the ack); its
    then-task waits in the join's scope, enqueued there when the last branch ends."""
    problem = _join_problem(join, settings)
    if problem:
        return None, Failure(task, problem, dead_now=True), []
    made = children_of(task, list(join.branches), settings, traceparent, refused="join branch")
    if isinstance(made, Failure):
        return None, made, []
    then = join.then
    if has_key_options(then):
        reason = refused_here("join then", 0, f"handoff to {then.agent}")
        return None, Failure(task, reason, dead_now=True), []
    then_id = task.child_id(then.agent, "then")
    for index, branch in enumerate(made):
        branch.scope, branch.branch = then_id, index
    joined = {"on_dead": join.on_dead, "branches": len(made)}
    made_then = _child(task, then, then_id, now_ms(), settings, "join then", joined, traceparent)
    if isinstance(made_then, Failure):
        return None, made_then, []
    then_json = made_then[1]
    ids = [b.id for b in made]
    cap, keep_ms = _limits(settings)
    notices = (
        *_closing(task),
        notice.joined(then_id, task.run_id, task.id, ids, then.priority, then_json, cap, keep_ms),
        notice.stepped(task.scope_id, task.run_id, task.id, [then_id], cap, keep_ms),
    )
    labels = [branch_label(b.payload) for b in made[:LABELLED_BRANCHES]]
    result_json = orjson.dumps({"join": {"branches": ids, "then": then_id, "labels": labels}})
    return Completion(task, result_json, len(made), notices, extras), None, made


def branch_label(payload: Any) -> str:
    """A branch's payload in short (its JSON, cut to BRANCH_LABEL_CHARS): what tells the
    branches of a join apart in the run tree (the task's record keeps no payload)."""
    try:
        text = orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        text = repr(payload)
    if len(text) <= BRANCH_LABEL_CHARS:
        return text
    return text[: BRANCH_LABEL_CHARS - 1] + "…"


def _join_problem(join: Join, settings: Settings) -> str:
    """Why a Join cannot start (one line), or ""."""
    branches = join.branches
    if not isinstance(branches, list | tuple) or not branches:
        return "join has no branches: pass a non-empty list of Handoff"
    if not all(isinstance(b, Handoff) for b in branches):
        return "join branches must all be Handoff"
    if len(branches) > settings.max_join_branches:
        return (
            f"join has {len(branches)} branches, over max_join_branches "
            f"({settings.max_join_branches})"
        )
    if not isinstance(join.then, Handoff):
        return f"join then must be a Handoff, not {type(join.then).__name__}"
    if join.on_dead not in ON_DEAD:
        return f"join on_dead {join.on_dead!r} is not one of {', '.join(ON_DEAD)}"
    return ""


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


def _child(
    parent: Task,
    handoff: Handoff,
    child_id: str,
    stamp: int,
    settings: Settings,
    what: str,
    join: dict | None = None,
    traceparent: str | None = None,
) -> tuple[Task, bytes] | Failure:
    """One task handed off from parent (its run, scope and branch; join for a then-task),
    checked as an enqueue would be: it and its JSON, or a Failure of the parent naming
    what was wrong."""
    try:
        child = Task(
            id=child_id,
            agent=handoff.agent,
            payload=payload_for(handoff.agent, handoff.payload),
            priority=handoff.priority,
            created_at=stamp,
            enqueued_at=stamp,
            parent_id=parent.id,
            trace=[*parent.trace, parent.id],
            run=parent.run_id,
            scope=parent.scope_id,
            branch=parent.branch,
            join=join,
            run_deadline_at=parent.run_deadline_at,
            expires_at=_expires_at(stamp, handoff, parent.run_deadline_at),
            traceparent=traceparent,
            group=handoff.group if handoff.group is not None else parent.group,
        )
        blob = child.to_json()
    except InvalidPayload as e:
        return Failure(parent, f"{what}: {e}", dead_now=True)
    if len(blob) > settings.max_payload_bytes:
        reason = f"{what}: {len(blob)} bytes, over max_payload_bytes"
        return Failure(parent, reason, dead_now=True)
    return child, blob


def _expires_at(stamp: int, handoff: Handoff, run_deadline_at: int | None) -> int | None:
    """A child's deadline: its own (Handoff expires_in_s), its run's, the earlier."""
    own = None if handoff.expires_in_s is None else stamp + int(handoff.expires_in_s * 1000)
    if own is None or run_deadline_at is None:
        return own if own is not None else run_deadline_at
    return min(own, run_deadline_at)


def children_of(
    parent: Task,
    handoffs: list[Handoff],
    settings: Settings,
    traceparent: str | None = None,
    keyed: list[KeyedTask] | None = None,
    refused: str = "",
) -> list[Task] | Failure:
    """The child tasks of a handoff or fan-out, each checked as an enqueue would be. A
    Handoff with key= makes no child: its task goes to `keyed` (keyed.py); where there
    is no `keyed` (a Join's branches, a Wait's then) it fails the parent, `refused`
    naming where."""
    trace = [*parent.trace, parent.id]
    if len(trace) > settings.max_hops:
        reason = f"handoff hop limit reached ({settings.max_hops} hops)"
        return Failure(parent, reason, dead_now=True)
    stamp = now_ms()
    children = []
    for index, handoff in enumerate(handoffs):
        # Deterministic: a redelivered parent makes the same child id, deduplicated.
        child_id = parent.child_id(handoff.agent, str(index))
        what = f"handoff to {handoff.agent}"
        if has_key_options(handoff):
            if keyed is None:
                return Failure(parent, refused_here(refused, index, what), dead_now=True)
            handed = keyed_task(parent, handoff, stamp, settings, traceparent)
            if isinstance(handed, str):
                return Failure(parent, f"{what}: {handed}", dead_now=True)
            keyed.append(handed)
            continue
        made = _child(parent, handoff, child_id, stamp, settings, what, None, traceparent)
        if isinstance(made, Failure):
            return made
        children.append(made[0])
    return children
