"""Runs benchmark: what joins and run tracking cost, on one server.

Runs in: `./scripts/bench runs [--quick] [--runs 5]` (`python -m benchmarks runs`), a
plain process that starts a server and `handoff supervise` on benchmarks/run_agents.py
(joiner=1, fanner=1, leaf=2, gather=1 worker processes).

  1. join latency: a Join of N noop branches (10,000; --quick 2,000); from the last
     branch's end (its handler returning) to the then handler's start, as the handlers
     saw them (wall clock, one machine);
  2. follow latency: a fan-out of 1,000 noop tasks (no join); from the last one's end to
     client.result(root, follow=True) returning in this process, and the round trips the
     waiting client made meanwhile (its pool's request count: no polling loop);
  3. memory: N noop tasks (20,000; --quick 5,000) enqueued and drained in this process
     (handoff.testing.InProcessApp, the workers' settle and ack), used_memory after minus
     before (claims' replay keys expired: they live one lease), per task: with results
     and the tree off (run_ttl_s=0, result_ttl_s=0), the tree only (result_ttl_s=0), and
     the defaults (results and tree, 1 h each);
  4. noop drain with and without the run tree (run_ttl_s 3600 vs 0), interleaved: N noop
     tasks (20,000; --quick 5,000) queued first, then `handoff supervise --agents blip=2`
     (benchmarks/agents.py), timed from the gate opening (every worker holds a task) to
     the last done; a fresh server per drain.
Figures are medians over the runs (latencies: p50 of the runs, with min-max).
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path

import benchmarks.common as common
import benchmarks.drains as drain_bench
from handoff.client import Client
from handoff.config import RedisPoolConfig, Settings
from handoff.connection.embedded_server import spawn_server
from harness.topologies import free_tcp_port, wait_until

AGENTS = {"joiner": 1, "fanner": 1, "leaf": 2, "gather": 1}


def join_latency(client: Client, raw, branches: int) -> float:
    root = client.enqueue("joiner", {"n": branches})
    client.result(root, 300, follow=True)
    then_start = float(raw.get(f"bench:then_start:{root}"))
    last_end = float(raw.get(f"bench:last_end:{root}"))
    return then_start - last_end


def follow_latency(client: Client, waiter: Client, raw, tasks: int) -> tuple[float, int]:
    """(ms from the last end to result(follow=True) returning, the waiter's round trips)."""
    root = client.enqueue("fanner", {"n": tasks})
    out: dict = {}
    before = waiter.queue.manager.recorder.total_requests
    thread = threading.Thread(
        target=lambda: out.update(value=waiter.result(root, 300, follow=True), at=time.time())
    )
    thread.start()
    thread.join(300)
    round_trips = waiter.queue.manager.recorder.total_requests - before
    last_end = float(raw.get(f"bench:last_end:{root}"))
    return out["at"] * 1000 - last_end, round_trips


def memory_per_task(tmp: Path, tasks: int) -> dict[str, float]:
    """Bytes of used_memory per finished noop task, three settings, one fresh server each."""
    from handoff.testing import InProcessApp

    out = {}
    claim_keys = "handoff:{blip}:claim:*"
    configs = {
        "nothing_kept": {"run_ttl_s": 0, "result_ttl_s": 0},
        "tree_only": {"run_ttl_s": 3600, "result_ttl_s": 0},
        "defaults": {},
    }

    def no_claim_keys(raw) -> bool:
        return not list(raw.scan_iter(claim_keys))

    for name, settings in configs.items():
        (tmp / f"mem-{name}").mkdir()
        server = spawn_server(port=free_tcp_port(), data_dir=str(tmp / f"mem-{name}"))
        try:
            app = InProcessApp(
                "benchmarks.agents", server.url, agents=["blip"], lease_s=0.5, **settings
            )
            raw = server.client()
            app.client.enqueue_many("blip", [0])  # the agent's keys exist before we look
            app.run_until_idle()
            wait_until(lambda r=raw: no_claim_keys(r), 30, "claim keys to expire")
            before = raw.info("memory")["used_memory"]
            for start in range(0, tasks, 1000):
                app.client.enqueue_many("blip", list(range(min(1000, tasks - start))))
                app.run_until_idle(timeout_s=120, batch=100)
            # A claim's replay key lives one lease: transient, not kept per finished task.
            wait_until(lambda r=raw: no_claim_keys(r), 30, "claim keys to expire")
            out[name] = (raw.info("memory")["used_memory"] - before) / tasks
            app.close()
        finally:
            server.stop()
    return out


def run(quick: bool, runs: int) -> dict:
    branches = 2_000 if quick else 10_000
    memory_tasks = 5_000 if quick else 20_000
    started = time.monotonic()
    results: dict = {"meta": common.machine_info(with_cpu=True, quick=quick, runs=runs)}
    results["meta"].update(branches=branches, fan_out=1000, memory_tasks=memory_tasks)
    with common.scratch("handoff-bench-runs-") as tmp:
        (tmp / "server").mkdir()
        server = spawn_server(port=free_tcp_port(), data_dir=str(tmp / "server"))
        sup = None
        try:
            sup = common.start_supervisor(
                server.url, AGENTS, tmp / "sup.log", {}, app="benchmarks.run_agents",
                log_level="WARNING",
            )  # fmt: skip
            raw = server.client()
            settings = Settings(redis=RedisPoolConfig(url=server.url))
            joins, follows, sent = [], [], []
            with Client(settings=settings) as client, Client(settings=settings) as waiter:
                wait_until(lambda: _ready(raw), 60, "the workers to start")
                for i in range(runs):
                    joins.append(join_latency(client, raw, branches))
                    latency, commands = follow_latency(client, waiter, raw, 1000)
                    follows.append(latency)
                    sent.append(commands)
                    print(f"run {i + 1}/{runs}: join {joins[-1]:.2f} ms, follow {latency:.2f} ms",
                          file=sys.stderr)  # fmt: skip
            results["join_ms"] = _spread(joins)
            results["follow_ms"] = _spread(follows)
            results["follow_commands"] = sent
        finally:
            if sup is not None:
                common.stop_supervisor(sup)
            server.stop()
        results["memory_bytes_per_task"] = memory_per_task(tmp, memory_tasks)
        drains: dict[str, list[float]] = {"tree": [], "no_tree": []}
        for i in range(runs):  # interleaved, the order alternating
            order = [("tree", 3600.0), ("no_tree", 0.0)]
            for name, ttl in order if i % 2 == 0 else order[::-1]:
                rate = drain_bench.drain_rate(
                    tmp, memory_tasks, {"blip": 2}, None, agent="blip",
                    app="benchmarks.agents", run_ttl_s=ttl,
                )  # fmt: skip
                drains[name].append(rate)
            print(
                f"drain {i + 1}/{runs}: tree {drains['tree'][-1]:,.0f}/s, "
                f"no tree {drains['no_tree'][-1]:,.0f}/s",
                file=sys.stderr,
            )
        results["drain_per_s"] = {name: _spread(v) for name, v in drains.items()}
        ratios = [a / b for a, b in zip(drains["tree"], drains["no_tree"], strict=True)]
        results["drain_ratio"] = _spread(ratios)
    results["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    return results


def _ready(raw) -> bool:
    return raw.zcard("handoff:workers") >= sum(AGENTS.values())


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
    }


DRAIN_ROWS = (
    ("tree", "run tree kept (run_ttl_s=3600)"),
    ("no_tree", "no run tree (run_ttl_s=0)"),
)


def _drain_row(figures: dict[str, float], label: str) -> str:
    return f"| {label} | {figures['p50']:,.0f} | {figures['min']:,.0f} | {figures['max']:,.0f} |"


def render(results: dict) -> str:
    meta = results["meta"]
    join, follow, memory = (
        results["join_ms"],
        results["follow_ms"],
        results["memory_bytes_per_task"],
    )
    lines = [
        f"Runs benchmark ({meta['date']}, {meta['cores']} cores, {meta['server']}, "
        f"{meta['runs']} runs{', quick' if meta['quick'] else ''})",
        "",
        "| figure | p50 | min | max | goal |",
        "|---|---|---|---|---|",
        f"| last of {meta['branches']:,} branches' end -> then handler start (ms) | "
        f"{join['p50']} | {join['min']} | {join['max']} | < 5 |",
        f"| last of 1,000 fanned-out tasks' end -> result(follow=True) returns (ms) | "
        f"{follow['p50']} | {follow['min']} | {follow['max']} | < 5 |",
        "",
        "Round trips the follow waiter made per run (its pool's request count: finding the "
        "run, the follow script, BLMOVE until the end notice): "
        + ", ".join(str(c) for c in results["follow_commands"]),
        "",
        f"| Redis memory per finished noop task ({meta['memory_tasks']:,} tasks) | bytes |",
        "|---|---|",
        f"| nothing kept (result_ttl_s=0, run_ttl_s=0) | {memory['nothing_kept']:.0f} |",
        f"| the run tree only (result_ttl_s=0) | {memory['tree_only']:.0f} |",
        f"| defaults (result and tree kept 1 h) | {memory['defaults']:.0f} |",
        "",
        f"| noop drain, 2 worker processes ({meta['memory_tasks']:,} tasks) | tasks/s p50 |"
        " min | max |",
        "|---|---|---|---|",
        *(_drain_row(results["drain_per_s"][key], label) for key, label in DRAIN_ROWS),
        f"| ratio, pair by pair (goal: within 5 %) | {results['drain_ratio']['p50']:.3f} | "
        f"{results['drain_ratio']['min']:.3f} | {results['drain_ratio']['max']:.3f} |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = common.new_parser("python -m benchmarks runs", __doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the tables into DIR/benchmarks.md",
    )
    args = parser.parse_args(argv)
    runs = args.runs or (3 if args.quick else 5)
    return common.finish(lambda: run(args.quick, runs), render, args.json, page=(args.out, "runs"))


if __name__ == "__main__":
    sys.exit(main())
