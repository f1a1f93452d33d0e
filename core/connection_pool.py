"""The connection pool: redis-py's BlockingConnectionPool plus lifecycle and metrics.

Runs in: every process, built after fork. Adds what the seed asks of a pool:
warming to min_idle_conns, rotation of connections older than max_conn_age_s,
closing connections idle past idle_timeout_s (never below min_idle_conns), and the
hit/miss/timeout counters. PoolTimeout is the wait for a free connection; a caller
that waits longer gets PoolExhausted (not retried: more retries would only queue more).
"""

from __future__ import annotations

import threading
import time
from queue import Empty

import redis
import redis.exceptions as rex

from core.errors import PoolExhausted
from core.pool_metrics import MetricsRecorder

_CONNECTED_AT = "_handoff_connected_at"
_RELEASED_AT = "_handoff_released_at"


class ManagedConnectionPool(redis.BlockingConnectionPool):
    def __init__(
        self,
        *,
        max_conn_age_s: float,
        idle_timeout_s: float,
        min_idle_conns: int,
        recorder: MetricsRecorder,
        **kwargs,
    ) -> None:
        self.max_conn_age_s = max_conn_age_s
        self.idle_timeout_s = idle_timeout_s
        self.min_idle_conns = min_idle_conns
        self.recorder = recorder
        self._made_here = threading.local()
        super().__init__(**kwargs)

    # -- lifecycle hooks -------------------------------------------------------------------

    def make_connection(self):
        connection = super().make_connection()
        connection.register_connect_callback(self._on_connect)
        self._made_here.flag = True
        return connection

    def _on_connect(self, connection) -> None:
        setattr(connection, _CONNECTED_AT, time.monotonic())

    def get_connection(self, command_name=None, *keys, **options):
        self._made_here.flag = False
        try:
            connection = super().get_connection()
        except rex.ConnectionError as e:
            if str(e) == "No connection available.":
                self.recorder.count("timeouts")
                raise PoolExhausted(
                    f"no free Redis connection within pool_timeout_s={self.timeout} "
                    f"(pool_size={self.max_connections})"
                ) from None
            raise
        self.recorder.count("misses" if self._made_here.flag else "hits")
        return connection

    def release(self, connection) -> None:
        if self._too_old(connection, time.monotonic()):
            connection.disconnect()
            self.recorder.count("stale_conns")
        setattr(connection, _RELEASED_AT, time.monotonic())
        super().release(connection)

    def _too_old(self, connection, now: float) -> bool:
        connected_at = getattr(connection, _CONNECTED_AT, None)
        return (
            self.max_conn_age_s > 0
            and connected_at is not None
            and connection.is_connected
            and now - connected_at > self.max_conn_age_s
        )

    # -- maintenance (called by the manager's housekeeping thread) -------------------------

    def warm(self) -> int:
        """Make sure min_idle_conns connections are open and idle; returns how many were checked."""
        if self.idle_connected_count() >= self.min_idle_conns:
            return 0
        taken = []
        try:
            for _ in range(self.min_idle_conns):
                taken.append(self.get_connection())
        finally:
            for connection in taken:
                self.release(connection)
        return len(taken)

    def reap_idle(self) -> int:
        """Close idle connections past idle_timeout_s or max_conn_age_s, keeping min_idle_conns.

        Idle connections are taken out of the queue one by one (so no other thread can
        pick up a connection while we close it) and put back afterwards.
        """
        self._checkpid()
        now = time.monotonic()
        idle: list = []
        while True:
            try:
                item = self.pool.get_nowait()
            except Empty:
                break
            idle.append(item)
        closed = 0
        connected = [c for c in idle if c is not None and c.is_connected]
        keep = self.min_idle_conns
        # Newest first: the oldest idle connections are the ones to close.
        connected.sort(key=lambda c: getattr(c, _RELEASED_AT, now), reverse=True)
        for index, connection in enumerate(connected):
            idle_for = now - getattr(connection, _RELEASED_AT, now)
            expired = self.idle_timeout_s > 0 and idle_for > self.idle_timeout_s
            if (expired and index >= keep) or self._too_old(connection, now):
                connection.disconnect()
                closed += 1
        self.recorder.count("stale_conns", closed)
        for item in reversed(idle):  # reversed: the LIFO order is kept
            self.pool.put_nowait(item)
        return closed

    # -- figures ---------------------------------------------------------------------------

    def connected_count(self) -> int:
        return sum(1 for c in list(self._connections) if c.is_connected)

    def idle_connected_count(self) -> int:
        return sum(1 for c in list(self.pool.queue) if c is not None and c.is_connected)
