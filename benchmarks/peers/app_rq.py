"""RQ benchmark jobs. Runs in: RQ work horses (forked per job; BENCH_PROBE_INLINE=1)."""

import time

import bench_probe


def noop(sent, lat):
    bench_probe.finished("noop", bench_probe.started(sent, lat))


def io(sent, lat):
    start = bench_probe.started(sent, lat)
    time.sleep(0.01)
    bench_probe.finished("io", start)
