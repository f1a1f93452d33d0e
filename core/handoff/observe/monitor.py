"""The monitor's snapshot: every agent's queues and every worker's health, aggregated.

Runs in: `handoff monitor`, `handoff health`, `handoff inspect workers`. One snapshot is
two pipelined round trips (registries, then queue counts + worker hashes), whatever the
number of tasks: it never scans task payloads or the keyspace (registries, not KEYS).

A worker whose health hash expired (TTL of a few heartbeats: it died without
deregistering) disappears from the view, and from the registry.

Health rules (per worker):
  not making progress  its heartbeat is older than STALE_HEARTBEATS intervals
                       (stopped, hung, or dead within its TTL), or work is queued for its
                       agent, it has free slots, and it has not claimed for
                       STALL_HEARTBEATS intervals
  redis unhealthy      its own Redis health check says so
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis

from handoff.errors import HandoffError, RedisCommandError
from handoff.protocol.inspect import queue_stats
from handoff.protocol.queue import TaskQueue

STALE_HEARTBEATS = 3
STALL_HEARTBEATS = 5
THROUGHPUT_WINDOW_S = 10.0


@dataclass
class ThroughputWindow:
    """Per agent (time, done) samples over a sliding window -> tasks/s."""

    window_s: float = THROUGHPUT_WINDOW_S
    samples: dict[str, deque] = field(default_factory=dict)

    def rate(self, agent: str, now: float, done: int) -> float:
        series = self.samples.setdefault(agent, deque())
        series.append((now, done))
        while len(series) > 2 and now - series[1][0] >= self.window_s:
            series.popleft()
        first_t, first_done = series[0]
        if now - first_t <= 0:
            return 0.0
        return max(0.0, (done - first_done) / (now - first_t))


def _num(fields: dict[str, str], name: str, cast=float, default=0):
    try:
        return cast(fields[name])
    except (KeyError, ValueError):
        return default


def _worker_view(worker_id: str, fields: dict[str, str], now: float) -> dict[str, Any]:
    heartbeat_at = _num(fields, "heartbeat_at")
    view: dict[str, Any] = {
        "id": worker_id,
        "agent": fields.get("agent", ""),
        "pid": _num(fields, "pid", int),
        "host": fields.get("host", ""),
        "state": fields.get("state", ""),
        "in_flight": _num(fields, "in_flight", int),
        "max_concurrent": _num(fields, "max_concurrent", int),
        "processed": _num(fields, "processed", int),
        "failed": _num(fields, "failed", int),
        "retried": _num(fields, "retried", int),
        "handed_off": _num(fields, "handed_off", int),
        "rss_mb": _num(fields, "rss_mb"),
        "cpu_percent": _num(fields, "cpu_percent"),
        "latency_p50_ms": _num(fields, "latency_p50_ms"),
        "latency_p95_ms": _num(fields, "latency_p95_ms"),
        "started": _num(fields, "started"),
        "last_claim_s_ago": round(now - _num(fields, "last_claim_at"), 1)
        if _num(fields, "last_claim_at")
        else None,
        "last_heartbeat_s_ago": round(now - heartbeat_at, 2),
        "redis_healthy": bool(_num(fields, "redis_healthy", int, 1)),
        "global_limit": _num(fields, "global_limit", int, 0) or None,
        "recycle_reason": fields.get("recycle_reason", ""),
    }
    try:
        view["pool"] = orjson.loads(fields.get("pool", "{}"))
    except orjson.JSONDecodeError:
        view["pool"] = {}
    return view


def _judge(view: dict[str, Any], queued: int, interval_s: float) -> None:
    """Fill healthy/problems for a live worker (the rules in the module docstring)."""
    problems = []
    silent_s = view["last_heartbeat_s_ago"]
    if silent_s > STALE_HEARTBEATS * interval_s:
        problems.append(f"not making progress: no heartbeat for {silent_s:.1f}s")
    else:
        since_claim = view.get("last_claim_s_ago")
        free = view["in_flight"] < view["max_concurrent"]
        stalled = since_claim is None or since_claim > STALL_HEARTBEATS * interval_s
        if queued > 0 and free and stalled and view["state"] not in ("stopping", "starting"):
            problems.append(
                f"not making progress: {queued} queued, free slots, "
                f"no claim for {since_claim if since_claim is not None else 'ever'}s"
            )
    if not view["redis_healthy"]:
        problems.append("redis unhealthy (its own health check)")
    view["healthy"] = not problems
    view["problems"] = problems


def _memory_view(info: dict[str, Any]) -> dict[str, Any]:
    """Used memory, the limit, and whether the server is at it (enqueues are refused).

    Within 1 % of the limit counts as at it: a refused write frees its client's buffers,
    so a full server reads a little under its limit between refusals."""
    used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
    return {
        "used_memory_mb": round(used / 2**20, 1),
        "maxmemory_mb": round(limit / 2**20, 1),
        "out_of_memory": bool(limit) and used >= limit * 0.99,
    }


def _autoscale_view(parts: dict[bytes, bytes]) -> dict[str, Any] | None:
    """The live autoscaling supervisors of one agent type, added up: bounds and current."""
    now = time.time() * 1000
    live = [p for p in (orjson.loads(v) for v in parts.values()) if p["until"] >= now]
    if not live:
        return None
    return {
        "min": sum(p["min"] for p in live),
        "max": sum(p["max"] for p in live),
        "current": sum(p["current"] for p in live),
        "supervisors": len(live),
        "capped": any(p.get("capped") for p in live),
    }


class Monitor:
    """Builds snapshots; keeps the throughput window between them."""

    def __init__(self, queue: TaskQueue) -> None:
        self.queue = queue
        self.keys = queue.keys
        self.interval_s = queue.settings.heartbeat_interval_s
        self.throughput = ThroughputWindow()

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        try:
            agents, workers, memory = self._registries()
        except HandoffError as e:
            return {"healthy": False, "redis": {"ok": False, "error": str(e)}, "agents": {},
                    "workers": []}  # fmt: skip
        stats, hashes = self._read(agents, workers)
        views, gone = [], []
        for worker_id, fields in zip(workers, hashes, strict=True):
            if not fields:
                gone.append(worker_id)
                continue
            view = _worker_view(worker_id, fields, now)
            queued = stats.get(view["agent"], {}).get("queued", 0)
            _judge(view, queued, self.interval_s)
            views.append(view)
        if gone:
            try:
                self.queue.manager.execute(lambda c: c.zrem(self.keys.workers, *gone))
            except RedisCommandError:  # a read-only monitor user: leave it to a writer
                pass
        redis_view: dict[str, Any] = {"ok": True, "mode": self.queue.manager.mode}
        if self.queue.manager.is_cluster:
            redis_view["nodes"] = nodes = self._nodes(agents)
            full = [n for n in nodes if n.get("out_of_memory")]
            redis_view["out_of_memory"] = bool(full)
        else:
            redis_view.update(_memory_view(memory))
        return {
            "healthy": all(v["healthy"] for v in views) and not redis_view["out_of_memory"],
            "redis": redis_view,
            "taken_at": round(now, 3),
            "agents": self._agents(stats, views, now),
            "workers": views,
        }

    def _registries(self) -> tuple[list[str], list[str], dict]:
        """The agent and worker registries and (one server) the server's memory, in one
        round trip; a cluster's primaries report their memory in _nodes()."""
        cluster = self.queue.manager.is_cluster

        def read(client) -> list:
            pipe = client.pipeline(transaction=False)
            pipe.smembers(self.keys.agents)
            pipe.zrange(self.keys.workers, 0, -1)
            if not cluster:
                pipe.info("memory")
            return pipe.execute()

        agents, workers, *memory = self.queue.manager.execute(read)
        return (
            sorted(a.decode() for a in agents),
            [w.decode() for w in workers],
            memory[0] if memory else {},
        )

    def _read(self, agents: list[str], worker_ids: list[str]) -> tuple[dict, list[dict]]:
        stats = queue_stats(self.queue, agents) if agents else {}

        def read(client) -> list:
            pipe = client.pipeline(transaction=False)
            for worker_id in worker_ids:
                pipe.hgetall(self.keys.worker(worker_id))
            for agent in agents:  # the autoscaling supervisors' parts, if any
                pipe.hgetall(self.keys.agent(agent).autoscalers)
            return pipe.execute()

        raw = self.queue.manager.execute(read) if worker_ids or agents else []
        hashes = [{k.decode(): v.decode() for k, v in h.items()} for h in raw[: len(worker_ids)]]
        for agent, parts in zip(agents, raw[len(worker_ids) :], strict=True):
            autoscale = _autoscale_view(parts)
            if autoscale:
                stats[agent]["autoscale"] = autoscale
        return stats, hashes

    def _agents(self, stats: dict, views: list[dict], now: float) -> dict[str, dict]:
        out = {}
        for name, s in stats.items():
            mine = [v for v in views if v["agent"] == name]
            p50s = sorted(v["latency_p50_ms"] for v in mine if v.get("processed"))
            out[name] = {
                "queued": s["queued"],
                "running": s["running"],
                "delayed": s["delayed"],
                "waiting": s["waiting"],  # parked by a Wait: holding no process
                "dead": s["dead"],
                "done": s["done"],
                "failed": s["failed"],
                "retried": s["retried"],
                "handed_off": s["handed_off"],
                "enqueued": s["enqueued"],
                "expired": s.get("expired", 0),
                "cancelled": s.get("cancelled", 0),
                "workers": len(mine),
                "max_concurrent": sum(v["max_concurrent"] for v in mine),
                "global_limit": next((v["global_limit"] for v in mine if v["global_limit"]), None),
                "oldest_queued_age_s": s["oldest_queued_age_s"],
                "oldest_wait_age_s": s["oldest_wait_age_s"],
                "rate_live": s.get("rate_live", ""),
                "paused_s": s.get("paused_s", 0.0),
                "rate_ahead_s": s.get("rate_ahead_s", 0.0),
                "cost_ahead_s": s.get("cost_ahead_s", 0.0),
                "groups_ready": s.get("groups_ready", 0),
                "groups_waiting": s.get("groups_waiting", 0),
                "busiest_groups": s.get("busiest_groups", []),
                "throughput_per_s": round(self.throughput.rate(name, now, s["done"]), 2),
                "latency_p50_ms": p50s[len(p50s) // 2] if p50s else 0.0,
                "latency_p95_ms": max((v["latency_p95_ms"] for v in mine), default=0.0),
            }
            if "autoscale" in s:
                out[name]["autoscale"] = s["autoscale"]
            if self.queue.manager.is_cluster:
                out[name]["node"] = self._node_of(name)
        return out

    def _nodes(self, agents: list[str]) -> list[dict[str, Any]]:
        """Each cluster primary: reachable or not, its memory, and the agent types it
        serves (an imbalance shows here). INFO goes to each node directly, outside the
        breaker: one unreachable primary must not make the whole cluster look down."""
        serving: dict[str, list[str]] = {}
        for agent in agents:
            serving.setdefault(self._node_of(agent), []).append(agent)
        nodes = []
        for node in self.queue.manager.client.get_primaries():
            entry: dict[str, Any] = {"node": node.name, "agents": serving.get(node.name, [])}
            try:
                entry.update(ok=True, **_memory_view(node.redis_connection.info("memory")))
            except (redis.RedisError, OSError) as e:
                entry.update(ok=False, error=f"{type(e).__name__}: {e}"[:200])
            nodes.append(entry)
        return nodes

    def _node_of(self, agent: str) -> str:
        """The cluster primary serving this agent's slot (from the client's slot map)."""
        cluster = self.queue.manager.client
        return cluster.get_node_from_key(self.keys.agent(agent).queue).name

    def publish(self, snapshot: dict[str, Any]) -> None:
        """Store the aggregate in one hash so other tools read one place."""
        fields = {
            "snapshot": orjson.dumps(snapshot),
            "updated_at": snapshot.get("taken_at", time.time()),
            "healthy": int(bool(snapshot["healthy"])),
        }
        self.queue.manager.execute(lambda c: c.hset(self.keys.monitor, mapping=fields))
