"""Waits benchmark: signal to then-handler start, a million waiting runs, drains beside waits.

Runs in: `python -m benchmarks waits [--quick] [--runs 5] [--waits 1000000] [--out docs]`,
a plain process that starts what it measures on loopback: a probe server (unix socket) the
handlers report to, an empty server, a 3-primary cluster, and a server holding --waits
waiting runs, each with `handoff supervise --agents asker=1,resumed=1` on
benchmarks/wait_agents.py.

  1. memory: --waits runs (1,000,000; --quick 20,000), one event each, parked by the
     workers' own code run in this process (benchmarks/wait_memory.py); INFO memory
     used_memory after the runs are enqueued (the reference: a queued run) and after every
     first task returned its Wait, minus before, per run; where the bytes are (MEMORY USAGE);
  2. latency, on the three targets in turn, sample by sample: a signal (the time taken just
     before client.signal, to the then-task's handler start) and a plain handoff (a
     handler's time just before returning Handoff, to the child's handler start), the two
     alternating, one sample every 10 ms; each run parks its waits first (timeouts 600 s);
     p50 and p99 per run and target, then medians over the runs with min-max;
  3. noop drain with and without waits in use on another agent, interleaved pairs
     (benchmarks/drains.py): 20,000 noop tasks (--quick 5,000) drained by 2 worker
     processes, a third worker process serving the waits' agent in both arms; "with":
     10,000 waits (--quick 2,000) parked on that agent before the supervisor starts (its
     ticks look at them for timeouts all along).
Handler start times are wall clock (time.time) on the same machine as the benchmark's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

import benchmarks.common as common
from benchmarks import drains, wait_memory
from benchmarks.e2e import _quantile
from handoff.client import Client
from handoff.config import RedisPoolConfig, Settings
from handoff.connection.embedded_server import spawn_server
from harness.procs import HandoffProcess
from harness.topologies import LocalCluster, free_tcp_port, start_cluster, wait_until

APP = wait_memory.APP
AGENTS = {"asker": 1, "resumed": 1}
PACE_S = 0.01  # one sample every 10 ms: every worker idle when its sample starts
SAMPLE_TIMEOUT_S = 10.0
WARMUP = 5
KINDS = ("signal", "handoff")


@dataclass(frozen=True)
class Sizes:
    waits: int
    runs: int
    samples: int  # per run, target and kind
    drain_tasks: int
    drain_waits: int
    pairs: int


FULL = Sizes(1_000_000, 5, 200, 20_000, 10_000, 5)
QUICK = Sizes(20_000, 2, 40, 5_000, 2_000, 1)


@dataclass
class Target:
    """One place the latency is measured: its URL, a client, its workers."""

    name: str
    label: str
    client: Client
    sup: HandoffProcess | None = None

    def count(self, fn: Callable) -> int:
        return int(self.client.queue.manager.execute(fn))


def open_target(name: str, label: str, url: str, tmp: Path, probe_url: str) -> Target:
    target = Target(name, label, Client(settings=Settings(redis=RedisPoolConfig(url=url))))
    target.sup = common.start_supervisor(
        url, AGENTS, tmp / f"sup-{name}.log",
        {"BENCH_PROBE_URL": probe_url, "BENCH_PROBE_KEY": name}, app=APP,
        log_level="WARNING", heartbeat_interval_s=1.0, reaper_interval_s=1.0,
    )  # fmt: skip
    return target


def close_target(target: Target) -> None:
    if target.sup is not None:
        common.stop_supervisor(target.sup)
    target.client.close()


# -- samples ---------------------------------------------------------------------------------


class Sampler:
    """Takes one sample at a time and reads the handler's start from the probe."""

    def __init__(self, probe: redis.Redis) -> None:
        self.probe = probe

    def _start(self, target: Target, kind: str, timeout_s: float) -> tuple[float, float]:
        reply = self.probe.blpop([target.name], timeout_s)
        if reply is None:
            if target.sup is not None:
                common.check_alive(target.sup)
            raise common.RunFailed(f"{target.label}: no {kind} handler start in {timeout_s}s")
        got, start, t0 = reply[1].decode().split()
        if got != kind:
            raise common.RunFailed(f"{target.label}: a {got} start where a {kind} was due")
        return float(start), float(t0)

    def signal(self, target: Target, event: str, timeout_s: float = SAMPLE_TIMEOUT_S) -> float:
        t0 = time.time()
        resumed = target.client.signal(event)
        start, _ = self._start(target, "signal", timeout_s)
        if resumed != 1:
            raise common.RunFailed(f"{target.label}: signal {event} resumed {resumed}")
        return (start - t0) * 1000

    def handoff(self, target: Target, timeout_s: float = SAMPLE_TIMEOUT_S) -> float:
        target.client.enqueue("asker", {"handoff": 1})
        start, t0 = self._start(target, "handoff", timeout_s)
        return (start - t0) * 1000


def park(target: Target, events: list[str]) -> None:
    """Enqueue one asker per event and wait until every wait is parked and registered."""
    keys = target.client.queue.keys.agent("resumed")
    base = target.count(lambda c: c.zcard(keys.waiting))
    target.client.enqueue_many("asker", [{"event": e, "timeout_s": 600} for e in events])

    def parked() -> bool:
        if target.sup is not None:
            common.check_alive(target.sup)
        if target.count(lambda c: c.zcard(keys.waiting)) < base + len(events):
            return False
        return target.count(lambda c: c.hlen(keys.wait_outbox)) == 0  # all registered

    wait_until(parked, 60, f"{len(events)} waits parked on {target.label}")


def warm_up(targets: list[Target], sampler: Sampler) -> None:
    """A few samples of each kind, not kept: every worker booted and its connections made."""
    for target in targets:
        events = [f"warm:{os.urandom(4).hex()}:{i}" for i in range(WARMUP)]
        sampler.handoff(target, timeout_s=90)
        park(target, events)
        for event in events:
            sampler.signal(target, event)
            sampler.handoff(target)


def one_run(targets: list[Target], sampler: Sampler, run: int, samples: int) -> dict:
    """Samples of both kinds on every target, interleaved; {target: {kind: [ms]}}."""
    tag = os.urandom(4).hex()
    events = {t.name: [f"lat:{tag}:{i}" for i in range(samples)] for t in targets}
    for target in targets:
        park(target, events[target.name])
    out: dict[str, dict[str, list[float]]] = {t.name: {k: [] for k in KINDS} for t in targets}
    order = targets[run % len(targets) :] + targets[: run % len(targets)]
    next_at = time.monotonic()
    for i in range(samples):
        for target in order:
            for kind in KINDS if i % 2 == 0 else KINDS[::-1]:
                next_at += PACE_S
                pause = next_at - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                ms = (
                    sampler.signal(target, events[target.name][i])
                    if kind == "signal"
                    else sampler.handoff(target)
                )
                out[target.name][kind].append(ms)
    return out


def summarize_latency(per_run: list[dict], targets: list[Target]) -> dict:
    out: dict = {}
    for target in targets:
        entry: dict = {"label": target.label}
        for kind in KINDS:
            runs = [sorted(r[target.name][kind]) for r in per_run]
            pooled = sorted(x for r in runs for x in r)
            entry[kind] = {
                "p50": drains.spread([_quantile(r, 0.5) for r in runs], 3),
                "p99": drains.spread([_quantile(r, 0.99) for r in runs], 3),
                "pooled_p50": round(_quantile(pooled, 0.5), 3),
                "pooled_p99": round(_quantile(pooled, 0.99), 3),
                "samples": len(pooled),
            }
        entry["ratio_p50"] = drains.spread(
            [statistics.median(r[target.name]["signal"]) / statistics.median(
                r[target.name]["handoff"]) for r in per_run], 3,
        )  # fmt: skip
        out[target.name] = entry
    return out


def full_vs_empty(per_run: list[dict]) -> dict:
    """The full server's p50 and p99 over the empty one's, run by run, for signals and
    (the reference: a server's size slows every path a little) plain handoffs."""
    out: dict = {}
    for kind in KINDS:
        for q in (0.5, 0.99):
            ratios = []
            for r in per_run:
                full, empty = sorted(r["full"][kind]), sorted(r["server"][kind])
                ratios.append(_quantile(full, q) / _quantile(empty, q))
            out.setdefault(kind, {})[f"p{round(q * 100)}"] = drains.spread(ratios, 3)
    return out


# -- the run ---------------------------------------------------------------------------------


def cluster_placement(cluster: LocalCluster, client: Client) -> dict[str, int]:
    """Which primary (port) holds the events' slot and each agent's."""
    keys = client.queue.keys
    where = {"events": keys.events_outbox, **{a: keys.agent(a).queue for a in AGENTS}}
    with cluster.client() as rc:
        return {name: cluster.owner_port(rc.keyslot(key)) for name, key in where.items()}


def latency_and_memory(sizes: Sizes, tmp: Path, results: dict) -> None:
    with contextlib.ExitStack() as stack:
        probe_srv = spawn_server(unix_socket=str(tmp / "probe.sock"), data_dir=str(tmp))
        stack.callback(probe_srv.stop)
        full_dir, empty_dir = tmp / "full", tmp / "empty"
        full_dir.mkdir(), empty_dir.mkdir()
        full = spawn_server(port=free_tcp_port(), data_dir=str(full_dir))
        stack.callback(full.stop)
        print(f"parking {sizes.waits:,} waiting runs ...", file=sys.stderr)
        results["memory"] = wait_memory.fill(full.url, sizes.waits)
        print(f"waiting run: {results['memory']['waiting_bytes']:,.0f} B", file=sys.stderr)
        empty = spawn_server(port=free_tcp_port(), data_dir=str(empty_dir))
        stack.callback(empty.stop)
        cluster = start_cluster(tmp / "cluster", primaries=3)
        stack.callback(cluster.stop)
        targets = []
        for name, label, url in (
            ("server", "a server", empty.url),
            ("cluster", "a 3-primary cluster", cluster.url),
            ("full", f"a server holding {sizes.waits:,} waiting runs", full.url),
        ):
            targets.append(open_target(name, label, url, tmp, probe_srv.url))
            stack.callback(close_target, targets[-1])
        results["meta"]["cluster_primary_of"] = cluster_placement(cluster, targets[1].client)
        sampler = Sampler(probe_srv.client())
        warm_up(targets, sampler)
        per_run = []
        for run in range(sizes.runs):
            per_run.append(one_run(targets, sampler, run, sizes.samples))
            shown = ", ".join(
                f"{t.name} signal {statistics.median(per_run[-1][t.name]['signal']):.2f}"
                f" / handoff {statistics.median(per_run[-1][t.name]['handoff']):.2f} ms"
                for t in targets
            )
            print(f"run {run + 1}/{sizes.runs}: {shown}", file=sys.stderr)
        results["latency"] = summarize_latency(per_run, targets)
        results["full_vs_empty"] = full_vs_empty(per_run)
        results["samples_ms"] = per_run


def run(sizes: Sizes, quick: bool) -> dict:
    started = time.monotonic()
    wait_memory.check_room(sizes.waits)
    results: dict = {"meta": common.machine_info(with_cpu=True, quick=quick)}
    results["meta"].update(sizes.__dict__, free_mb_at_start=_free_mb())
    with common.scratch("handoff-bench-waits-") as tmp:
        latency_and_memory(sizes, tmp, results)

        def with_waits(url: str) -> None:
            wait_memory.park_waits(url, sizes.drain_waits)

        results["drain"] = drains.drain_pairs(
            tmp, sizes.pairs, sizes.drain_tasks, {"bulk": 2, "resumed": 1},
            {"with": with_waits, "without": None},
        )  # fmt: skip
    results["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    return results


def _free_mb() -> int:
    import psutil

    return int(psutil.virtual_memory().available / 2**20)


# -- the page --------------------------------------------------------------------------------


def _cell(f: dict) -> str:
    return f"{f['p50']:.2f} ({f['min']:.2f}-{f['max']:.2f})"


def render(results: dict) -> str:
    meta, lat = results["meta"], results["latency"]
    lines = [
        f"Measured ({meta['date']}, {meta['cores']} cores, {meta['server']}, {meta['runs']} "
        f"runs of {meta['samples']} samples of each kind per target"
        f"{', quick' if meta['quick'] else ''}; {meta['elapsed_s']:.0f} s in all; load "
        f"average at the start {meta['load_avg_at_start'][0]:.2f})",
        "",
        "| where | signal -> then handler start, p50 ms | p99 ms | plain handoff -> child "
        "start, p50 ms (the reference) | p99 ms | signal ÷ handoff, p50 |",
        "|---|---|---|---|---|---|",
    ]
    for entry in lat.values():
        s, h = entry["signal"], entry["handoff"]
        lines.append(
            f"| {entry['label']} | **{_cell(s['p50'])}** | {_cell(s['p99'])} | "
            f"{_cell(h['p50'])} | {_cell(h['p99'])} | {_cell(entry['ratio_p50'])} |"
        )
    fve, s_server = results["full_vs_empty"], lat["server"]["signal"]["p50"]["p50"]
    lines += [
        "",
        f"Goal p50 at most 2 ms on a server: {'met' if s_server <= 2.0 else 'not met'} "
        f"({s_server:.2f} ms). Medians of the runs' p50 and p99, min-max in brackets. On the "
        f"server holding {meta['waits']:,} waiting runs ÷ on the empty one, run by run: "
        f"signal p50 {_cell(fve['signal']['p50'])}, p99 {_cell(fve['signal']['p99'])}; the "
        f"plain handoff beside it p50 {_cell(fve['handoff']['p50'])}, p99 "
        f"{_cell(fve['handoff']['p99'])}. Cluster: the events' slot on primary "
        f":{meta['cluster_primary_of']['events']}, the then-task's agent on "
        f":{meta['cluster_primary_of']['resumed']}, the asker on "
        f":{meta['cluster_primary_of']['asker']}.",
        "",
        *wait_memory.render(results["memory"]),
        "",
        f"| noop drain, 2 worker processes ({meta['drain_tasks']:,} tasks; a third serves "
        "the waits' agent) | tasks/s p50 | min | max |",
        "|---|---|---|---|",
        *drains.drain_rows(
            results["drain"],
            f"{meta['drain_waits']:,} waits parked on another agent",
            "no waits",
        ),
    ]
    return "\n".join(lines)


def _positive(text: str) -> int:
    try:
        value = int(text.replace(",", "").replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number above 0")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = common.new_parser("python -m benchmarks waits", __doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--runs", type=_positive, default=None, help="latency runs (default 5)")
    parser.add_argument(
        "--waits", type=_positive, default=None, help="waiting runs (1,000,000; quick 20,000)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write into DIR/benchmarks.md")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.runs is not None or args.waits is not None:
        sizes = Sizes(**{**sizes.__dict__, "runs": args.runs or sizes.runs,
                         "waits": args.waits or sizes.waits})  # fmt: skip
    return common.finish(
        lambda: run(sizes, args.quick), render, args.json, page=(args.out, "waits")
    )


if __name__ == "__main__":
    sys.exit(main())
