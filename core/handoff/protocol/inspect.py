"""Read-only views of queues and dead letters, each in one pipelined round trip.

Runs in: admin commands, the monitor. Never scans task payloads: counts come from
ZCARD/HGETALL, ages from the head of each queue (the oldest wait: the head of
<base>:waiting_since, kept in step with <base>:waiting by the wait scripts, so O(log n)).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from handoff.protocol.queue import TaskQueue
from handoff.protocol.task import EPOCH_MS, PRIORITY_SHIFT, now_ms

COUNTERS = (
    "enqueued", "done", "failed", "retried", "dead", "handed_off", "reaped", "stale_acks",
    "expired", "cancelled",
)  # fmt: skip


def enqueued_ms_from_score(score: float) -> int:
    """Invert score_for(): the enqueue time encoded in a queue score."""
    score = int(score)
    priority = score // PRIORITY_SHIFT
    return score - priority * PRIORITY_SHIFT + EPOCH_MS


def _count(raw: bytes) -> int:
    """A stats counter; one someone overwrote with text reads as 0 (the scripts restart
    it from the next event) instead of failing every view."""
    try:
        return int(raw)
    except ValueError:
        return 0


def queue_stats(queue: TaskQueue, agents: Sequence[str] | None = None) -> dict[str, dict]:
    """Per agent: queued, running, delayed, waiting, dead, the counters, and the ages of
    the queue's head and of the oldest wait."""
    names = list(agents) if agents is not None else queue.known_agents()
    if not names:
        return {}

    def read(client) -> list:
        pipe = client.pipeline(transaction=False)
        for name in names:
            keys = queue.keys.agent(name)
            pipe.zcard(keys.queue)
            pipe.zcard(keys.leases)
            pipe.zcard(keys.delayed)
            pipe.zcard(keys.dead)
            pipe.hgetall(keys.stats)
            pipe.zrange(keys.queue, 0, 0, withscores=True)
            pipe.hgetall(keys.limits)
            pipe.zcard(keys.groups)
            pipe.zcard(keys.parked)
            pipe.zcard(keys.waiting)
            pipe.zrange(keys.waiting_since, 0, 0, withscores=True)
        return pipe.execute()

    per = 11
    replies = queue.manager.execute_pipelined(read, per * len(names))
    now = now_ms()
    out: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        queued, running, delayed, dead, counters, head, limits, turning, parked, waiting, first = (
            replies[i * per : i * per + per]
        )
        queued += _count(limits.get(b"grouped_ready", b"0"))  # in their groups' sets
        counts = {k.decode(): _count(v) for k, v in counters.items()}
        age_s = 0.0
        if head:
            age_s = max(0.0, (now - enqueued_ms_from_score(head[0][1])) / 1000.0)
        wait_s = max(0.0, (now - first[0][1]) / 1000.0) if first else 0.0
        out[name] = {
            "queued": queued,
            "running": running,
            "delayed": delayed,
            "waiting": waiting,  # then-tasks of Waits, parked until their event or timeout
            "dead": dead,
            **{c: counts.get(c, 0) for c in COUNTERS if c != "dead"},
            "dead_total": counts.get("dead", 0),
            "oldest_queued_age_s": round(age_s, 3),
            "oldest_wait_age_s": round(wait_s, 3),
            "groups_ready": turning,  # groups in the rotation (ready, may start)
            "groups_waiting": parked,  # groups waiting for their rate or a pause
            **_limit_figures(limits, now),
        }
    grouped = [name for name in names if out[name]["groups_ready"] or out[name]["groups_waiting"]]
    if grouped:
        for name, busiest in zip(grouped, busiest_groups(queue, grouped, now), strict=True):
            out[name]["busiest_groups"] = busiest
    return out


BUSIEST_GROUPS = 5  # groups shown per agent (the most ready tasks among the first 50)
_GROUPS_LOOKED_AT = 50


def busiest_groups(queue: TaskQueue, agents: list[str], now: int) -> list[list[dict]]:
    """Per agent, its busiest groups: ready tasks, running ones, and how long it waits
    (parked by its rate or a pause). Two more round trips, only for agents with groups."""

    def members(client) -> list:
        pipe = client.pipeline(transaction=False)
        for name in agents:
            keys = queue.keys.agent(name)
            pipe.zrange(keys.groups, 0, _GROUPS_LOOKED_AT - 1)
            pipe.zrange(keys.parked, 0, _GROUPS_LOOKED_AT - 1, withscores=True)
        return pipe.execute()

    listed = queue.manager.execute_pipelined(members, 2 * len(agents))
    wanted: list[tuple[str, str, float]] = []  # agent, group, parked until (0: not)
    for i, name in enumerate(agents):
        wanted += [(name, g.decode(), 0.0) for g in listed[2 * i]]
        wanted += [(name, g.decode(), until) for g, until in listed[2 * i + 1]]

    def figures(client) -> list:
        pipe = client.pipeline(transaction=False)
        for name, group, _ in wanted:
            keys = queue.keys.agent(name)
            pipe.zcard(keys.group_queue(group))
            pipe.hget(keys.group_running, group)
        return pipe.execute()

    counts = queue.manager.execute_pipelined(figures, 2 * len(wanted)) if wanted else []
    per_agent: dict[str, list[dict]] = {name: [] for name in agents}
    for k, (name, group, until) in enumerate(wanted):
        per_agent[name].append({
            "group": group,
            "ready": counts[2 * k],
            "running": _count(counts[2 * k + 1] or b"0"),
            "waiting_s": round(max(0.0, (until - now) / 1000.0), 3),
        })  # fmt: skip
    return [
        sorted(per_agent[name], key=lambda g: (-g["ready"], g["group"]))[:BUSIEST_GROUPS]
        for name in agents
    ]


def _limit_figures(limits: dict[bytes, bytes], now: int) -> dict[str, Any]:
    """The start-rate limit set live ("" = the code's, "none" = lifted; the code's own is
    known to its workers only), how long the agent stays paused by a RateLimited, and how
    far ahead of now the limiter's schedule runs (0: it is not holding anything back)."""
    live = limits.get(b"rate", b"").decode(errors="replace")
    if live and live != "none":
        count, _, window = live.partition("/")
        unit = {"1000": "s", "60000": "min", "3600000": "h"}.get(window, f"{window}ms")
        live = f"{count}/{unit}"
    figures: dict[str, Any] = {"rate_live": live}
    for name, field in (
        ("paused_s", b"paused_until"),
        ("rate_ahead_s", b"tat"),
        ("cost_ahead_s", b"cost_tat"),
    ):
        try:
            ahead = (float(limits.get(field, b"0")) - now) / 1000.0
        except ValueError:
            ahead = 0.0
        figures[name] = round(max(0.0, ahead), 3)
    return figures


def dead_list(queue: TaskQueue, agent: str, limit: int = 100) -> list[dict[str, Any]]:
    """The oldest dead-lettered tasks of one agent, with their reasons."""
    keys = queue.keys.agent(agent)
    entries = queue.manager.execute(lambda c: c.zrange(keys.dead, 0, limit - 1, withscores=True))
    if not entries:
        return []
    ids = [member for member, _ in entries]

    def read(client) -> list:
        pipe = client.pipeline(transaction=False)
        pipe.hmget(keys.dead_reasons, ids)
        pipe.hmget(keys.tasks, ids)
        return pipe.execute()

    reasons, payloads = queue.manager.execute(read)
    out = []
    for (member, score), reason, raw in zip(entries, reasons, payloads, strict=True):
        item: dict[str, Any] = {"id": member.decode(), "dead_at_ms": int(score)}
        item.update(_loads_or_raw(reason, "reason"))
        item["payload_bytes"] = len(raw) if raw else 0
        out.append(item)
    return out


def _loads_or_raw(raw: bytes | None, field: str) -> dict[str, Any]:
    if raw is None:
        return {field: ""}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {field: raw.decode(errors="replace")}
    return value if isinstance(value, dict) else {field: value}
