"""What every benchmark handler calls: counts, first start, last end, start latencies.

Runs in: the worker processes of every benchmarked system (imported as the top-level
module `bench_probe`, with this folder on PYTHONPATH, so a peer's worker never imports
handoff's `core` package), and in the benchmark process (StatsReader).

A start gate keeps worker boot out of every measurement: the first task in each process
registers the pid (bench:ready) and waits until the benchmark sets bench:go, which it does
once all the system's task-running processes have registered.

The hot path is a lock, a counter and time.time(): no I/O per task. A daemon thread per
process publishes the counters to the separate stats server every 5 ms (HSET per pid), and
the latency samples as they come (RPUSH). Systems that fork a process per task (RQ) set
BENCH_PROBE_INLINE=1: each task then writes its own span before the process exits.

Stats keys (on the stats server, never on the server being measured):
  bench:<kind>        HASH pid -> "count first_start last_end"
  bench:<kind>:spans  LIST "start end" (inline mode)
  bench:lat           LIST start - sent, in seconds
  bench:ready / bench:go   SET of pids that wait at the gate / the go flag
"""

from __future__ import annotations

import os
import threading
import time

FLUSH_INTERVAL_S = 0.005
GATE_TIMEOUT_S = 60.0
_lock = threading.Lock()
_pid = -1
_counts: dict[str, list[float]] = {}  # kind -> [count, first_start, last_end]
_lat: list[float] = []
_client = None
_go = False
_inline = os.environ.get("BENCH_PROBE_INLINE") == "1"


def _stats_client():
    global _client
    if _client is None:
        import redis

        _client = redis.Redis.from_url(os.environ["BENCH_STATS_URL"], socket_timeout=5)
    return _client


def _ensure_process() -> None:
    """First call in a process (or after fork): reset and start the flusher thread."""
    global _pid, _client, _go
    _pid = os.getpid()
    _counts.clear()
    _lat.clear()
    _client = None
    _go = False
    if not _inline:
        threading.Thread(target=_flush_loop, name="bench-probe", daemon=True).start()


def started(sent: float, lat: int) -> float:
    """Call first thing in a handler; returns the start time (seconds since the epoch)."""
    if not _go or _pid != os.getpid():
        with _lock:
            if _pid != os.getpid():
                _ensure_process()
            if not _go:
                _wait_at_gate()
    now = time.time()
    if lat:
        _lat.append(now - sent)
    return now


def _wait_at_gate() -> None:
    global _go
    client = _stats_client()
    client.sadd("bench:ready", os.getpid())
    deadline = time.monotonic() + GATE_TIMEOUT_S
    while not client.exists("bench:go") and time.monotonic() < deadline:
        time.sleep(0.001)
    _go = True


def finished(kind: str, start: float) -> None:
    """Call last thing in a handler."""
    end = time.time()
    if _inline:
        _publish_inline(kind, start, end)
        return
    with _lock:
        entry = _counts.get(kind)
        if entry is None:
            _counts[kind] = [1, start, end]
        else:
            entry[0] += 1
            entry[2] = end


def _publish_inline(kind: str, start: float, end: float) -> None:
    pipe = _stats_client().pipeline(transaction=False)
    pipe.rpush(f"bench:{kind}:spans", f"{start!r} {end!r}")
    if _lat:
        pipe.rpush("bench:lat", *_lat)
        _lat.clear()
    pipe.execute()


def _flush_loop() -> None:
    sent: dict[str, float] = {}
    pid = str(os.getpid())
    while True:
        time.sleep(FLUSH_INTERVAL_S)
        with _lock:
            snapshot = {k: list(v) for k, v in _counts.items() if v[0] != sent.get(k)}
            lat = _lat[:]
            del _lat[: len(lat)]
        if not snapshot and not lat:
            continue
        try:
            pipe = _stats_client().pipeline(transaction=False)
            for kind, (count, first, last) in snapshot.items():
                pipe.hset(f"bench:{kind}", pid, f"{count} {first!r} {last!r}")
            if lat:
                pipe.rpush("bench:lat", *lat)
            pipe.execute()
        except Exception:  # the stats server went away: the benchmark is ending
            return
        for kind, (count, _first, _last) in snapshot.items():
            sent[kind] = count


class StatsReader:
    """Runs in: the benchmark process. Reads what the probes published."""

    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=5)

    def reset(self) -> None:
        self.client.flushall()

    def ready(self) -> int:
        """How many processes wait at the gate."""
        return int(self.client.scard("bench:ready"))

    def open_gate(self) -> float:
        """Let every waiting handler start; returns the time it opened."""
        opened = time.time()
        self.client.set("bench:go", 1)
        return opened

    def progress(self, kind: str) -> tuple[int, float, float, set[int]]:
        """(tasks finished, first start, last end, pids that ran tasks) for one kind."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(f"bench:{kind}")
        pipe.lrange(f"bench:{kind}:spans", 0, -1)
        per_pid, spans = pipe.execute()
        count, first, last, pids = 0, float("inf"), 0.0, set()
        for pid, value in per_pid.items():
            n, f, la = value.split()
            count += int(n)
            first = min(first, float(f))
            last = max(last, float(la))
            pids.add(int(pid))
        for span in spans:
            f, la = span.split()
            count += 1
            first = min(first, float(f))
            last = max(last, float(la))
        return count, first, last, pids

    def count(self, kind: str) -> int:
        pipe = self.client.pipeline(transaction=False)
        pipe.hvals(f"bench:{kind}")
        pipe.llen(f"bench:{kind}:spans")
        values, spans = pipe.execute()
        return sum(int(v.split()[0]) for v in values) + int(spans)

    def latencies(self) -> list[float]:
        return [float(v) for v in self.client.lrange("bench:lat", 0, -1)]

    def latency_count(self) -> int:
        return int(self.client.llen("bench:lat"))
