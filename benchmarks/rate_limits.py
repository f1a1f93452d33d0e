"""`python -m benchmarks rates`: the same 10/s limit, 4 worker processes, handoff beside
Celery's rate_limit, in one run.

handoff holds rate="10/s" in the claim script for every worker together. Celery's
rate_limit="10/s" is a token bucket in each worker node's consumer, so 4 worker nodes (4
hosts, or 4 `celery worker` commands) start up to 4 x 10 per second. Each system gets 4
worker processes (handoff: `handoff worker limited` x 4, 50 slots each; Celery: 4 worker
nodes, prefork -c 1 each), the same ready backlog, and runs for the same time; every
handler start is recorded (wall clock, ms) and the figures are the sustained starts/s
and the busiest sliding second. Medians of the runs, the systems alternating.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import redis

from handoff.connection.embedded_server import spawn_server
from harness.procs import free_tcp_port

PEERS = Path(__file__).resolve().parent / "peers"
ROOT = Path(__file__).resolve().parent.parent
LIMIT_PER_S = 10
PROCESSES = 4


def _env(broker: str, stats: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(PEERS), str(ROOT)]),
        BENCH_BROKER_URL=broker,
        BENCH_STATS_URL=stats,
        HANDOFF_REDIS_URL=broker,
        HANDOFF_APP="app_rate_handoff",
        HANDOFF_LOG_LEVEL="WARNING",
    )
    return env


def _run_handoff(broker: str, stats: str, tasks: int) -> list[subprocess.Popen]:
    from handoff.client import Client
    from handoff.config import RedisPoolConfig, Settings

    with Client(settings=Settings(redis=RedisPoolConfig(url=broker))) as client:
        client.enqueue_many("limited", [{"n": n} for n in range(tasks)])
    argv = [sys.executable, "-m", "handoff", "worker", "limited"]
    return [subprocess.Popen(argv, env=_env(broker, stats)) for _ in range(PROCESSES)]


def _run_celery(broker: str, stats: str, tasks: int) -> list[subprocess.Popen]:
    sys.path.insert(0, str(PEERS))
    from app_rate_celery import make_app

    producer_app = make_app(broker)  # a fresh app (and connection) for this run's server
    with producer_app.producer_or_acquire() as producer:
        for n in range(tasks):
            producer_app.send_task("limited", args=(n,), producer=producer)
    producer_app.close()
    argv = [
        sys.executable, "-m", "celery", "-A", "app_rate_celery", "worker", "-P", "prefork",
        "-c", "1", "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING",
    ]  # fmt: skip
    return [
        subprocess.Popen([*argv, "-n", f"w{i}@%h"], env=_env(broker, stats))
        for i in range(PROCESSES)
    ]


def one_run(system: str, seconds: float) -> dict[str, float]:
    """A fresh server, the backlog, 4 workers for `seconds` after the first start."""
    with tempfile.TemporaryDirectory() as folder:
        server = spawn_server(port=free_tcp_port(), data_dir=folder)
        broker, stats = f"redis://127.0.0.1:{server.port}/0", f"redis://127.0.0.1:{server.port}/1"
        record = redis.Redis.from_url(stats)
        tasks = int(LIMIT_PER_S * PROCESSES * seconds * 2)  # more than any can start
        start = _run_handoff if system == "handoff" else _run_celery
        procs = start(broker, stats, tasks)
        try:
            deadline = time.monotonic() + 60
            while not record.llen("starts") and time.monotonic() < deadline:
                time.sleep(0.05)
            first = time.monotonic()
            while time.monotonic() - first < seconds:
                time.sleep(0.1)
        finally:
            for proc in procs:
                proc.kill()
            for proc in procs:
                proc.wait(10)
        times = sorted(float(t) for t in record.lrange("starts", 0, -1))
        record.close()
        server.stop()
    window = [t for t in times if t < times[0] + seconds * 1000]
    busiest = max(sum(1 for u in window if t <= u < t + 1000) for t in window)
    return {"starts_per_s": len(window) / seconds, "busiest_second": busiest}


def run_rates(runs: int, seconds: float, systems: list[str]) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {s: [] for s in systems}
    for _ in range(runs):
        for system in systems:  # alternating: drift of the machine hits both alike
            results[system].append(one_run(system, seconds))
    return results


def render(results: dict[str, list[dict]], runs: int, seconds: float) -> str:
    lines = [
        f"Limit {LIMIT_PER_S}/s, {PROCESSES} worker processes, {seconds:g} s per run, "
        f"medians of {runs} runs (systems alternating):",
        "",
        "| system | how the limit is held | starts/s (median) | busiest second (median, max) |",
        "|---|---|---|---|",
    ]
    how = {
        "handoff": '`rate="10/s"`: one GCRA clock in the claim script, all workers',
        "celery": '`rate_limit="10/s"`: a token bucket per worker node',
    }
    for system, figures in results.items():
        rate = statistics.median(f["starts_per_s"] for f in figures)
        busiest = [f["busiest_second"] for f in figures]
        lines.append(
            f"| {system} | {how[system]} | {rate:.2f} | {statistics.median(busiest):g}, "
            f"{max(busiest):g} |"
        )
    return "\n".join(lines)


@click.command()
@click.option("--runs", type=click.IntRange(1, 20), default=3)
@click.option("--seconds", type=click.FloatRange(2, 300), default=30.0)
@click.option("--systems", default="handoff,celery")
def main(runs: int, seconds: float, systems: str) -> None:
    """The same 10/s limit over 4 worker processes: handoff beside Celery."""
    chosen = [s.strip() for s in systems.split(",")]
    click.echo(render(run_rates(runs, seconds, chosen), runs, seconds))
