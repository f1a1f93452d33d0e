"""Reading one task: its status, its result (waiting for it, or for its whole run with
follow), everything known about it. Each is a plan (plan.py), so Client and AsyncClient
drive the same steps, blocking or awaiting.

Runs in: producers and operators (the clients, `handoff inspect task`, the dashboard).
Reads only, but for the waiter flags the await and follow scripts set (runs.py).
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from handoff.config import Settings
from handoff.config.checks import check_range
from handoff.connection.retry import ExponentialBackoff
from handoff.errors import (
    HandoffError,
    InvalidPayload,
    RedisCommandError,
    RedisUnavailable,
    ResultTimeout,
    TaskCancelled,
    TaskDead,
    TaskExpired,
)
from handoff.protocol import runs
from handoff.protocol.keys import Keys
from handoff.protocol.plan import Call, Pause, Plan
from handoff.protocol.task import agent_of
from handoff.protocol.task_status import task_status

# The longest single blocking wait for a result (its connection's read timeout is
# longer): a wait of an hour sends a command every WAIT_CHUNK_S.
WAIT_CHUNK_S = 300.0
# An id nothing holds yet is looked at again after 16 ms, doubling to about half a second:
# a task enqueued later (a join's then-task, whose id is known before its branches end)
# pushes no notice this wait could block on, so it polls rather than sleep out wait_s.
UNKNOWN_POLL_S = 0.008
DEFAULT_BACKOFF = ExponentialBackoff(0.008, 0.512)  # the pool's defaults (MinRetryBackoff...)


def status_plan(keys: Keys, task_id: str) -> Plan[tuple[str, bytes | None]]:
    """(status, the finished record) of one task: one round trip, two for a grouped one."""
    agent_keys = keys.agent(agent_of(task_id))

    def probe(client) -> Any:
        # Not MULTI: a producer's least-privilege ACL (config/acl.conf) allows only reads.
        pipe = client.pipeline(transaction=False)
        pipe.get(agent_keys.result(task_id))
        pipe.zscore(agent_keys.dead, task_id)
        pipe.zscore(agent_keys.leases, task_id)
        pipe.zscore(agent_keys.delayed, task_id)
        pipe.zscore(agent_keys.queue, task_id)
        pipe.hget(agent_keys.task_groups, task_id)
        pipe.zscore(agent_keys.waiting, task_id)  # a Wait's then-task, parked (waits.py)
        return pipe.execute()

    # The five reads are not one snapshot: a task that moved between two of them (say
    # queue -> leases) can be missed by both. Such a miss looks "unknown"; look again.
    for _ in range(3):
        done, dead, running, delayed, queued, group, waiting = yield Call(probe, n_operations=7)
        if group is not None and {queued, running, delayed, dead} == {None}:
            group_queue = agent_keys.group_queue(group.decode())
            queued = yield Call(lambda c, q=group_queue: c.zscore(q, task_id))
        status = task_status(
            done,
            dead=dead is not None,
            running=running is not None,
            delayed=delayed is not None,
            queued=queued is not None,
            waiting=waiting is not None,
        )
        if status != "unknown":
            return status, done
    return "unknown", None


def task_info(keys: Keys, task_id: str) -> Plan[dict[str, Any]]:
    """Everything known about one task (Client.task, `handoff inspect task`, the
    dashboard's task page): two round trips."""
    agent = agent_of(task_id)
    agent_keys = keys.agent(agent)
    status, raw_result = yield from status_plan(keys, task_id)

    def read(client) -> list:
        pipe = client.pipeline(transaction=False)
        pipe.hget(agent_keys.tasks, task_id)
        pipe.hget(agent_keys.deliveries, task_id)
        pipe.hget(agent_keys.failures, task_id)
        pipe.hget(agent_keys.dead_reasons, task_id)
        pipe.hget(agent_keys.successors, task_id)
        return pipe.execute()

    raw, deliveries, failures, dead, successor = yield Call(read)
    info: dict[str, Any] = {"id": task_id, "agent": agent, "status": status}
    if raw is not None:
        try:
            info["task"] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            info["task"] = None
            info["corrupt"] = True
    info["deliveries"] = int(deliveries or 0)
    info["failures"] = int(failures or 0)
    if dead:
        info["dead"] = orjson.loads(dead)
    if successor:
        info["successor"] = _successor(successor)
    if raw_result is not None:
        info["result"] = record = orjson.loads(raw_result)
        if "task" not in info and isinstance(record, dict) and "payload" in record:
            info["payload"] = record["payload"]  # kept in the finished task's record
    return info


def _successor(raw: bytes) -> dict[str, Any]:
    """A repeated key's next task, waiting for this one to end (protocol/conflict.py):
    whether it cancelled this one (cancel_running), its delay once it takes the id, its
    task."""
    mode, delay, _until, _score, json = raw.split(b"|", 4)
    try:
        task = orjson.loads(json)
    except orjson.JSONDecodeError:
        task = None
    return {"cancels": mode == b"c", "delay_ms": int(delay), "task": task}


def dead_reason(keys: Keys, task_id: str) -> Plan[str]:
    """Why a dead task was dead-lettered ("" when it is not dead)."""
    reasons = keys.agent(agent_of(task_id)).dead_reasons
    raw = yield Call(lambda c: c.hget(reasons, task_id))
    return orjson.loads(raw).get("reason", "") if raw else ""


def waits_backoff(settings: Settings) -> ExponentialBackoff:
    """The client's retry backoff (RedisPoolConfig), for waits riding out an outage."""
    redis_config = settings.redis
    return ExponentialBackoff(
        redis_config.min_retry_backoff_ms / 1000, redis_config.max_retry_backoff_ms / 1000
    )


def result_plan(
    keys: Keys,
    task_id: str,
    wait_s: float,
    *,
    follow: bool,
    backoff: ExponentialBackoff = DEFAULT_BACKOFF,
) -> Plan[Any]:
    """Client.result: wait on the task's (or its run's) end notice, in chunks. A Redis
    outage meanwhile (a restart, a failover) is ridden out with backoff (the client's
    retry policy's) until wait_s is up: the blocking wait itself is never retried."""
    check_range("wait_s", wait_s, 0, 86_400 * 7, error=InvalidPayload)
    agent_of(task_id)
    if follow:
        return (yield from _follow_plan(keys, task_id, wait_s, backoff))
    deadline = time.monotonic() + wait_s
    block_s = WAIT_CHUNK_S
    failures = unknown_looks = 0
    while True:
        remaining = deadline - time.monotonic()
        flag_ms = int((min(remaining, block_s) + 5) * 1000)
        try:
            state = yield from runs.task_state(keys, task_id, flag_ms)
            if state.kind == "done":
                return result_of(task_id, state.record or {})
            if state.kind == "dead":
                raise TaskDead(f"task {task_id} is dead: {state.reason}")
            if remaining <= 0:
                status = "unknown"
                if state.kind != "unknown":
                    status = (yield from status_plan(keys, task_id))[0]
                raise ResultTimeout(f"task {task_id} is still {status} after {wait_s}s")
            if state.kind == "unknown":  # not enqueued yet (a join's then-task): look again
                unknown_looks += 1
                yield Pause(min(remaining, UNKNOWN_POLL_S * 2 ** min(unknown_looks, 6)))
                continue
            yield from runs.wait_done(keys, task_id, min(remaining, block_s))
        except HandoffError as e:
            failures += 1
            yield from ride_out(e, failures, deadline, backoff)
            continue
        failures = 0


def _follow_plan(keys: Keys, task_id: str, wait_s: float, backoff: ExponentialBackoff) -> Plan[Any]:
    deadline = time.monotonic() + wait_s
    block_s = WAIT_CHUNK_S
    root, failures = None, 0
    while True:
        remaining = deadline - time.monotonic()
        flag_ms = int((min(remaining, block_s) + 5) * 1000)
        try:
            if root is None:
                root = yield from runs.run_of(keys, task_id)
            state = yield from runs.run_state(keys, root, flag_ms)
            if state.kind == "single":
                return result_of(root, state.record or {})
            if state.kind == "dead":
                raise TaskDead(f"run {root} ended dead: task {root}: {state.reason}")
            if state.kind == "ended":
                return run_result(root, state.ends)
            if state.kind == "unknown":
                raise ResultTimeout(f"run {root} is unknown (never enqueued, or long gone)")
            if remaining <= 0:
                raise ResultTimeout(f"run {root} has not ended after {wait_s}s")
            yield from runs.wait_ended(keys, root, min(remaining, block_s))
        except HandoffError as e:
            failures += 1
            yield from ride_out(e, failures, deadline, backoff)
            continue
        failures = 0


def ride_out(
    error: HandoffError, failures: int, deadline: float, backoff: ExponentialBackoff
) -> Plan[None]:
    """A wait met an outage: back off and go on, until the wait's own deadline (then the
    outage is the answer). Anything but an unreachable or loading server is raised."""
    loading = isinstance(error, RedisCommandError) and "LOADING" in str(error)
    if not (isinstance(error, RedisUnavailable) or loading):
        raise error
    left_s = deadline - time.monotonic()
    if left_s <= 0:
        raise error
    yield Pause(min(backoff.sleep_s(failures), left_s))


def result_of(task_id: str, record: dict) -> Any:
    """A finished task's result, or the error that says why it has none."""
    status = record.get("status")
    if status == "expired":
        raise TaskExpired(f"task {task_id} expired: not started by its deadline")
    if status == "cancelled":
        raise TaskCancelled(f"task {task_id} was cancelled")
    return record.get("result")


def run_result(root: str, ends: list[dict]) -> Any:
    """An ended run's result: its single end's, or every end's in the order they ended;
    the first end that did not finish done raises (cancelled, expired, dead)."""
    for end in ends:
        if end.get("status") == "cancelled":
            raise TaskCancelled(
                f"run {root} was cancelled: task {end.get('id')} ({end.get('agent')}) "
                "ended cancelled"
            )
        if end.get("status") == "expired":  # as for a root: TaskExpired, not TaskDead
            raise TaskExpired(
                f"run {root} has an expired end: task {end.get('id')} ({end.get('agent')}): "
                "not started by its deadline"
            )
        if end.get("status") != "done":
            raise TaskDead(
                f"run {root} has a {end.get('status')} end: task {end.get('id')} "
                f"({end.get('agent')}): {end.get('reason', '')}"
            )
    if len(ends) == 1:
        return ends[0].get("result")
    return [end.get("result") for end in ends]
