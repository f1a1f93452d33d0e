"""Claim: lease up to n ready tasks per request, one script call each, one round trip.

Runs in: workers (their claim loop). claim.lua promotes due delayed tasks, pops, leases
each with the claim's token and returns the payloads, atomically; its header holds the
KEYS/ARGV contract. This module builds each request's call and reads the replies: a
corrupt task JSON is dead-lettered (one more round trip, only when it happens) and never
reaches a handler; notices the script kept in the outbox are delivered at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import orjson

from handoff.errors import InvalidPayload
from handoff.protocol.keys import check_claim_id
from handoff.protocol.limits import GUARD
from handoff.protocol.records import (
    ClaimRequest,
    ClaimResult,
    Failure,
    Outgoing,
    kept_pairs,
    new_claim_id,
    now_arg,
)
from handoff.protocol.task import Task

log = logging.getLogger(__name__)

BOUND_PER_CALL = 200  # delayed promotions / lease reaps per claim or reap call


def claim(
    queue: Any,
    requests: Sequence[ClaimRequest],
    now_ms: int | None,
    after_pop: tuple[Sequence[str], float] | None,
) -> ClaimResult:
    """TaskQueue.claim: build the calls, send them (behind the wake-up pop), read them."""
    now = now_arg(now_ms)
    calls = [claim_call(queue, request, now) for request in requests]
    before = None if after_pop is None else ("BLPOP", *after_pop[0], after_pop[1])
    replies = queue.run_scripts(calls, before=before)
    result = ClaimResult()
    corrupt: list[Failure] = []
    outgoing: list[Outgoing] = []
    for request, (_, _, args), reply in zip(requests, calls, replies, strict=True):
        outgoing += _read_reply(queue, result, request, args[2], reply, corrupt)
    if outgoing:
        queue.deliver(outgoing, now_ms=now_ms)
    if corrupt:
        log.warning("dead-lettering %d corrupt task(s): %s", len(corrupt), corrupt[0].error)
        queue.nack(corrupt, now_ms=now_ms)
    return result


def claim_call(queue: Any, request: ClaimRequest, now: Any) -> tuple[str, list[str], list]:
    """claim.lua's call for one request: a fresh token, unless the request retries one."""
    claim_id = (
        check_claim_id(request.claim_id) if request.claim_id else new_claim_id(request.claim_tag)
    )
    if request.lease_ms < 1 or request.n < 0:
        raise InvalidPayload(
            f"claim for {request.agent!r}: n = {request.n} must be >= 0 and "
            f"lease_ms = {request.lease_ms} must be >= 1"
        )
    s = queue.settings
    agent_keys = queue.keys.agent(request.agent)
    rate, group_rate, cost = request.rate, request.group_rate, request.cost_limit
    args = [
        request.n,
        request.lease_ms,
        claim_id,
        s.max_deliveries,
        request.global_limit,
        now,
        s.claim_batch_max,
        BOUND_PER_CALL,
        "1" if request.isolate_suspects else "0",
        "1" if request.solo else "0",
        rate.count if rate else 0,
        rate.window_ms if rate else 0,
        request.burst,
        GUARD,
        queue._record_ttl_ms,
        group_rate.count if group_rate else 0,
        group_rate.window_ms if group_rate else 0,
        request.group_concurrency,
        cost.count if cost else 0,
        cost.window_ms if cost else 0,
    ]
    return ("claim", [*agent_keys.all(), agent_keys.claim(claim_id)], args)


def _read_reply(
    queue: Any,
    result: ClaimResult,
    request: ClaimRequest,
    token: str,
    reply: list,
    corrupt: list[Failure],
) -> list[Outgoing]:
    """One request's reply into result: the server's clock, next due time, inbox seq, the
    suspect flag (when isolating), the leased tasks; returns the notices to deliver."""
    agent = request.agent
    tasks = result.tasks.setdefault(agent, [])
    result.server_ms, result.next_due_ms[agent] = int(reply[0]), int(reply[1])
    result.inbox_seq[agent] = int(reply[2])
    first = 3
    if request.isolate_suspects:
        result.suspects_waiting[agent] = bool(int(reply[3]))
        first = 4
    end = len(reply)
    outgoing: list[Outgoing] = []
    if b"|" in reply[first:]:  # notices it wrote to the outbox: deliver them now
        end = reply.index(b"|", first)
        outgoing = kept_pairs(agent, reply[end + 1 :])
    _read_leased(queue, agent, token, reply, first, end, tasks, corrupt)
    return outgoing


def _read_leased(
    queue: Any, agent: str, token: str, reply: list, first: int, end: int, tasks: list, corrupt
) -> None:
    """The leased tasks, five fields each (id, JSON, attempt, deliveries, first dead);
    a task whose JSON does not parse, or names another id or agent, goes to corrupt."""
    from_json = Task.from_json
    for i in range(first, end, 5):
        task_id = reply[i].decode()
        try:
            task = from_json(
                reply[i + 1], attempt=reply[i + 2], deliveries=reply[i + 3], token=token
            )
            if task.join is not None:  # a then-task: its join's ends, when asked
                task.ends_loader = ends_loader(queue, task)
                task.first_dead = orjson.loads(reply[i + 4]) if reply[i + 4] else None
            if task.id != task_id or task.agent != agent:
                raise ValueError(f"task JSON says id {task.id[:80]!r} of agent {task.agent[:80]!r}")
        except (ValueError, TypeError) as e:
            stub = Task(id=task_id, agent=agent, payload=None, token=token)
            corrupt.append(Failure(stub, f"corrupt task JSON: {e}", dead_now=True))
            continue
        tasks.append(task)


def ends_loader(queue: Any, task: Task):
    """A then-task's join ends, read only when its handler asks for them."""
    ends_key = queue.keys.agent(task.agent).ends(task.id)
    return lambda: queue.manager.execute(lambda c: c.get(ends_key)) or b""
