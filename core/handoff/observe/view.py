"""How a snapshot looks: a table for a terminal, a line per agent for logs.

Runs in: `handoff monitor`, `handoff inspect workers`. Fits an 80-column terminal for agent
names up to 10 characters and five-digit counts (a cluster adds a node column).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

NODE_COLUMNS = ("primary", "state", "mem_mb", "agents")
# wait: runs parked by a Wait (holding no process); wait_s: the oldest wait's age
AGENT_COLUMNS = (
    "agent", "queued", "run", "delay", "wait", "dead", "done", "fail", "/s", "wk", "age_s",
    "wait_s",
)  # fmt: skip
WORKER_COLUMNS = ("worker", "state", "busy", "done", "rss_mb", "cpu%", "beat_s", "health")


def table_lines(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A plain left-aligned table, as lines: the one table layout of every command."""
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return lines


def agent_rows(snapshot: dict[str, Any]) -> list[list[str]]:
    """One row per agent; on a cluster, a last column names the primary serving it."""
    on_cluster = snapshot.get("redis", {}).get("mode") == "cluster"
    return [
        [
            name[:16],
            str(a["queued"]),
            str(a["running"]),
            str(a["delayed"]),
            str(a.get("waiting", 0)),
            str(a["dead"]),
            str(a["done"]),
            str(a["failed"]),
            f"{a['throughput_per_s']:.1f}",
            _workers(a),
            f"{a['oldest_queued_age_s']:.1f}",
            _age(a.get("oldest_wait_age_s", 0.0)) if a.get("waiting") else "-",
            *([a.get("node", "?")] if on_cluster else []),
        ]
        for name, a in sorted(snapshot["agents"].items())
    ]


def _age(seconds: float) -> str:
    """A wait's age, short: waits last minutes to days, so 41s, 12m, 3.5h, 2.1d."""
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _workers(agent: dict[str, Any]) -> str:
    """Live workers, and for an autoscaled agent type the target and bounds: 3>4(1-6)."""
    auto = agent.get("autoscale")
    if not auto:
        return str(agent["workers"])
    cap = "!" if auto["capped"] else ""
    return f"{agent['workers']}>{auto['current']}({auto['min']}-{auto['max']}){cap}"


def node_rows(snapshot: dict[str, Any]) -> list[list[str]]:
    """A cluster's primaries: up or not, memory, the agent types each one serves."""
    return [
        [
            n["node"],
            "ok" if n["ok"] else "DOWN",
            f"{n['used_memory_mb']:.1f}" if n["ok"] else "-",
            ",".join(n["agents"]) or "-",
        ]
        for n in snapshot["redis"]["nodes"]
    ]


def worker_rows(snapshot: dict[str, Any]) -> list[list[str]]:
    return [
        [
            w["id"][:24],
            w["state"][:8],
            f"{w['in_flight']}/{w['max_concurrent']}",
            str(w["processed"]),
            f"{w['rss_mb']:.0f}",
            f"{w['cpu_percent']:.0f}",
            f"{w['last_heartbeat_s_ago']:.1f}",
            "ok" if w["healthy"] else "BAD",
        ]
        for w in sorted(snapshot["workers"], key=lambda w: w["id"])
    ]


def render(snapshot: dict[str, Any]) -> str:
    """The full-screen view: agents, workers, problems."""
    status = "healthy" if snapshot["healthy"] else "UNHEALTHY"
    redis = snapshot.get("redis", {})
    mode = redis.get("mode", "server")
    lines = [f"handoff monitor - {status}" + ("" if mode == "server" else f" ({mode})"), ""]
    if not redis.get("ok", True):
        lines.append(f"Redis: {redis.get('error', 'unreachable')}")
    columns = AGENT_COLUMNS + (("node",) if mode == "cluster" else ())
    lines += table_lines(columns, agent_rows(snapshot)) if snapshot["agents"] else ["no agents"]
    if redis.get("nodes"):
        lines += ["", *table_lines(NODE_COLUMNS, node_rows(snapshot))]
    lines.append("")
    lines += (
        table_lines(WORKER_COLUMNS, worker_rows(snapshot))
        if snapshot["workers"]
        else ["no workers"]
    )
    problems = problem_lines(snapshot)
    if problems:
        lines += ["", *problems]
    return "\n".join(lines)


def problem_lines(snapshot: dict[str, Any]) -> list[str]:
    """One line per problem (what `handoff health` prints)."""
    lines = []
    redis_view = snapshot.get("redis", {})
    if not redis_view.get("ok", True):
        lines.append(f"redis: {redis_view.get('error', 'unreachable')}")
    full = [n for n in redis_view.get("nodes", []) if n.get("out_of_memory")] or (
        [redis_view] if redis_view.get("out_of_memory") else []
    )
    for server in full:
        where = f" {server['node']}" if "node" in server else ""
        lines.append(
            f"redis{where}: server out of memory: {server['used_memory_mb']} MB used of "
            f"maxmemory {server['maxmemory_mb']} MB (enqueues are refused; workers keep "
            "draining)"
        )
    for w in snapshot["workers"]:
        for problem in w.get("problems", []):
            lines.append(f"worker {w['id']} ({w['agent']}): {problem}")
    return lines


def log_lines(snapshot: dict[str, Any]) -> list[str]:
    """Plain lines for a non-terminal (under honcho): one per agent."""
    return [
        f"{name}: queued={a['queued']} running={a['running']} delayed={a['delayed']} "
        f"waiting={a.get('waiting', 0)} dead={a['dead']} done={a['done']} failed={a['failed']} "
        f"handed_off={a['handed_off']} "
        f"rate={a['throughput_per_s']:.1f}/s workers={a['workers']}"
        for name, a in sorted(snapshot["agents"].items())
    ]
