"""Reap: expired leases back to their queues, and notices dead workers left behind.

Runs in: the supervisor's upkeep (and tests). reap.lua moves expired leases back and
promotes due delayed tasks, bounded per call, and returns the outbox notices older than
OUTBOX_GRACE_MS: a worker that died between its ack and their delivery left them. Those
are delivered here, then forgotten; a malformed one is said once and deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from handoff.protocol import notices as notice
from handoff.protocol.keys import Keys
from handoff.protocol.records import Outgoing, now_arg

log = logging.getLogger(__name__)

OUTBOX_GRACE_MS = 5000  # a notice still in an outbox this long is the reaper's to deliver


def reap(
    queue: Any, agents: Iterable[str], limit: int, now_ms: int | None
) -> dict[str, tuple[int, int]]:
    """TaskQueue.reap: {agent: (reaped, promoted)}, and the leftovers delivered."""
    agents = list(agents)
    now = now_arg(now_ms)
    calls = [("reap", queue._fixed(a), [now, limit, OUTBOX_GRACE_MS]) for a in agents]
    if not calls:
        return {}
    counts, left = {}, []
    for agent, reply in zip(agents, queue.run_scripts(calls), strict=True):
        counts[agent] = (int(reply[0]), int(reply[1]))
        left += [
            (agent, reply[i].decode(errors="surrogateescape"), reply[i + 1])
            for i in range(2, len(reply), 2)
        ]
    left = drop_malformed(queue, left)
    if left:
        deliver_left(queue, left, now_ms)
    return counts


def drop_malformed(queue: Any, left: list[Outgoing]) -> list[Outgoing]:
    """Outbox notices that are not well formed are said once each and deleted: one
    would fail the delivery of every notice sent with it, on every reap."""
    bad: dict[str, list[Any]] = {}
    good = []
    for source, field_name, item in left:
        raw_field = field_name.encode(errors="surrogateescape")
        reason = notice.malformed(item) or _not_utf8(raw_field)
        if reason is None:
            good.append((source, field_name, item))
            continue
        log.warning(
            "malformed run notice dropped from %s's outbox (field %.60r): %s",
            source, field_name, reason,
        )  # fmt: skip
        bad.setdefault(source, []).append(raw_field)
    if bad:
        queue.manager.execute_pipelined(lambda c: _forget_fields(c, queue.keys, bad), len(bad))
    return good


def deliver_left(queue: Any, left: list[Outgoing], now_ms: int | None) -> None:
    """Deliver notices their workers did not (they died), then forget them."""
    log.info("delivering %d run notice(s) left in outboxes", len(left))
    if not queue.deliver(left, now_ms=now_ms):
        return
    by_source: dict[str, list[Any]] = {}
    for source, field_name, _ in left:
        by_source.setdefault(source, []).append(field_name)
    for source in by_source:
        queue._delivered.pop(source, None)
    queue.manager.execute_pipelined(
        lambda c: _forget_fields(c, queue.keys, by_source), len(by_source)
    )


def _not_utf8(field_name: bytes) -> str | None:
    try:
        field_name.decode()
    except UnicodeDecodeError:
        return "its field name is not UTF-8"
    return None


def _forget_fields(client, keys: Keys, by_source: dict[str, list[Any]]) -> list:
    pipe = client.pipeline(transaction=False)
    for source, fields in by_source.items():
        pipe.hdel(keys.agent(source).outbox, *fields)
    return pipe.execute()
