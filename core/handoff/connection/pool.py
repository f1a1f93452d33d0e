"""The connection pool: redis-py's BlockingConnectionPool plus lifecycle and metrics.

Runs in: every process, built after fork. Adds what the pool manager's contract asks of a pool:
warming to min_idle_conns, rotation of connections older than max_conn_age_s,
closing connections idle past idle_timeout_s (never below min_idle_conns), and the
hit/miss/timeout counters. PoolTimeout is the wait for a free connection; a caller
that waits longer gets PoolExhausted (not retried: more retries would only queue more).
"""

from __future__ import annotations

import threading
import time

import redis
import redis.exceptions as rex

from handoff.connection.pool_metrics import MetricsRecorder
from handoff.errors import PoolExhausted

_CONNECTED_AT = "_handoff_connected_at"
_RELEASED_AT = "_handoff_released_at"


def connect_together(connections: list) -> int:
    """Connect every connection at once, one thread each but the first; returns how many
    connected, or raises the first failure once all have tried. Why: each connect is a TCP
    handshake plus HELLO and CLIENT SETNAME, three round trips; one after another, a worker
    far from its server (250 ms away) spent seconds warming five before its first claim."""
    failures: list[BaseException] = []

    def connect(connection) -> None:
        try:
            connection.connect()
        except Exception as e:  # raised below, after every connection has tried
            failures.append(e)

    helpers = [threading.Thread(target=connect, args=(c,), daemon=True) for c in connections[1:]]
    for helper in helpers:
        helper.start()
    if connections:
        connect(connections[0])
    for helper in helpers:
        helper.join()
    if failures:
        raise failures[0]
    return len(connections)


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
        # Set by _on_connect on the thread that opened a socket: a checkout that had to
        # connect (a new slot, or one closed by rotation or reaping) is a miss, not a hit.
        self._connected_here = threading.local()
        super().__init__(**kwargs)

    def __repr__(self) -> str:
        # Never the connection kwargs: older redis-py versions print the password with them.
        kw = self.connection_kwargs
        target = kw.get("path") or f"{kw.get('host')}:{kw.get('port')}"
        return (
            f"<{type(self).__name__} {target} db={kw.get('db', 0)} "
            f"pool_size={self.max_connections}>"
        )

    # -- lifecycle hooks -------------------------------------------------------------------

    def make_connection(self):
        connection = super().make_connection()
        connection.register_connect_callback(self._on_connect)
        return connection

    def _on_connect(self, connection) -> None:
        setattr(connection, _CONNECTED_AT, time.monotonic())
        self._connected_here.flag = True

    def get_connection(self, command_name=None, *keys, **options):
        self._connected_here.flag = False
        try:
            connection = super().get_connection()
        except rex.ConnectionError as e:
            if str(e) == "No connection available.":
                self.recorder.count("timeouts")
                raise PoolExhausted(
                    f"no free Redis connection within pool_timeout_s={self.timeout:g} "
                    f"(pool_size={self.max_connections})"
                ) from None
            raise
        self.recorder.count("misses" if self._connected_here.flag else "hits")
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
        """Open connections until min_idle_conns idle ones are connected; returns how many opened.

        Only free slots are used and nothing waits: connections busy with callers are
        never waited for (a busy pool needs no warming), so warming can neither block the
        maintenance thread for pool_timeout_s nor count a timeout or a miss of its own.
        The slots being connected are out of the queue meanwhile, so no caller can take
        one half-open; every other idle connection stays available (and counted).
        """
        self._checkpid()
        slots = self._take_unconnected_slots()
        try:
            for index, slot in enumerate(slots):
                slots[index] = slot if slot is not None else self.make_connection()
            return connect_together(slots)
        finally:
            now = time.monotonic()
            for connection in slots:
                if connection is not None:
                    setattr(connection, _RELEASED_AT, now)
                self.pool.put_nowait(connection)

    def _take_unconnected_slots(self) -> list:
        """Remove from the queue the free slots (None or closed) warming needs; never blocks."""
        with self.pool.mutex:  # the Queue's own lock: get/put wait on it, nothing else
            items = self.pool.queue  # a list for a LifoQueue; the top is the end
            need = self.min_idle_conns - sum(1 for c in items if c is not None and c.is_connected)
            slots = []
            for index in range(len(items) - 1, -1, -1):
                if len(slots) >= need:
                    break
                item = items[index]
                if item is None or not item.is_connected:
                    slots.append(items.pop(index))
            return slots

    def reap_idle(self) -> int:
        """Close idle connections past idle_timeout_s or max_conn_age_s, keeping min_idle_conns.

        Runs under the queue's lock, so no caller can take a connection while it is being
        closed; closed ones stay in their slot and reconnect when next taken. Closing a
        socket does not wait on the network, so callers are held up for microseconds.
        """
        self._checkpid()
        now = time.monotonic()
        with self.pool.mutex:
            connected = [c for c in self.pool.queue if c is not None and c.is_connected]
            # Most recently used first: the ones idle longest are the ones to close.
            connected.sort(key=lambda c: getattr(c, _RELEASED_AT, now), reverse=True)
            victims = [
                c
                for index, c in enumerate(connected)
                if (index >= self.min_idle_conns and self._idle_too_long(c, now))
                or self._too_old(c, now)
            ]
            for connection in victims:
                connection.disconnect()
        self.recorder.count("stale_conns", len(victims))
        return len(victims)

    def _idle_too_long(self, connection, now: float) -> bool:
        idle_for = now - getattr(connection, _RELEASED_AT, now)
        return self.idle_timeout_s > 0 and idle_for > self.idle_timeout_s

    # -- figures ---------------------------------------------------------------------------

    def connected_count(self) -> int:
        return sum(1 for c in list(self._connections) if c.is_connected)

    def idle_connected_count(self) -> int:
        return sum(1 for c in list(self.pool.queue) if c is not None and c.is_connected)
