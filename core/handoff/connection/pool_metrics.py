"""RedisPoolMetrics and HealthStatus: the pool manager's two records, kept per process.

Runs in: every process that talks to Redis. Counters are updated from many threads;
a plain lock is cheaper than it sounds next to a network round trip.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass


@dataclass
class HealthStatus:
    is_healthy: bool = True
    last_health_check: float = 0.0  # unix time
    last_successful_ping: float = 0.0  # unix time
    consecutive_failures: int = 0
    last_error: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class RedisPoolMetrics:
    total_conns: int = 0
    idle_conns: int = 0
    stale_conns: int = 0
    hits: int = 0
    misses: int = 0
    timeouts: int = 0
    avg_latency_ms: float = 0.0
    max_latency_ms: float = 0.0
    total_requests: int = 0
    failed_requests: int = 0
    memory_usage_bytes: int = 0
    pipeline_hits: int = 0
    batch_operations: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class MetricsRecorder:
    """Thread-safe counters behind RedisPoolMetrics (connection counts are read live)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.timeouts = 0
        self.stale_conns = 0
        self.total_requests = 0
        self.failed_requests = 0
        self.pipeline_hits = 0
        self.batch_operations = 0
        self.memory_usage_bytes = 0
        self._latency_total_s = 0.0
        self._latency_max_s = 0.0

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def request(self, elapsed_s: float, ok: bool, *, pipelined_ops: int = 0) -> None:
        with self._lock:
            self.total_requests += 1
            if not ok:
                self.failed_requests += 1
            self._latency_total_s += elapsed_s
            if elapsed_s > self._latency_max_s:
                self._latency_max_s = elapsed_s
            if pipelined_ops:
                self.pipeline_hits += 1
                self.batch_operations += pipelined_ops

    def snapshot(self, *, total_conns: int, idle_conns: int) -> RedisPoolMetrics:
        with self._lock:
            avg = self._latency_total_s / self.total_requests if self.total_requests else 0.0
            return RedisPoolMetrics(
                total_conns=total_conns,
                idle_conns=idle_conns,
                stale_conns=self.stale_conns,
                hits=self.hits,
                misses=self.misses,
                timeouts=self.timeouts,
                avg_latency_ms=avg * 1000.0,
                max_latency_ms=self._latency_max_s * 1000.0,
                total_requests=self.total_requests,
                failed_requests=self.failed_requests,
                memory_usage_bytes=self.memory_usage_bytes,
                pipeline_hits=self.pipeline_hits,
                batch_operations=self.batch_operations,
            )


class HealthTracker:
    """Owns the HealthStatus; fed by the health checker's pings and by failed calls."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status = HealthStatus()

    def success(self) -> None:
        now = time.time()
        with self._lock:
            s = self._status
            s.is_healthy = True
            s.last_health_check = now
            s.last_successful_ping = now
            s.consecutive_failures = 0

    def failure(self, error: str) -> None:
        with self._lock:
            s = self._status
            s.is_healthy = False
            s.last_health_check = time.time()
            s.consecutive_failures += 1
            s.last_error = error

    def is_healthy_fast(self) -> bool:
        """Lock-free read for the hot path (a bool read is atomic under the GIL)."""
        return self._status.is_healthy

    def snapshot(self) -> HealthStatus:
        with self._lock:
            return HealthStatus(**asdict(self._status))
