"""The e2e benchmark over a network: handoff and its peers with a round-trip time to Redis.

Runs in: `python -m benchmarks e2e --rtt-ms 0,0.5,2 [--quick]` (as root: network namespaces).
Two hosts are built with harness/hosts.py: `redis` runs the broker server (a fresh one per
system and run, on the host's loopback) behind a delaying FaultProxy process on the host's
address; `workers` runs every system's worker processes. The producer (this process) is a
third machine on the same bridge. Each RTT r adds r/2 ms in each direction at the proxy, so
every round trip of the producer and of the workers to Redis pays r more. The stats server
the probes write to is a unix socket (no delay), as in the plain e2e run.

Per system and RTT: noop drain, 10 ms I/O drain and enqueue-to-start latency, as e2e.py
measures them. The table (and rtt_drain.png when matplotlib is there) goes into the page's
`<!-- generated: rtt -->` part; the raw figures into .run/bench/e2e-rtt.json.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchmarks import e2e
from benchmarks.pages import write_generated
from benchmarks.peers import load_peer
from benchmarks.peers.bench_probe import StatsReader
from handoff.bench.interleave import stop_signals_interrupt

DEFAULT_SYSTEMS = ["handoff", "handoff-pf32", "celery", "dramatiq", "huey", "rq", "arq"]
RAW_JSON = e2e.RAW_JSON.with_name("e2e-rtt.json")
PLOT = "rtt_drain.png"


def proxy_cost_us(hosts, redis_host: str, worker_host: str, proxy, server) -> dict[str, float]:
    """Median PING round trip from the workers' host, straight to the server and through the
    proxy at 0 ms: what the proxy itself adds."""
    code = (
        "import redis,sys,time,statistics as s\n"
        "def rt(port):\n"
        f"    c=redis.Redis(host='{hosts[redis_host].addr}',port=port);c.ping();out=[]\n"
        "    for _ in range(2000):\n"
        "        t=time.perf_counter();c.ping();out.append(time.perf_counter()-t)\n"
        "    return s.median(out)*1e6\n"
        "print(rt(int(sys.argv[1])), rt(int(sys.argv[2])))\n"
    )
    done = hosts.run(worker_host, [sys.executable, "-c", code, str(server.port), str(proxy.port)])
    direct, proxied = (float(x) for x in done.stdout.split())
    return {"direct_us": direct, "proxied_us": proxied, "proxy_us": proxied - direct}


def main(
    rtts: list[float],
    quick: bool,
    runs: int,
    systems: list[str] | None,
    out: Path,
    direct: bool = False,
) -> int:
    """direct: also a round with no proxy (workers and producer straight to the server
    across the bridge): what the proxy costs each system at 0 ms."""
    from harness.hosts import Hosts, need_root

    reason = need_root()
    if reason:
        print(f"--rtt-ms: {reason}", file=sys.stderr)
        return 2
    sizes = e2e.QUICK if quick else e2e.FULL
    sizes = replace(sizes, drain_timeout_s=sizes.drain_timeout_s * 3)
    wanted = systems or DEFAULT_SYSTEMS
    peers, skipped = {}, {}
    for name in wanted:
        cls, why = load_peer(name)
        if cls is None:
            skipped[name] = why
        else:
            peers[name] = cls
    tmp = Path(tempfile.mkdtemp(prefix="handoff-rtt-"))
    (tmp / "logs").mkdir()
    owned = e2e.Owned()
    results: dict = {"rtts": rtts, "skipped": skipped, "systems": {}, "meta": {}}
    rounds: list[float | None] = ([None] if direct else []) + list(rtts)
    started = time.monotonic()
    try:
        with stop_signals_interrupt(), Hosts(["redis", "workers"], tmp / "hosts") as hosts:
            stats_srv = owned.server(unix_socket=str(tmp / "stats.sock"), data_dir=str(tmp))
            stats = StatsReader(stats_srv.url)
            probe_srv = hosts.redis("redis", port=6400)
            probe_proxy = hosts.proxy("redis", probe_srv.port)
            results["meta"]["proxy"] = proxy_cost_us(
                hosts, "redis", "workers", probe_proxy, probe_srv
            )
            probe_proxy.delay(1.0)
            results["meta"]["proxy_at_2ms"] = proxy_cost_us(
                hosts, "redis", "workers", probe_proxy, probe_srv
            )
            print(f"proxy: {results['meta']}", file=sys.stderr, flush=True)
            ports = iter(range(7000, 8000))

            for rtt in rounds:

                def broker(rtt=rtt):
                    port = next(ports)
                    server = hosts.redis("redis", port=port)
                    if rtt is None:
                        return server.url, server.stop
                    proxy = hosts.proxy("redis", port)
                    proxy.delay(rtt / 2)

                    def release() -> None:
                        proxy.stop()
                        server.stop()

                    return proxy.url, release

                for run in range(runs):
                    for name, cls in peers.items():
                        entry = results["systems"].setdefault(name, {})
                        label = "direct" if rtt is None else str(rtt)
                        row = entry.setdefault(label, {"runs": [], "errors": []})
                        peer = cls(tmp / "logs")
                        peer.prefix = hosts["workers"].prefix
                        t0 = time.monotonic()
                        try:
                            figures = e2e.run_system(peer, sizes, stats, owned, tmp, broker)
                            row["runs"].append(figures)
                            status = ", ".join(
                                f"{k}={figures[k]:,.0f}"
                                for k in ("noop_drain_per_s", "io_drain_per_s", "lat_p50_ms")
                            )
                        except e2e.DrainFailed as exc:
                            row["errors"].append(str(exc)[:300])
                            status = f"FAILED: {exc}"[:200]
                        print(
                            f"[rtt {label} ms, run {run + 1}/{runs}] {name:13s} "
                            f"{time.monotonic() - t0:5.1f}s  {status}",
                            file=sys.stderr,
                            flush=True,
                        )
    except KeyboardInterrupt:
        print("interrupted: every host, server and worker has been stopped", file=sys.stderr)
        return 130
    finally:
        owned.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    results["meta"]["elapsed_s"] = time.monotonic() - started
    results["meta"]["quick"] = quick
    results["meta"]["runs"] = runs
    for entry in results["systems"].values():
        for row in entry.values():
            row["median"] = e2e.medians(row["runs"])
    RAW_JSON.parent.mkdir(parents=True, exist_ok=True)
    RAW_JSON.write_text(json.dumps(results, indent=2, default=str))
    plotted = _plot(results, out / PLOT)
    text = render(results, plotted)
    write_generated(out / "benchmarks.md", "rtt", text)
    print(text)
    return 0


def _fig(row: dict, key: str, fmt: str) -> str:
    value = row.get("median", {}).get(key)
    if value is None:
        return "failed" if row.get("errors") else "-"
    return format(value, fmt)


def render(results: dict, plotted: bool) -> str:
    rtts = results["rtts"]
    meta = results["meta"]
    proxy = meta.get("proxy", {})
    at_2ms = meta.get("proxy_at_2ms", {}).get("proxied_us", float("nan"))
    lines = [
        f"Round trip added between the producer/worker hosts and the Redis host (network "
        f"namespaces on one bridge, a delaying proxy in the Redis host; "
        f"{'quick sizes, ' if meta.get('quick') else ''}{meta.get('runs', 1)} run(s), "
        f"{meta.get('elapsed_s', 0):.0f} s). The proxy itself costs "
        f"{proxy.get('proxy_us', float('nan')):.0f} µs a round trip at 0 ms "
        f"(PING {proxy.get('direct_us', float('nan')):.0f} µs direct, "
        f"{proxy.get('proxied_us', float('nan')):.0f} µs through it); "
        f"with 1 ms each way a PING takes {at_2ms / 1000:.2f} ms.",
        "",
        "| system | RTT ms | noop drain /s | vs own 0 ms | 10 ms I/O drain /s | "
        "enqueue-to-start p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in results["systems"].items():
        base = entry.get(str(rtts[0]), {}).get("median", {}).get("noop_drain_per_s")
        if "direct" in entry:
            row = entry["direct"]
            lines.append(
                f"| {name} | 0, no proxy | {_fig(row, 'noop_drain_per_s', ',.0f')} | - | "
                f"{_fig(row, 'io_drain_per_s', ',.0f')} | {_fig(row, 'lat_p50_ms', '.1f')} | "
                f"{_fig(row, 'lat_p99_ms', '.1f')} |"
            )
        for rtt in rtts:
            row = entry.get(str(rtt), {})
            drain = row.get("median", {}).get("noop_drain_per_s")
            ratio = f"{drain / base:.0%}" if drain and base else "-"
            lines.append(
                f"| {name} | {rtt:g} | {_fig(row, 'noop_drain_per_s', ',.0f')} | {ratio} | "
                f"{_fig(row, 'io_drain_per_s', ',.0f')} | {_fig(row, 'lat_p50_ms', '.1f')} | "
                f"{_fig(row, 'lat_p99_ms', '.1f')} |"
            )
    for name, why in results.get("skipped", {}).items():
        lines.append(f"| {name} | - | skipped: {why} | | | | |")
    lines += ["", *_summary(results)]
    if plotted:
        lines += ["", f"![noop and I/O drain against RTT]({PLOT})"]
    return "\n".join(lines)


def _drain(results: dict, name: str, rtt: float, key: str = "noop_drain_per_s") -> float | None:
    return results["systems"].get(name, {}).get(str(rtt), {}).get("median", {}).get(key)


def _summary(results: dict) -> list[str]:
    """At the largest RTT: handoff's noop drain beside the fastest peer's and its own at the
    smallest RTT (the figures the page quotes)."""
    rtts = results["rtts"]
    if len(rtts) < 2 or "handoff" not in results["systems"]:
        return []
    top, low = max(rtts), min(rtts)
    own_top, own_low = _drain(results, "handoff", top), _drain(results, "handoff", low)
    peers = {
        name: _drain(results, name, top)
        for name in results["systems"]
        if not name.startswith("handoff") and _drain(results, name, top)
    }
    if not own_top or not own_low:
        return [f"At {top:g} ms handoff's noop drain did not finish."]
    out = [
        f"At {top:g} ms: handoff drains {own_top:,.0f} noop tasks/s, "
        f"{own_top / own_low:.0%} of its own {low:g} ms figure ({own_low:,.0f}/s)"
    ]
    if peers:
        best = max(peers, key=peers.get)
        out[0] += f"; the fastest peer, {best}, {peers[best]:,.0f}/s ({own_top / peers[best]:.1f}x)"
    pf = _drain(results, "handoff-pf32", top)
    if pf:
        out[0] += f"; with prefetch 32, {pf:,.0f}/s"
    out[0] += "."
    return out


def _plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rtts = results["rtts"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, entry in results["systems"].items():
        for ax, key in zip(axes, ("noop_drain_per_s", "io_drain_per_s"), strict=True):
            ys = [entry.get(str(r), {}).get("median", {}).get(key, float("nan")) for r in rtts]
            ax.plot(rtts, ys, marker="o", label=name)
    for ax, title in zip(axes, ("noop drain (tasks/s)", "10 ms I/O drain (tasks/s)"), strict=True):
        ax.set_xlabel("added RTT (ms)")
        ax.set_title(title)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
