"""One exponential backoff: base * 2**(n-1), capped, with the jitter each caller needs.

Used by the Redis retry policy, a task's retry delay, the supervisor's crash backoff, the
worker's outage backoff and the client's result polling; they differ only in base, cap
and jitter. Layer 0: imports nothing from handoff.
"""

from __future__ import annotations

import random
from typing import Literal

Jitter = Literal["none", "add", "half"]


def exponential_s(attempt: int, base_s: float, cap_s: float, jitter: Jitter = "none") -> float:
    """The wait before attempt `attempt` (1 = the first wait), in seconds.

    jitter "add": plus up to base_s, then capped, so a wait is never shorter than the one
    before (the doubling outgrows the jitter); "half": a uniform [0.5, 1) share of the
    capped wait, which spreads many tasks retried together.
    """
    wait = base_s * 2.0 ** min(max(attempt, 1) - 1, 64)  # bounded: no float overflow
    if jitter == "add":
        return min(wait + random.uniform(0.0, base_s), cap_s)
    wait = min(wait, cap_s)
    return wait * (0.5 + random.random() / 2) if jitter == "half" else wait


class Backoff:
    """Consecutive failures and the wait they call for; reset() after a success."""

    def __init__(self, base_s: float, cap_s: float, jitter: Jitter = "none") -> None:
        self.base_s, self.cap_s, self.jitter = base_s, cap_s, jitter
        self.failures = 0

    def next_s(self) -> float:
        """Count one more failure and return the wait it calls for."""
        self.failures += 1
        return exponential_s(self.failures, self.base_s, self.cap_s, self.jitter)

    def current_s(self) -> float:
        """The wait the last failure called for (0 when there is none), without jitter."""
        return exponential_s(self.failures, self.base_s, self.cap_s) if self.failures else 0.0

    def reset(self) -> None:
        self.failures = 0
