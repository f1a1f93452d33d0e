"""Say a Redis outage once when it starts, now and then while it lasts, once when it ends.

Runs in: workers (main thread, waker, lease keeper share one; the heartbeat has its own).
A failover can take tens of seconds; a worker keeps trying all along (capped backoff), and
without this it would log one line per failed call and thread. A server at its memory
limit is not down: that outage is named for what it is. While its process is stopping
(`stopping()` says so) the outage is said at INFO: a server that stops with it, as
honcho's Ctrl-C stops every process at once, is expected, not an error. Thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from handoff.errors import ServerOutOfMemory


class OutageLog:
    def __init__(
        self,
        log: logging.Logger,
        who: str,
        repeat_every_s: float = 10.0,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.log = log
        self.stopping = stopping
        self.who = who
        self.repeat_every_s = repeat_every_s
        self._lock = threading.Lock()
        self._since: float | None = None  # monotonic start of the current outage
        self._last_said = 0.0
        self._failures = 0
        self._out_of_memory = False  # what the current outage is

    def failed(self, what: str, error: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            self._failures += 1
            if self._since is None:
                self._since = self._last_said = now
                self._out_of_memory = isinstance(error, ServerOutOfMemory)
                level = logging.INFO if self.stopping() else logging.ERROR
                self.log.log(level, "%s: %s failed: %s (retrying)", self.who, what, error)
            elif now - self._last_said >= self.repeat_every_s:
                self._last_said = now
                state = "out of memory" if self._out_of_memory else "failing"
                self.log.log(
                    logging.INFO if self.stopping() else logging.ERROR,
                    "%s: Redis still %s after %.0fs (%d failed calls); last: %s failed: %s",
                    self.who, state, now - self._since, self._failures, what, error,
                )  # fmt: skip

    def recovered(self) -> None:
        if self._since is None:  # the common case: no lock, nothing to say
            return
        with self._lock:
            if self._since is None:
                return
            lasted = time.monotonic() - self._since
            state = "accepts writes" if self._out_of_memory else "reachable"
            self.log.warning(
                "%s: Redis %s again after %.1fs (%d failed calls)",
                self.who, state, lasted, self._failures,
            )  # fmt: skip
            self._since = None
            self._failures = 0


def not_ready_reason(error: BaseException) -> str | None:
    """Why a server that is starting refused a call, or None when the error is another."""
    if isinstance(error, redis.BusyLoadingError):
        return "loading its data set"
    if isinstance(error, FileNotFoundError | ConnectionRefusedError):
        return "not listening yet"
    if isinstance(error, redis.ConnectionError):
        text = str(error)
        if "No such file" in text or "Connection refused" in text or "Error 111" in text:
            return "not listening yet"
        if "loading" in text.lower():
            return "loading its data set"
    return None
