"""A circuit breaker: stop hammering a Redis that is down.

closed --(threshold consecutive failures)--> open --(cool-down)--> half-open
half-open lets one probe through: success closes, failure re-opens, and a probe that
ends without a verdict (an error that says nothing about the server) frees the slot
for the next caller. The clock is a seam so tests can drive it.

Runs in: every process (one breaker per RedisManager).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from handoff.errors import CircuitOpen

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self.times_opened = 0

    @property
    def state(self) -> str:
        with self._lock:
            if self._state == OPEN and self._clock() - self._opened_at >= self.cooldown_s:
                return HALF_OPEN
            return self._state

    def before_call(self) -> bool:
        """Raise CircuitOpen when calls must fail fast; admit one probe when half-open.

        Returns True for that probe, so the caller can look for the server afresh first.
        """
        with self._lock:
            if self._state == CLOSED:
                return False
            remaining = self.cooldown_s - (self._clock() - self._opened_at)
            if self._state == OPEN and remaining > 0:
                raise CircuitOpen(f"Redis circuit breaker open; next probe in {remaining:.1f}s")
            if self._probe_in_flight:
                raise CircuitOpen("Redis circuit breaker half-open; a probe is in flight")
            self._state = HALF_OPEN
            self._probe_in_flight = True
            return True

    def on_success(self) -> None:
        with self._lock:
            self._state = CLOSED
            self._failures = 0
            self._probe_in_flight = False

    def release_probe(self) -> None:
        """A call ended without saying whether the server is up: let the next call probe."""
        with self._lock:
            self._probe_in_flight = False

    def on_failure(self) -> None:
        with self._lock:
            self._failures += 1
            self._probe_in_flight = False
            if self._state == HALF_OPEN or self._failures >= self.failure_threshold:
                if self._state != OPEN:
                    self.times_opened += 1
                self._state = OPEN
                self._opened_at = self._clock()
