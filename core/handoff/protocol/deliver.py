"""Delivering run notices: from a source agent's outbox to the scope of their target.

Runs in: workers (after claim, ack and nack), producers (an enqueue that ended cancelled
tasks), the supervisor (the reaper's leftovers). A notice a script could not apply in its
own slot is kept in the source's outbox; delivering it is idempotent (scope.lua), so a
failed delivery is left for the reaper and a repeated one changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from handoff.errors import HandoffError
from handoff.protocol import notices as notice
from handoff.protocol.plan import Plan, Scripts
from handoff.protocol.records import Outgoing, kept_pairs, now_arg

log = logging.getLogger(__name__)

MAX_DELIVERED_KEPT = 10_000  # delivered outbox fields remembered for the next ack to forget
MAX_DELIVERY_ROUNDS = 16  # notices whose delivery ends more, followed at once this deep


def deliver_plan(queue: Any, outgoing: Sequence[Outgoing], now_ms: int | None) -> Plan[bool]:
    """Apply notices kept in outboxes to their scopes: one script call per target agent,
    one round trip per round. On success the fields are remembered for the source agent's
    next ack to forget; on failure they stay for the reaper (idempotent either way)."""
    for _ in range(MAX_DELIVERY_ROUNDS):
        by_target: dict[str, list[bytes]] = {}
        for _, _, item in outgoing:
            by_target.setdefault(notice.target_agent(item), []).append(item)
        now = now_arg(now_ms)
        targets = list(by_target)
        calls = [("scope", queue._fixed(t), [now, *by_target[t]]) for t in targets]
        try:
            # Replicated before the outbox may forget them (enqueue_wait_replicas): a
            # failover must not lose a notice whose copy in the outbox is gone.
            replies = yield Scripts(calls, wait_replicas=queue.settings.enqueue_wait_replicas)
        except HandoffError as e:
            log.warning("%d run notice(s) left for the reaper to deliver: %s", len(outgoing), e)
            return False
        remember_delivered(queue._delivered, outgoing)
        # What applying them ended in turn (a then-task of a cancelled run): at once too.
        outgoing = outboxed_in(targets, replies)
        if not outgoing:
            return True
    return True  # deeper than that: the reaper delivers the rest


def remember_delivered(delivered: dict[str, list[str]], outgoing: Sequence[Outgoing]) -> None:
    """Note delivered outbox fields per source agent: its next ack deletes them (bounded,
    the reaper forgets what no ack came for)."""
    for source, field_name, _ in outgoing:
        kept = delivered.setdefault(source, [])
        if len(kept) < MAX_DELIVERED_KEPT:
            kept.append(field_name)


def checked_deliveries(
    queue: Any, outgoing: list[Outgoing], now_ms: int | None
) -> tuple[list[tuple[str, list[str], list[Any]]], list[str]]:
    """scope calls that apply each notice only if its outbox field exists (one server: they
    ride behind the acks in one round trip), and the agent each call is for."""
    by_pair: dict[tuple[str, str], list[Any]] = {}
    for source, field_name, item in outgoing:
        by_pair.setdefault((source, notice.target_agent(item)), []).extend((field_name, item))
    now = now_arg(now_ms)
    keys = queue.keys
    calls = [
        ("scope", [*queue._fixed(target), keys.agent(source).outbox], [now, *pairs])
        for (source, target), pairs in by_pair.items()
    ]
    return calls, [target for _, target in by_pair]


def outboxed_in(agents: Sequence[str], replies: Sequence[Any]) -> list[Outgoing]:
    """The (agent, outbox field, notice) triples scope.lua replies name after '|'."""
    out: list[Outgoing] = []
    for agent, reply in zip(agents, replies, strict=True):
        if isinstance(reply, list) and b"|" in reply:
            out += kept_pairs(agent, reply[reply.index(b"|") + 1 :])
    return out
