"""Scaling benchmark: no-op drain rate on one server vs a 3-primary Redis Cluster.

Runs in: `scripts/bench-scaling [--runs 3] [--tasks 20000] [--workers 4] [--json PATH]
[--quick]`, a plain process that starts everything it measures on loopback: one server
(handoff.connection.embedded_server.spawn_server) and one 3-primary cluster
(harness/topologies.start_cluster), both kept for the whole benchmark and emptied
(FLUSHALL) before every run, and for every run a fresh `handoff supervise` with W worker
processes (agents from benchmarks/agents.py).

Configurations (the same W worker processes in each):
  a  one server, one agent type, W workers
  b  cluster, one agent type (its hash tag: all its keys on one primary), W workers
  c  cluster, three agent types whose hash tags land on three different primaries, the W
     workers split across them (W=4: 2+1+1) and the tasks split in the same proportion
  d  one server, the same three agent types and split as c

Per run: N no-op tasks are enqueued with Client.enqueue_many (1,000 per call) before the
supervisor starts; every worker process then boots, claims, and holds its first tasks at a
gate (a file, see benchmarks/agents.py); once all W hold one the gate opens and the drain is timed
from there until the agents' `done` counters (their stats hash, via Client.queue_stats,
polled every 5 ms) add up to N. CPU seconds of the servers, the workers and the whole machine
are read with psutil just before the gate opens and just after the drain. Configurations run
interleaved (a b c d, a b c d, ...); figures are medians with min-max over the runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

import benchmarks.common as common
from benchmarks.agents import CANDIDATES
from benchmarks.report import fmt, markdown_table
from handoff.client import Client
from handoff.config import RedisPoolConfig, Settings
from handoff.connection.embedded_server import ServerProcess, spawn_server
from harness.topologies import LocalCluster, free_tcp_port, start_cluster, wait_until

CHUNK = 1000
POLL_S = 0.005
BOOT_TIMEOUT_S = 60.0
CONFIGS = {
    "a": "1 server, 1 agent type",
    "b": "cluster (3 primaries), 1 agent type (one hash tag: one primary)",
    "c": "cluster (3 primaries), 3 agent types on 3 different primaries",
    "d": "1 server, the same 3 agent types",
}


# -- topologies ----------------------------------------------------------------------------


@dataclass
class Target:
    """Where one configuration runs: its URL, how to empty it, its server processes."""

    url: str
    flush: object  # () -> None
    pids: list[int]


def single_target(server: ServerProcess) -> Target:
    def flush() -> None:
        with server.client() as c:
            c.flushall()

    return Target(server.url, flush, [server.proc.pid])


def cluster_target(cluster: LocalCluster) -> Target:
    return Target(cluster.url, cluster.flushall, [s.proc.pid for s in cluster.primaries])


def spread_names(cluster: LocalCluster, count: int = 3) -> list[tuple[str, int]]:
    """The first candidate agent names whose queue keys land on `count` different primaries:
    [(name, owner port), ...]."""
    chosen: dict[int, str] = {}
    with cluster.client() as rc:
        for name in CANDIDATES:
            port = cluster.owner_port(rc.keyslot(f"handoff:{{{name}}}:queue"))
            chosen.setdefault(port, name)
            if len(chosen) == count:
                return [(name, port) for port, name in chosen.items()]
    raise common.RunFailed(f"no {count} candidate names on {count} different primaries")


def split(total: int, parts: int) -> list[int]:
    """total split into `parts` near-equal integers, the larger ones first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# -- one run -------------------------------------------------------------------------------


def _cpu_s(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
    return out


def _machine_busy() -> tuple[float, float]:
    """(busy CPU seconds, total CPU seconds) over all cores since boot."""
    t = psutil.cpu_times()
    total = sum(t)
    return total - t.idle - getattr(t, "iowait", 0.0), total


def _ready(gate: Path) -> int:
    return sum(1 for p in gate.iterdir() if p.name.startswith("ready-"))


def run_once(target: Target, agents: dict[str, int], tasks: int, tmp: Path, tag: str) -> dict:
    """One drain of `tasks` on `target` by `agents` (name -> worker processes): its figures."""
    target.flush()
    workers = sum(agents.values())
    per_agent = dict(zip(agents, _proportional(tasks, list(agents.values())), strict=True))
    gate = tmp / f"gate-{tag}"
    gate.mkdir()
    client = Client(settings=Settings(redis=RedisPoolConfig(url=target.url)))
    proc = None
    try:
        t0 = time.perf_counter()
        for name, count in per_agent.items():
            for start in range(0, count, CHUNK):
                client.enqueue_many(name, [0] * min(CHUNK, count - start))
        enqueue_s = time.perf_counter() - t0
        proc = common.start_supervisor(
            target.url,
            agents,
            tmp / f"supervise-{tag}.log",
            {"BENCH_GATE_DIR": str(gate)},
            log_level="WARNING",
            heartbeat_interval_s=1.0,  # the library defaults, not the tests' 0.2 s
            reaper_interval_s=1.0,
        )

        def all_ready() -> bool:
            common.check_alive(proc)
            return _ready(gate) >= workers

        wait_until(all_ready, BOOT_TIMEOUT_S, f"{workers} workers to hold their first task")
        worker_pids = [c.pid for c in proc.live_children()]
        if len(worker_pids) != workers:
            raise common.RunFailed(f"expected {workers} worker processes, found {len(worker_pids)}")
        own = [os.getpid(), proc.pid]  # this process, the supervisor
        cpu0 = (_cpu_s(target.pids), _cpu_s(worker_pids), _cpu_s(own), _machine_busy())
        opened = time.perf_counter()
        (gate / "open").touch()
        names = list(agents)
        deadline = opened + max(60.0, tasks / 500)
        while True:
            stats = client.queue_stats(names)
            done = sum(stats[name]["done"] for name in names)
            if done >= tasks:
                break
            now = time.perf_counter()
            if now > deadline:
                raise common.RunFailed(f"{done}/{tasks} done after {now - opened:.0f}s")
            common.check_alive(proc)
            time.sleep(POLL_S)
        elapsed = time.perf_counter() - opened
        cpu1 = (_cpu_s(target.pids), _cpu_s(worker_pids), _cpu_s(own), _machine_busy())
    finally:
        if proc is not None:
            common.stop_supervisor(proc)
        client.close()
    servers = {pid: cpu1[0].get(pid, 0.0) - cpu0[0].get(pid, 0.0) for pid in target.pids}
    worker_s = sum(cpu1[1].get(p, 0.0) - cpu0[1].get(p, 0.0) for p in worker_pids)
    bench_s, supervisor_s = (cpu1[2].get(p, 0.0) - cpu0[2].get(p, 0.0) for p in own)
    cores = psutil.cpu_count() or 1
    total_s = cpu1[3][1] - cpu0[3][1]
    # busy seconds of all cores, over the wall time: 2 cores fully busy = 200 (%), like the
    # per-process figures (percent of one core)
    busy_s = cores * (cpu1[3][0] - cpu0[3][0]) * elapsed / total_s if total_s > 0 else 0.0
    ours_s = sum(servers.values()) + worker_s + bench_s + supervisor_s
    return {
        "tasks": tasks,
        "done": done,
        "drain_s": elapsed,
        "rate": tasks / elapsed,
        "enqueue_per_s": tasks / enqueue_s,
        "redis_cpu_pct": 100.0 * sum(servers.values()) / elapsed,
        "redis_cpu_pct_per_node": [100.0 * s / elapsed for s in servers.values()],
        "workers_cpu_pct": 100.0 * worker_s / elapsed,
        "bench_cpu_pct": 100.0 * bench_s / elapsed,
        "supervisor_cpu_pct": 100.0 * supervisor_s / elapsed,
        "machine_busy_pct": 100.0 * busy_s / elapsed,
        # whatever else ran meanwhile (other processes on the machine, the kernel's share)
        "other_cpu_pct": 100.0 * (busy_s - ours_s) / elapsed,
        "tasks_per_agent": per_agent,
    }


def _proportional(total: int, weights: list[int]) -> list[int]:
    """total split in proportion to weights (integers, summing to total)."""
    out, given, acc = [], 0, 0
    whole = sum(weights)
    for w in weights:
        acc += w
        share = round(total * acc / whole) - given
        out.append(share)
        given += share
    return out


# -- the benchmark -------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    """Every configuration, interleaved, args.runs times; the results (meta, configs)."""
    w = args.workers
    meta = common.machine_info(
        with_cpu=True, runs=args.runs, tasks=args.tasks, workers=w, quick=args.quick
    )
    results: dict = {"meta": meta, "configs": {}}
    started = time.monotonic()
    with common.scratch("handoff-bench-scaling-") as tmp, contextlib.ExitStack() as stack:
        (tmp / "single").mkdir()
        server = spawn_server(port=free_tcp_port(), data_dir=str(tmp / "single"))
        stack.callback(server.stop)
        cluster = start_cluster(tmp / "cluster", primaries=3)
        stack.callback(cluster.stop)  # stopped first
        spread = spread_names(cluster)
        three = [name for name, _ in spread]
        counts = split(w, 3)
        one = {three[0]: w}
        plan = {
            "a": (single_target(server), one),
            "b": (cluster_target(cluster), one),
            "c": (cluster_target(cluster), dict(zip(three, counts, strict=True))),
            "d": (single_target(server), dict(zip(three, counts, strict=True))),
        }
        if w < 3:
            print("fewer than 3 workers: skipping c and d", file=sys.stderr)
            plan = {k: v for k, v in plan.items() if k in "ab"}
        results["meta"]["agents"] = {
            "one": three[0],
            "three": {name: {"owner_port": port, "workers": n} for (name, port), n in
                      zip(spread, counts, strict=True)},
            "cluster_primaries": [s.port for s in cluster.primaries],
        }  # fmt: skip
        for key, (_, agents) in plan.items():
            results["configs"][key] = {
                "description": CONFIGS[key],
                "agents": agents,
                "runs": [],
                "errors": [],
            }

        def once(key: str, r: int) -> dict:
            target, agents = plan[key]
            return run_once(target, agents, args.tasks, tmp, f"{key}{r}")

        failures = (common.RunFailed, AssertionError)
        common.repeat_interleaved(results["configs"], args.runs, "run", once, _status, failures)
    return common.summarize(results, "configs", "run", started, spread=("rate",))


def _status(figures: dict) -> str:
    return (
        f"{figures['rate']:8,.0f} tasks/s  drain {figures['drain_s']:.2f}s  "
        f"redis {figures['redis_cpu_pct']:3.0f}%  workers {figures['workers_cpu_pct']:3.0f}%  "
        f"other {figures['other_cpu_pct']:3.0f}%  machine {figures['machine_busy_pct']:3.0f}%"
    )


# -- report --------------------------------------------------------------------------------


HEADERS = [
    "config",
    "setup",
    "workers per agent",
    "tasks/s",
    "÷ (a)",
    "Redis CPU %",
    "workers CPU %",
    "bench + supervisor CPU %",
    "other CPU %",
    "machine busy %",
]


def render(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"Scaling: drain of {meta['tasks']:,} no-op tasks by {meta['workers']} worker "
        f"processes ({meta['runs']} run(s) per configuration, interleaved; median, "
        "min-max in brackets)",
        "",
        f"- machine: {meta['cpu']}, {meta['cores']} cores; server: {meta['server'][:40]}; "
        f"load average at start {meta['load_avg_at_start'][0]:.2f}",
        "- CPU columns: percent of one core while draining (the machine has "
        f"{meta['cores']} cores, so {100 * (meta['cores'] or 1)}% is everything); other = "
        "machine busy minus the processes of this benchmark (anything else running)",
        "",
    ]
    rows = []
    base = results["configs"].get("a", {}).get("median", {}).get("rate")
    for key, entry in results["configs"].items():
        m = entry.get("median", {})
        rate = m.get("rate")
        if rate is None:
            errors = "; ".join(entry["errors"])[:120]
            rows.append([key, entry["description"], "-", f"failed: {errors}"] + [""] * 6)
            continue
        spread = f" ({fmt(m['rate_min'])}-{fmt(m['rate_max'])})" if len(entry["runs"]) > 1 else ""
        per_node = ""
        nodes = [r["redis_cpu_pct_per_node"] for r in entry["runs"]]
        if nodes and len(nodes[0]) > 1:
            each = (statistics.median(n[i] for n in nodes) for i in range(len(nodes[0])))
            per_node = " (" + "/".join(f"{v:.0f}" for v in each) + ")"
        agents = "+".join(f"{n}" for n in entry["agents"].values())
        rows.append(
            [
                key,
                entry["description"],
                f"{agents} ({','.join(entry['agents'])})",
                f"{fmt(rate)}{spread}",
                f"{rate / base:.2f}x" if base else "-",
                f"{m['redis_cpu_pct']:.0f}{per_node}",
                f"{m['workers_cpu_pct']:.0f}",
                f"{m['bench_cpu_pct'] + m['supervisor_cpu_pct']:.0f}",
                f"{m['other_cpu_pct']:.0f}",
                f"{m['machine_busy_pct']:.0f}",
            ]
        )
        if entry["errors"]:
            rows.append(["", f"errors: {'; '.join(entry['errors'])[:200]}"] + [""] * 8)
    lines += markdown_table(HEADERS, rows)
    agents = meta.get("agents", {})
    if agents:
        three = ", ".join(
            f"{name} -> :{info['owner_port']}" for name, info in agents["three"].items()
        )
        lines.append(f"Agent hash tags and their primaries: {three}.")
    lines += [
        "Redis CPU for cluster configurations: the sum over the 3 primaries, per primary in "
        "brackets (in the order of the cluster's start).",
        f"Wall time {meta.get('elapsed_s', 0):.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = common.new_parser("scripts/bench-scaling", __doc__)
    parser.add_argument("--runs", type=int, default=None, help="runs per config (default 3)")
    parser.add_argument("--tasks", type=int, default=None, help="tasks per run (default 20000)")
    parser.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument("--quick", action="store_true", help="5,000 tasks, 1 run")
    args = parser.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    args.tasks = args.tasks or (5_000 if args.quick else 20_000)
    if args.workers < 1 or args.tasks < 1 or args.runs < 1:
        parser.error("--workers, --tasks and --runs must be >= 1")
    return common.finish(lambda: run(args), render, args.json, "configs", "run")


if __name__ == "__main__":
    sys.exit(main())
