"""Finishing leased tasks: ack, nack, release, extend. Every call checks the lease token,
so a late worker whose lease was lost and re-claimed changes nothing (a stale id).

Runs in: workers (their ack batcher, lease keeper and shutdown). One script call per agent,
one round trip per batch. An ack's notices for scopes in other slots ride right behind
it on one server (scope.lua checks each against its outbox), and follow it on a cluster.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import orjson

from handoff.protocol import notices as notice
from handoff.protocol.deliver import outboxed_in
from handoff.protocol.records import (
    Completion,
    Failure,
    LostLeases,
    Outgoing,
    by_agent,
    kept_pairs,
    now_arg,
    retry_delay_ms,
)
from handoff.protocol.task import Task

log = logging.getLogger(__name__)

Groups = list[tuple[str, list[Completion]]]


def ack(queue: Any, completions: Sequence[Completion], now_ms: int | None) -> list[str]:
    """TaskQueue.ack: the acks, their cross-slot notices behind them (one server), the
    agents a join's then-task registers; then what is left to deliver."""
    calls, groups, new_agents = _ack_calls(queue, completions, now_ms)
    if not calls:
        return []
    outgoing = _cross_slot_notices(groups)
    inline = bool(outgoing) and not queue.manager.is_cluster
    targets: list[str] = []
    if inline:
        checked, targets = queue._checked_deliveries(outgoing, now_ms)
        calls += checked
    joined = sorted(new_agents - queue._registered_agents)
    extra = [lambda p: p.sadd(queue.keys.agents, *joined)] if joined else []
    replies = queue.run_scripts(calls, extra)
    queue._registered_agents.update(new_agents)
    stale = _stale_ids(replies[: len(groups)])
    nested = outboxed_in(targets, replies[len(groups) : len(groups) + len(targets)])
    if nested:  # what the inline deliveries ended in turn, in other slots: at once too
        queue.deliver(nested, now_ms=now_ms)
    if outgoing and not inline:  # a cluster: after the acks, for those not stale
        stale_ids = set(stale)
        fresh = [item for item in outgoing if item[1].rpartition(":")[0] not in stale_ids]
        if fresh:
            queue.deliver(fresh, now_ms=now_ms)
    return stale


def _ack_calls(
    queue: Any, completions: Sequence[Completion], now_ms: int | None
) -> tuple[list, Groups, set[str]]:
    """ack.lua's call per agent (forgetting the outbox fields delivered since its last
    ack), the completions of each, and the agents a join's then-task goes to."""
    ttl_ms = queue._record_ttl_ms
    window_ms = int(queue.settings.dedupe_window_s * 1000)
    preview = queue.settings.result_ttl_s == 0 and ttl_ms > 0  # only the tree keeps it
    tree_bytes = queue.settings.tree_result_bytes
    now = now_arg(now_ms)
    calls, groups = [], []
    new_agents: set[str] = set()  # a join's then agent is enqueued to by a script
    for agent, group in by_agent(completions, lambda c: c.task.agent).items():
        agent_keys = queue.keys.agent(agent)
        result_key = agent_keys.result
        keys = agent_keys.all()
        forget = queue._delivered.pop(agent, [])
        args: list[Any] = [now, ttl_ms, len(group), len(forget), *forget]
        for position, done in enumerate(group, 1):
            task = done.task
            keys.append(result_key(task.id))
            remember = window_ms if task.key is not None or task.parent_id is not None else 0
            result = done.result_json
            if preview:
                result = orjson.dumps(result[:tree_bytes].decode(errors="ignore"))
            args += (
                task.id, task.token, result, position, done.handoffs, remember,
                done.extras, notice.NOTICE_SEP.join(done.notices),
            )  # fmt: skip
            if done.handoffs:
                for item in done.notices:
                    if item[:1] == b"J":
                        new_agents.add(notice.target_agent(item))
        # what the batch charged (task.charge): the agent's cost limiter settles it
        args.append(repr(float(sum(done.task.charged for done in group))))
        calls.append(("ack", keys, args))
        groups.append((agent, group))
    return calls, groups, new_agents


def _cross_slot_notices(groups: Groups) -> list[Outgoing]:
    """Notices for scopes in another agent's slot, named by their outbox field."""
    outgoing: list[Outgoing] = []
    for agent, group in groups:
        for done in group:
            if done.task.run is None and not done.handoffs:
                continue  # a root that ended: its notice is for its own slot
            for k, item in enumerate(done.notices):
                if item[:1] not in b"RD" and notice.target_agent(item) != agent:
                    outgoing.append((agent, f"{done.task.id}:{k}", item))
    return outgoing


def _stale_ids(replies: list) -> list[str]:
    """The stale ids of each ack reply; results it could not store follow a '|'."""
    stale: list[str] = []
    for reply in replies:
        if b"|" not in reply:
            stale.extend(i.decode() for i in reply)
            continue
        cut = reply.index(b"|")
        stale.extend(i.decode() for i in reply[:cut])
        dropped = reply[cut + 1 :]
        log.warning(
            "%d result(s) not stored (the tasks are done all the same): %s: %s",
            len(dropped) // 2, dropped[0].decode(), dropped[1].decode()[:200],
        )  # fmt: skip
    return stale


def nack(queue: Any, failures: Sequence[Failure], now_ms: int | None) -> list[str]:
    """TaskQueue.nack: retry later with backoff, or dead-letter; deliver the ends that
    dead-lettering kept for other slots. Returns stale ids."""
    calls, agents = [], []
    for agent, group in by_agent(failures, lambda f: f.task.agent).items():
        agents.append(agent)
        calls.append(("nack", queue._fixed(agent), _nack_args(group, now_ms)))
    stale: list[str] = []
    outgoing: list[Outgoing] = []
    for source, reply in zip(agents, queue.run_scripts(calls) if calls else [], strict=True):
        first = reply.index(b"|")
        stale.extend(item.decode() for item in reply[:first])
        outgoing += kept_pairs(source, reply[reply.index(b"|", first + 1) + 1 :])
    if outgoing:
        queue.deliver(outgoing, now_ms=now_ms)
    return stale


def _nack_args(group: list[Failure], now_ms: int | None) -> list[Any]:
    """nack.lua's ARGV: per failure its id, token, attempts allowed, retry delay (-1: dead
    now) and the reason kept with it."""
    args: list[Any] = [now_arg(now_ms), len(group)]
    for failure in group:
        task = failure.task
        max_attempts = task.max_attempts or 3
        delay = -1 if failure.dead_now else retry_delay_ms(failure.retry_delay_s, task.attempt)
        reason = orjson.dumps(
            {
                "reason": failure.error[:1000],
                "traceback": failure.traceback,
                "attempt": task.attempt,
            }
        )
        args += [task.id, task.token, max_attempts, delay, reason]
    return args


def release(queue: Any, tasks: Sequence[Task], pause_s: float) -> int:
    """TaskQueue.release: unstarted leased tasks back to their place, uncounted."""
    calls = []
    for agent, group in by_agent(tasks, lambda t: t.agent).items():
        args: list[Any] = [int(pause_s * 1000), len(group)]
        for task in group:
            args += [task.id, task.token]
        calls.append(("release", queue._fixed(agent), args))
    return sum(int(r) for r in queue.run_scripts(calls)) if calls else 0


def extend(queue: Any, tasks: Sequence[Task], lease_ms: int, now_ms: int | None) -> LostLeases:
    """TaskQueue.extend: renew leases; the lost ones, and which of those were cancelled."""
    calls = []
    for agent, group in by_agent(tasks, lambda t: t.agent).items():
        args: list[Any] = [now_arg(now_ms), lease_ms, len(group)]
        for task in group:
            args += [task.id, task.token]
        calls.append(("extend", queue._fixed(agent), args))
    lost = LostLeases()
    for reply in queue.run_scripts(calls) if calls else []:
        cut = reply.index(b"|")
        lost += [i.decode() for i in reply[:cut]]
        lost.cancelled += [i.decode() for i in reply[cut + 1 :]]
    return lost
