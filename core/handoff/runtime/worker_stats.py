"""A worker's own figures, and the health hash it writes every heartbeat.

Runs in: a worker process. Counters are bumped by the main thread only; the heartbeat
thread reads them (int reads are atomic under the GIL).
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from typing import Any

import orjson
import psutil

from handoff.connection.manager import RedisManager


class WorkerStats:
    def __init__(self) -> None:
        self.started = time.time()
        self.processed = 0
        self.failed = 0
        self.retried = 0
        self.cancelled = 0  # held tasks cancelled while this worker had them
        self.recycle_reason = ""  # why this worker is being replaced (shown while it drains)
        self.handed_off = 0
        self.stale = 0
        self.last_claim_at = 0.0
        self.last_ack_at = 0.0
        self.latencies_s: deque[float] = deque(maxlen=2048)
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # prime: the next call measures since now

    def percentile_ms(self, q: float) -> float:
        data = sorted(self.latencies_s)
        if not data:
            return 0.0
        return data[min(len(data) - 1, int(q * len(data)))] * 1000.0

    def rss_mb(self) -> float:
        return self._process.memory_info().rss / (1024 * 1024)

    def health_fields(
        self,
        *,
        worker_id: str,
        agent: str,
        state: str,
        in_flight: int,
        max_concurrent: int,
        global_limit: int | None,
        manager: RedisManager,
    ) -> dict[str, Any]:
        """The worker's health hash (flat strings; pool and health as JSON)."""
        health = manager.get_health().as_dict()
        return {
            "id": worker_id,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "agent": agent,
            "state": state,
            "started": round(self.started, 3),
            "heartbeat_at": round(time.time(), 3),
            "processed": self.processed,
            "failed": self.failed,
            "retried": self.retried,
            "cancelled": self.cancelled,
            "recycle_reason": self.recycle_reason,
            "handed_off": self.handed_off,
            "stale_acks": self.stale,
            "in_flight": in_flight,
            "max_concurrent": max_concurrent,
            "global_limit": global_limit or 0,
            "last_claim_at": round(self.last_claim_at, 3),
            "last_ack_at": round(self.last_ack_at, 3),
            "latency_p50_ms": round(self.percentile_ms(0.5), 3),
            "latency_p95_ms": round(self.percentile_ms(0.95), 3),
            "rss_mb": round(self.rss_mb(), 2),
            "cpu_percent": round(self._process.cpu_percent(None), 1),
            "pool": orjson.dumps(manager.get_pool_stats()),
            "redis_health": orjson.dumps(health),
            "redis_healthy": int(bool(health["is_healthy"])),
        }
