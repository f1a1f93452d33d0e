"""End-to-end benchmark: handoff and its peers, same workloads, same machine, one run.

Runs in: `./scripts/bench e2e` / `python -m benchmarks e2e [--quick]`, a plain process that
starts everything it measures: a stats server (unix socket) for the probes, and for every
system and every run a fresh broker server (TCP on 127.0.0.1) and that system's own worker
command with 2 task-running processes. Systems alternate within each run (the order rotates
from run to run); figures are medians over the runs.

Per system and run, in order:
  1. enqueue rate: the bulk path (noop tasks, timed), then single enqueues (timed);
  2. noop drain: those tasks are all queued before the workers start; the drain time is
     first handler start to last handler end as the probes saw them (worker boot excluded);
  3. enqueue-to-start latency: the same workers, now idle, get single enqueues at a steady
     rate; each handler records time.time() at start minus the send time in its payload;
  4. I/O drain: 10 ms sleeps, enough for a few seconds at the system's concurrency bound,
     queued first, then drained by workers started with that system's I/O settings;
  5. peak RSS of the task-running worker processes (psutil, sampled every 50 ms).
Every server and worker process group is stopped on the way out, also on Ctrl-C, SIGTERM or
an error (and workers die with the benchmark even on SIGKILL: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.peers import PEER_NAMES, load_peer
from benchmarks.peers.base import IO, IO_SLEEP_S, NOOP, PROJECT_DIR, Peer, RssSampler
from benchmarks.peers.bench_probe import StatsReader
from handoff.bench.interleave import repeat_interleaved, stop_signals_interrupt
from handoff.connection.embedded_server import ServerProcess, find_server_binary, spawn_server

POLL_S = 0.005
#: every figure of the last full run (quick runs: e2e-quick.json), for
#: `python -m benchmarks.report RAW_JSON OUT_DIR`
RAW_JSON = PROJECT_DIR / ".run" / "bench" / "e2e.json"


@dataclass(frozen=True)
class Sizes:
    noop_tasks: int  # queued before the noop drain (bulk part + single part)
    single_tasks: int  # of those, enqueued one call each (the single enqueue rate)
    io_seconds: float  # I/O tasks = this many seconds of work at the system's bound
    lat_rate_per_s: int
    lat_seconds: float
    drain_timeout_s: float


QUICK = Sizes(5_000, 500, 1.5, 200, 2.0, 45.0)
FULL = Sizes(20_000, 2_000, 4.0, 200, 5.0, 120.0)


# -- processes we own, cleaned up whatever happens -----------------------------------------


class Owned:
    """Everything started by this benchmark, stopped in reverse order on the way out."""

    def __init__(self) -> None:
        self.servers: list[ServerProcess] = []
        self.peers: list[Peer] = []

    def server(self, **kwargs) -> ServerProcess:
        srv = spawn_server(**kwargs)
        self.servers.append(srv)
        return srv

    def drop_server(self, srv: ServerProcess) -> None:
        srv.stop()
        if srv in self.servers:
            self.servers.remove(srv)

    def cleanup(self) -> None:
        for peer in self.peers:
            with contextlib.suppress(Exception):
                peer.stop_workers()
        self.peers.clear()
        for srv in reversed(self.servers):
            with contextlib.suppress(Exception):
                srv.stop(sig_kill=True)
        self.servers.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- measuring -----------------------------------------------------------------------------


class DrainFailed(RuntimeError):
    pass


def wait_count(stats: StatsReader, peer: Peer, count_fn, expected: int, timeout_s: float) -> int:
    """Poll until count_fn() reaches expected; raise with a reason on a crash or timeout."""
    deadline = time.monotonic() + timeout_s
    last_check = 0.0
    while True:
        n = count_fn()
        if n >= expected:
            return n
        now = time.monotonic()
        if now >= deadline:
            raise DrainFailed(f"timed out after {timeout_s:.0f}s with {n}/{expected} done")
        if now - last_check > 0.5:
            last_check = now
            crash = peer.crashed()
            if crash:
                raise DrainFailed(f"worker exited: {crash}")
        time.sleep(POLL_S)


def payloads(n: int, lat: int = 0) -> list[tuple[float, int]]:
    now = time.time()
    return [(now, lat)] * n


def measure_enqueue(peer: Peer, total: int, single: int) -> dict[str, float]:
    bulk_n = total - single
    items = payloads(bulk_n)
    t0 = time.perf_counter()
    peer.enqueue_bulk(NOOP, items)
    bulk_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(single):
        peer.enqueue_one(NOOP, (time.time(), 0))
    single_s = time.perf_counter() - t0
    return {"enqueue_bulk_per_s": bulk_n / bulk_s, "enqueue_single_per_s": single / single_s}


def open_gate(peer: Peer, stats: StatsReader) -> float:
    """Wait until every task-running process holds its first task at the probe's gate,
    then open it: the drain is timed from here, with every worker booted."""
    wait_count(stats, peer, stats.ready, peer.processes, 60.0)
    return stats.open_gate()


def measure_drain(
    peer: Peer, stats: StatsReader, kind: str, expected: int, timeout_s: float
) -> dict[str, float]:
    opened = open_gate(peer, stats)
    wait_count(stats, peer, lambda: stats.count(kind), expected, timeout_s)
    count, _first, last, pids = stats.progress(kind)
    return {"rate": count / max(last - opened, 1e-9), "tasks": count, "pids": pids}


def measure_latency(
    peer: Peer, stats: StatsReader, sizes: Sizes, drain_per_s: float
) -> dict[str, float]:
    """Single enqueues at a steady rate: the sizes' rate, or half the system's noop drain
    rate when that is lower (a system that cannot keep up would measure its backlog)."""
    rate = max(1.0, min(float(sizes.lat_rate_per_s), drain_per_s / 2))
    n = max(10, int(rate * sizes.lat_seconds))
    interval = 1.0 / rate
    start = time.monotonic()
    for i in range(n):
        pause = start + i * interval - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        peer.enqueue_one(NOOP, (time.time(), 1))
    wait_count(stats, peer, stats.latency_count, n, 30.0)
    samples = sorted(stats.latencies())
    return {
        "lat_rate_per_s": rate,
        "lat_p50_ms": 1000 * _quantile(samples, 0.50),
        "lat_p99_ms": 1000 * _quantile(samples, 0.99),
        "lat_samples": len(samples),
    }


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def run_system(
    peer: Peer,
    sizes: Sizes,
    stats: StatsReader,
    owned: Owned,
    tmp: Path,
    broker: Callable[[], tuple[str, Callable[[], None]]] | None = None,
) -> dict:
    """One system, one run: every workload against a fresh server. Returns the figures.
    broker: makes that server and returns (its URL, how to stop it); default a server on
    this machine's loopback (benchmarks/rtt.py passes one on a host of its own)."""
    out: dict[str, float | str] = {}
    if broker is None:
        srv = owned.server(port=free_port(), data_dir=str(tmp))
        url, release = srv.url, lambda: owned.drop_server(srv)
    else:
        url, release = broker()
    owned.peers.append(peer)
    try:
        stats.reset()
        peer.connect(url, stats_url=stats_url_of(stats))
        noop_n = int(sizes.noop_tasks * peer.noop_scale)
        out.update(measure_enqueue(peer, noop_n, int(sizes.single_tasks * peer.noop_scale)))
        out["noop_tasks"] = noop_n
        peer.start_workers(NOOP)
        with RssSampler(peer.root_pids()) as rss:
            drain = measure_drain(peer, stats, NOOP, noop_n, sizes.drain_timeout_s)
            out["noop_drain_per_s"] = drain["rate"]
            out.update(measure_latency(peer, stats, sizes, drain["rate"]))
        _, _, _, pids = stats.progress(NOOP)
        out.update(_rss_figures(peer, rss, pids, ""))
        peer.stop_workers()

        stats.reset()
        bound = peer.processes * peer.slots(IO) / IO_SLEEP_S
        io_n = int(bound * sizes.io_seconds * peer.io_scale)
        peer.enqueue_bulk(IO, payloads(io_n))
        peer.start_workers(IO)
        with RssSampler(peer.root_pids()) as rss:
            drain = measure_drain(peer, stats, IO, io_n, sizes.drain_timeout_s)
        out.update(_rss_figures(peer, rss, drain["pids"], "_io"))
        out.update(
            io_drain_per_s=drain["rate"],
            io_bound_per_s=bound,
            io_pct_of_bound=100.0 * drain["rate"] / bound,
            io_tasks=io_n,
        )
        peer.stop_workers()
    finally:
        peer.stop_workers()
        if peer in owned.peers:
            owned.peers.remove(peer)
        with contextlib.suppress(Exception):
            peer.close()
        release()
    return out


def _rss_figures(peer: Peer, rss: RssSampler, task_pids: set[int], suffix: str) -> dict:
    pids = peer.worker_pids(task_pids) or list(rss.peak)
    worker_peaks = [rss.peak[p] for p in pids if p in rss.peak]
    mb = 1024 * 1024
    return {
        f"rss_worker_mb{suffix}": max(worker_peaks) / mb if worker_peaks else float("nan"),
        f"rss_tree_mb{suffix}": rss.peak_total / mb,
    }


def stats_url_of(stats: StatsReader) -> str:
    kw = stats.client.connection_pool.connection_kwargs
    return f"unix://{kw['path']}" if "path" in kw else f"redis://{kw['host']}:{kw['port']}/0"


# -- the run -------------------------------------------------------------------------------


def run_e2e(quick: bool, runs: int, systems: list[str] | None, out_dir: Path) -> dict:
    """Run the benchmark, write benchmarks.md and drain_rates.png into out_dir (the raw
    figures into RAW_JSON), and return the results (what report.render_markdown takes)."""
    from benchmarks import report

    sizes = QUICK if quick else FULL
    wanted = list(systems or PEER_NAMES)
    unknown = [s for s in wanted if s not in PEER_NAMES]
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}; choose from {', '.join(PEER_NAMES)}")
    tmp = Path(tempfile.mkdtemp(prefix="handoff-bench-"))
    log_dir = tmp / "logs"
    log_dir.mkdir()
    owned = Owned()
    peers: dict[str, type[Peer]] = {}
    skipped: dict[str, str] = {}
    for name in wanted:
        cls, reason = load_peer(name)
        if cls is None:
            skipped[name] = reason
        else:
            peers[name] = cls
    results: dict = {
        "meta": machine_info(sizes, runs, quick, peers),
        "skipped": skipped,
        "systems": {name: {"runs": [], "errors": []} for name in peers},
    }
    started = time.monotonic()
    try:
        with stop_signals_interrupt():
            stats_srv = owned.server(unix_socket=str(tmp / "stats.sock"), data_dir=str(tmp))
            stats = StatsReader(stats_srv.url)

            def one_run(name: str, _run: int) -> dict:
                return run_system(peers[name](log_dir), sizes, stats, owned, tmp)

            def drains(figures: dict) -> str:
                keys = ("noop_drain_per_s", "io_drain_per_s")
                return ", ".join(f"{k}={figures[k]:,.0f}" for k in keys if k in figures)

            repeat_interleaved(
                results["systems"], runs, "run", one_run, drains, (DrainFailed,), rotate=True
            )
            results["pool"] = pool_rows(quick)
    finally:
        owned.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    results["meta"]["elapsed_s"] = time.monotonic() - started
    for entry in results["systems"].values():
        entry["median"] = medians(entry["runs"])
    raw = RAW_JSON.with_name("e2e-quick.json") if quick else RAW_JSON
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(results, indent=2, default=str))
    report.write(results, out_dir)
    return results


def medians(runs: list[dict]) -> dict[str, float]:
    keys = {k for r in runs for k, v in r.items() if isinstance(v, int | float)}
    return {k: statistics.median([r[k] for r in runs if k in r]) for k in sorted(keys)}


def pool_rows(quick: bool) -> list[dict] | None:
    """Hook for the pool manager's rows (single, batch, concurrent Redis ops/s) from
    handoff.bench.pool_bench, when that module exists; None otherwise (the report says so)."""
    try:
        from handoff.bench import pool_bench as pool
    except ImportError:
        return None
    runner = getattr(pool, "run_pool_rows", None)
    if runner is None:
        return None
    try:
        return runner(quick=quick)
    except Exception as e:  # the e2e figures are still worth writing
        return [{"name": "pool benchmark failed", "ops_per_s": None, "note": str(e)[:200]}]


def machine_info(sizes: Sizes, runs: int, quick: bool, peers: dict[str, type[Peer]]) -> dict:
    versions: dict[str, str] = {"python": platform.python_version()}
    for cls in peers.values():
        with contextlib.suppress(Exception):
            versions.update(cls.versions())
    binary = find_server_binary()
    server = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(_mem_total_gb(), 1),
        "os": f"{platform.system()} {platform.release()}",
        "server": server,
        "versions": versions,
        "sizes": asdict(sizes),
        "runs": runs,
        "quick": quick,
        "processes": 2,
    }


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total_gb() -> float:
    import psutil

    return psutil.virtual_memory().total / 1024**3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.e2e", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smaller workloads, 1 run")
    parser.add_argument("--runs", type=int, default=None, help="runs (default 3; quick 1)")
    parser.add_argument(
        "--systems", default=None, help=f"comma-separated subset of {','.join(PEER_NAMES)}"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default docs/; quick .run/bench/)"
    )
    args = parser.parse_args(argv)
    runs = args.runs or (1 if args.quick else 3)
    out = args.out or (Path(".run/bench") if args.quick else Path("docs"))
    systems = [s.strip() for s in args.systems.split(",")] if args.systems else None
    from benchmarks import report

    try:
        results = run_e2e(args.quick, runs, systems, out)
    except KeyboardInterrupt:
        print("interrupted: every server and worker started has been stopped", file=sys.stderr)
        return 130
    print(report.render_markdown(results))
    print(f"wrote {out / 'benchmarks.md'} and {out / 'drain_rates.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
