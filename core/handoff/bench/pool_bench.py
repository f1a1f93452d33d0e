"""`handoff bench pool`: the Redis pool manager's throughput next to its target figures.

Runs in: the bench command, one process. It starts a private server of its own (a unix
socket in a temp folder and a free TCP port) and never touches any other. Every figure
is the median of several runs; each run is preceded by nothing but the same warm pool.

Operations are counted one per command: a SET+GET pair is two operations, a pipeline of
100 commands is 100. The targets are the pool manager's contract (not measured here), so
its ratio column compares across machines; the TCP column is the fair one to read it by.
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from handoff.config import RedisPoolConfig
from handoff.connection.embedded_server import spawn_server
from handoff.connection.manager import RedisManager

# The pool manager's target figures (ops/s), and its "-80%" connection overhead with pooling.
TARGET_OPS = {"single": 1_500, "batch": 5_000, "concurrent": 3_000}
TARGET_OVERHEAD_CUT = 0.80
TRANSPORTS = ("tcp", "unix")
BATCH_SIZE = 100
THREADS = 16


@dataclass(frozen=True)
class Sizes:
    """Operations per run; --quick divides them so a smoke run takes a couple of seconds."""

    single_pairs: int = 5_000
    batches: int = 200
    pairs_per_thread: int = 500
    connections: int = 1_000

    def scaled(self, divisor: int) -> Sizes:
        return Sizes(*(max(1, getattr(self, f) // divisor) for f in self.__dataclass_fields__))


def _timed(ops: int, body: Callable[[], None]) -> float:
    started = time.perf_counter()
    body()
    return ops / (time.perf_counter() - started)


def single_ops(manager: RedisManager, pairs: int) -> float:
    """SET+GET through the manager from one thread: every command its own round trip."""

    def body() -> None:
        for i in range(pairs):
            key = f"bench:single:{i % 1000}"
            manager.execute(lambda c, k=key: c.set(k, b"value"))
            manager.execute(lambda c, k=key: c.get(k))

    return _timed(2 * pairs, body)


def batch_ops(manager: RedisManager, batches: int) -> float:
    """BATCH_SIZE commands (half SET, half GET) per pipeline: one round trip each."""
    half = BATCH_SIZE // 2
    operations = [lambda p, i=i: p.set(f"bench:batch:{i}", b"value") for i in range(half)]
    operations += [lambda p, i=i: p.get(f"bench:batch:{i}") for i in range(half)]

    def body() -> None:
        for _ in range(batches):
            manager.execute_batch(operations)

    return _timed(batches * len(operations), body)


def concurrent_ops(manager: RedisManager, pairs_per_thread: int) -> float:
    """THREADS threads sharing the pool, each doing SET+GET pairs."""
    start = threading.Barrier(THREADS + 1)

    def worker(n: int) -> None:
        start.wait()
        for i in range(pairs_per_thread):
            key = f"bench:concurrent:{n}:{i % 100}"
            manager.execute(lambda c, k=key: c.set(k, b"value"))
            manager.execute(lambda c, k=key: c.get(k))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()

    def body() -> None:
        start.wait()
        for thread in threads:
            thread.join()

    return _timed(2 * THREADS * pairs_per_thread, body)


def pooled_get_ops(manager: RedisManager, n: int) -> float:
    def body() -> None:
        for _ in range(n):
            manager.execute(lambda c: c.get("bench:conn"))

    return _timed(n, body)


def new_connection_get_ops(url: str, n: int) -> float:
    """A new connection per operation (connect, handshake, GET, close): what pooling saves."""

    def body() -> None:
        for _ in range(n):
            client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))
            client.get("bench:conn")
            client.close()

    return _timed(n, body)


def measure(url: str, sizes: Sizes) -> dict[str, float]:
    """One run of every figure for one transport (a fresh manager with default settings)."""
    manager = RedisManager(RedisPoolConfig(url=url))
    try:
        single_ops(manager, max(1, sizes.single_pairs // 10))  # warm-up, not counted
        return {
            "single": single_ops(manager, sizes.single_pairs),
            "batch": batch_ops(manager, sizes.batches),
            "concurrent": concurrent_ops(manager, sizes.pairs_per_thread),
            "pooled": pooled_get_ops(manager, sizes.connections),
            "new_connection": new_connection_get_ops(url, sizes.connections),
        }
    finally:
        manager.close()


def run_pool_bench(
    runs: int = 5,
    quick: bool = False,
    transports: tuple[str, ...] = TRANSPORTS,
    progress: Callable[[str], None] = lambda line: None,
) -> dict:
    """Start a private server, run every figure `runs` times per transport, return medians."""
    sizes = Sizes().scaled(10) if quick else Sizes()
    with tempfile.TemporaryDirectory(prefix="handoff-bench-") as folder:
        server = spawn_server(
            port=_free_port(), unix_socket=str(Path(folder) / "redis.sock"), data_dir=folder
        )
        try:
            urls = {
                "tcp": f"redis://127.0.0.1:{server.port}/0",
                "unix": f"unix://{server.unix_socket}",
            }
            with server.client() as admin:
                info = admin.info("server")
            server_version = info.get("valkey_version") or info.get("redis_version")
            samples: dict[str, list[dict[str, float]]] = {t: [] for t in transports}
            for run in range(1, runs + 1):
                for transport in transports:
                    progress(f"run {run}/{runs} over {transport}")
                    samples[transport].append(measure(urls[transport], sizes))
        finally:
            server.stop()
    return {
        "runs": runs,
        "quick": quick,
        "sizes": sizes.__dict__,
        "environment": {
            "python": platform.python_version(),
            "redis_py": redis.__version__,
            "server": server_version,
            "cpus": _cpu_count(),
            "platform": sys.platform,
        },
        "target": {**TARGET_OPS, "connection_overhead_cut": TARGET_OVERHEAD_CUT},
        "medians": {t: _medians(samples[t]) for t in transports},
        "samples": samples,
    }


def run_pool_rows(quick: bool = False, runs: int = 3) -> list[dict]:
    """The pool rows over TCP for `handoff bench e2e`'s report: name, ops_per_s, note."""
    result = run_pool_bench(runs=1 if quick else runs, quick=quick, transports=("tcp",))
    m = result["medians"]["tcp"]
    note = f"median of {result['runs']} run(s), TCP; target: "
    return [
        {"name": "single (SET+GET, 1 thread)", "ops_per_s": m["single"],
         "note": note + f"{TARGET_OPS['single']:,}"},
        {"name": f"batch ({BATCH_SIZE} per pipeline)", "ops_per_s": m["batch"],
         "note": note + f"{TARGET_OPS['batch']:,}"},
        {"name": f"concurrent ({THREADS} threads, 1 pool)", "ops_per_s": m["concurrent"],
         "note": note + f"{TARGET_OPS['concurrent']:,}"},
        {"name": "pooled GET", "ops_per_s": m["pooled"],
         "note": f"{m['pooled_us']:.0f} µs/op"},
        {"name": "new connection per GET", "ops_per_s": m["new_connection"],
         "note": f"{m['new_connection_us']:.0f} µs/op; pooling cuts "
                 f"{m['connection_overhead_cut']:.0%} (target: {TARGET_OVERHEAD_CUT:.0%})"},
    ]  # fmt: skip


def _medians(samples: list[dict[str, float]]) -> dict[str, float]:
    medians = {name: statistics.median(s[name] for s in samples) for name in samples[0]}
    pooled_us, new_us = 1e6 / medians["pooled"], 1e6 / medians["new_connection"]
    medians["pooled_us"] = pooled_us
    medians["new_connection_us"] = new_us
    medians["connection_overhead_cut"] = 1.0 - pooled_us / new_us
    return medians


def format_markdown(result: dict) -> str:
    """The figures as a Markdown table: target, each transport, and ours/target over TCP."""
    transports = list(result["medians"])
    ref = "tcp" if "tcp" in transports else transports[0]
    m = result["medians"]
    head = ["figure", "target"] + [f"handoff ({t})" for t in transports] + [f"ratio ({ref}/target)"]
    rows = []
    labels = {
        "single": "single ops/s (SET+GET, 1 thread)",
        "batch": f"batch ops/s ({BATCH_SIZE} per pipeline)",
        "concurrent": f"concurrent ops/s ({THREADS} threads, 1 pool)",
    }
    for name, label in labels.items():
        target = TARGET_OPS[name]
        ours = [f"{m[t][name]:,.0f}" for t in transports]
        rows.append([label, f"{target:,}", *ours, f"{m[ref][name] / target:.1f}x"])
    rows.append(
        ["pooled GET: ops/s (µs/op)", "-"]
        + [f"{m[t]['pooled']:,.0f} ({m[t]['pooled_us']:.0f} µs)" for t in transports]
        + ["-"]
    )
    rows.append(
        ["new connection per GET: ops/s (µs/op)", "-"]
        + [
            f"{m[t]['new_connection']:,.0f} ({m[t]['new_connection_us']:.0f} µs)"
            for t in transports
        ]
        + ["-"]
    )
    target_speedup = 1.0 / (1.0 - TARGET_OVERHEAD_CUT)
    ours_speedup = m[ref]["new_connection_us"] / m[ref]["pooled_us"]
    rows.append(
        ["connection overhead (pooled vs new)", f"-{TARGET_OVERHEAD_CUT:.0%}"]
        + [f"-{m[t]['connection_overhead_cut']:.0%}" for t in transports]
        + [f"{ours_speedup / target_speedup:.1f}x"]
    )
    lines = [_md_row(head), _md_row(["---"] + ["---:"] * (len(head) - 1))]
    lines += [_md_row(row) for row in rows]
    env = result["environment"]
    lines += [
        "",
        f"Medians of {result['runs']} run(s){' (--quick)' if result['quick'] else ''}; "
        f"server {env['server']}, redis-py {env['redis_py']}, Python {env['python']}, "
        f"{env['cpus']} CPU(s). Target figures are the contract's, not this machine's. "
        f"Overhead ratio: pooling's speed-up here ({ours_speedup:.0f}x) over the target's "
        f"({target_speedup:.0f}x).",
    ]
    return "\n".join(lines)


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
