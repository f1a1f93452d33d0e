"""How many tasks a worker should hold beyond its free slots.

Runs in: a worker process. Enough tasks must wait locally to keep every slot busy while
one claim round trip is in flight: about max_concurrent x (round-trip time / task time).
A noop agent needs many (tasks take microseconds, a round trip a few hundred), a 10 ms
agent needs the configured floor. Both times are tracked as moving averages.
"""

from __future__ import annotations

import math

SMOOTHING = 0.2  # weight of the newest sample in each moving average


class PrefetchSizer:
    def __init__(self, max_concurrent: int, floor: int, ceiling: int) -> None:
        self.max_concurrent = max_concurrent
        self.floor = floor
        self.ceiling = max(floor, ceiling)
        self.task_s: float | None = None
        self.round_trip_s: float | None = None

    def observe_task(self, seconds: float) -> None:
        self.task_s = _ewma(self.task_s, seconds)

    def observe_round_trip(self, seconds: float) -> None:
        self.round_trip_s = _ewma(self.round_trip_s, seconds)

    @property
    def prefetch(self) -> int:
        if not self.task_s or not self.round_trip_s:
            return self.floor
        wanted = math.ceil(2 * self.max_concurrent * self.round_trip_s / self.task_s)
        return max(self.floor, min(self.ceiling, wanted))

    @property
    def capacity(self) -> int:
        return self.max_concurrent + self.prefetch


def _ewma(current: float | None, sample: float) -> float:
    return sample if current is None else current + SMOOTHING * (sample - current)
