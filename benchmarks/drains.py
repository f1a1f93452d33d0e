"""Noop drains with and without a feature in use on another agent, interleaved in pairs:
what `python -m benchmarks waits` and `python -m benchmarks steps` share.

Runs in: those benchmark processes. Each drain gets a fresh server: N noop tasks of the
agent "bulk" (benchmarks/wait_agents.py) are queued, the arm's `prepare(url)` puts the
other agent's state in place (waits parked, steps stored, or nothing), then `handoff
supervise` starts the same worker processes in both arms; the drain is timed from the
gate opening (every bulk worker holds a task, see benchmarks/agents.py) to the last done.
Pairs alternate their order (with, without; without, with; ...).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import benchmarks.common as common
from handoff.client import Client
from handoff.config import RedisPoolConfig, Settings
from handoff.connection.embedded_server import spawn_server
from harness.topologies import free_tcp_port, wait_until

APP = "benchmarks.wait_agents"
Prepare = Callable[[str], None]


def drain_rate(
    tmp: Path,
    tasks: int,
    agents: dict[str, int],
    prepare: Prepare | None,
    *,
    agent: str = "bulk",
    app: str = APP,
    **settings: object,
) -> float:
    """Noop tasks/s of the `agent` workers in `agents` (name -> processes), on a fresh
    server where `prepare` ran first; `settings` go to the supervisor (HANDOFF_*)."""
    folder = Path(tempfile.mkdtemp(dir=tmp))
    gate = folder / "gate"
    gate.mkdir()
    server = spawn_server(port=free_tcp_port(), data_dir=str(folder))
    sup = None
    try:
        with Client(settings=Settings(redis=RedisPoolConfig(url=server.url))) as client:
            for start in range(0, tasks, 1000):
                client.enqueue_many(agent, [0] * min(1000, tasks - start))
            if prepare is not None:
                prepare(server.url)
            sup = common.start_supervisor(
                server.url, agents, folder / "sup.log", {"BENCH_GATE_DIR": str(gate)}, app=app,
                log_level="WARNING", **settings,
            )  # fmt: skip

            def booted() -> bool:
                common.check_alive(sup)
                return len(list(gate.glob("ready-*"))) >= agents[agent]

            wait_until(booted, 60, f"the {agent} workers to hold their first task")
            (gate / "open").touch()
            started = time.monotonic()
            deadline = started + max(60.0, tasks / 500)
            while int(client.queue_stats([agent])[agent]["done"]) < tasks:
                if time.monotonic() > deadline:
                    raise common.RunFailed(f"drain of {tasks} not done after {deadline:.0f}s")
                time.sleep(0.005)
            return tasks / (time.monotonic() - started)
    finally:
        if sup is not None:
            common.stop_supervisor(sup)
        server.stop()


def drain_pairs(
    tmp: Path, pairs: int, tasks: int, agents: dict[str, int], arms: dict[str, Prepare | None]
) -> dict:
    """`pairs` drains of each arm (two arms: "with", "without"), the order alternating:
    {"per_s": {arm: spread}, "ratio": spread of with / without pair by pair, "runs": ...}."""
    rates: dict[str, list[float]] = {name: [] for name in arms}
    for i in range(pairs):
        order = list(arms) if i % 2 == 0 else list(arms)[::-1]
        for name in order:
            rate = drain_rate(
                tmp, tasks, agents, arms[name], heartbeat_interval_s=1.0, reaper_interval_s=1.0
            )
            rates[name].append(rate)
        shown = ", ".join(f"{name} {rates[name][-1]:,.0f}/s" for name in arms)
        print(f"drain pair {i + 1}/{pairs}: {shown}", file=sys.stderr)
    ratios = [a / b for a, b in zip(rates["with"], rates["without"], strict=True)]
    return {
        "per_s": {name: spread(values) for name, values in rates.items()},
        "ratio": spread(ratios, 3),
        "runs": rates,
    }


def spread(values: list[float], digits: int = 2) -> dict[str, float]:
    """Median, min and max of the runs' figures."""
    return {
        "p50": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def drain_rows(result: dict, with_label: str, without_label: str) -> list[str]:
    """The markdown rows of one comparison: both arms, then the pair-by-pair ratio."""
    rows = []
    for key, label in (("with", with_label), ("without", without_label)):
        f = result["per_s"][key]
        rows.append(f"| {label} | {f['p50']:,.0f} | {f['min']:,.0f} | {f['max']:,.0f} |")
    r = result["ratio"]
    rows.append(f"| ratio with ÷ without, pair by pair | {r['p50']:.3f} | {r['min']:.3f} | "
                f"{r['max']:.3f} |")  # fmt: skip
    return rows
