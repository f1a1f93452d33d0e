"""A fast lane for one-command calls: a few connections kept out of the pool.

Runs in: every process, inside its RedisManager (server and Sentinel modes). A single
enqueue is one EVALSHA, and on a local server most of its client-side time went to
redis-py's layers around the socket: the blocking pool's locks, its liveness poll and
bookkeeping on every checkout and release, and the client's per-command wrappers. The
lane takes up to `size` connections from the pool once and keeps them: a checkout is a
list pop, and the command is packed and sent on the socket directly. When every lane
connection is busy, the caller uses the pool as before, so the lane never waits and
never holds more than `size` of pool_size. The manager's retry, breaker and metrics wrap
lane calls exactly as they wrap the others (see RedisManager.execute_command).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis.exceptions as rex

NOT_TAKEN = object()  # lane full: use the pool

try:  # hiredis packs a command in one call (redis-py's packer checks each argument first)
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # hiredis is a dependency; without it, redis-py's packer
    _hiredis_pack = None


class CommandLane:
    """Up to size pooled connections, kept for single commands (list pop/append)."""

    def __init__(self, pool: Any, size: int) -> None:
        self._pool = pool
        self._size = size
        self._idle: list[Any] = []
        self._taken = 0
        self._lock = threading.Lock()

    def call(self, *args: Any) -> Any:
        """The reply to one command, or NOT_TAKEN when every lane connection is busy.

        An error reply is raised (the connection stays, it is fine); any other failure
        drops the socket first (it may hold half a reply): the next call reconnects."""
        replies = self.call_all([args])
        return replies if replies is NOT_TAKEN else replies[0]

    def call_all(self, commands: list[tuple]) -> Any:
        """Raw replies to commands sent as one packet (exchange), or NOT_TAKEN when every
        lane connection is busy. An idle worker's blocking pop and the claim behind it
        come here too: a pool checkout and release would sit between its reply and the
        handler's start."""
        try:
            connection = self._idle.pop()  # atomic: no lock on the way
        except IndexError:
            connection = self._grow()
            if connection is None:
                return NOT_TAKEN
        try:
            if self._stale(connection):
                connection.disconnect()  # rotated like the pool's (max_conn_age_s)
            return exchange(connection, commands)
        finally:
            self._idle.append(connection)

    def _grow(self) -> Any:
        with self._lock:
            if self._taken >= self._size:
                return None
            self._taken += 1
        try:
            return self._pool.get_connection()
        except BaseException:
            with self._lock:
                self._taken -= 1
            raise

    def _stale(self, connection: Any) -> bool:
        too_old = getattr(self._pool, "_too_old", None)
        return too_old is not None and too_old(connection, time.monotonic())


def call_all(pool: Any, commands: list[tuple]) -> list:
    """Replies to commands written as one packet on one pooled connection, read in order
    (raw: no response callbacks): a pipeline without redis-py's layers (when the lane is
    busy)."""
    connection = pool.get_connection()
    try:
        return exchange(connection, commands)
    finally:
        pool.release(connection)


def exchange(connection: Any, commands: list[tuple]) -> list:
    """Write commands as one packet and read their raw replies in order. An error reply is
    raised once every reply is read (the connection stays usable); any other failure drops
    the socket first (it may hold half a reply): the next use reconnects."""
    try:
        # connect() as the pool would: a no-op when connected; a Sentinel connection asks
        # the sentinels for the primary here (sending would reconnect to the old one).
        connection.connect()
        if _hiredis_pack is not None:
            packed = [_hiredis_pack(command) for command in commands]
        else:
            packed = connection.pack_commands(commands)
        connection.send_packed_command(packed, check_health=False)
        replies, error = [], None
        for _ in commands:
            try:
                replies.append(connection.read_response())
            except rex.ResponseError as e:
                replies.append(e)
                error = error or e
        if error is not None:
            raise error
        return replies
    except rex.ResponseError:
        raise
    except BaseException:
        connection.disconnect()
        raise
