"""How a supervisor sees that its workers are alive: each child's pulse, and the checks its
main loop runs over them (stalled, overstaying a stop, over its memory).

Runs in: the supervisor's main loop (the checks, Child), and each worker's pulse thread
(Pulse.beat). A pulse is a few bytes of memory shared across the fork (an anonymous
shared mmap, made before the fork): the worker's own thread writes the time, the
supervisor reads it. No Redis in between, so an outage or a full server never makes a
healthy worker look stalled; and the writer is a Python thread, so a worker whose
interpreter is wedged (a C call holding the GIL, a deadlock) stops beating: gunicorn's
arbiter sees its workers the same way (a file each touches), and kills the silent ones.
"""

from __future__ import annotations

import mmap
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import psutil

_STAMP = struct.Struct("d")  # time.monotonic(): one clock for every process of the host


def beat_every_s(stall_s: float) -> float:
    """How often a worker beats: 4 times within the stall bound, at least once a second."""
    return min(1.0, stall_s / 4) if stall_s else 1.0


class Pulse:
    """One worker's last sign of life, shared with its supervisor."""

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, _STAMP.size)  # anonymous, MAP_SHARED: seen across fork
        self.beat()

    def beat(self) -> None:
        self._map[: _STAMP.size] = _STAMP.pack(time.monotonic())

    def age_s(self) -> float:
        return time.monotonic() - _STAMP.unpack(self._map[: _STAMP.size])[0]

    def close(self) -> None:
        self._map.close()


@dataclass
class Child:
    pid: int
    agent: str
    generation: int
    started: float
    pulse: Pulse = field(repr=False)
    stop_sent_at: float | None = None
    stalled: bool = False  # killed for not beating: its exit counts as a crash
    number: int = 1  # `handoff worker AGENT #N` in ps (process_title)


def stalled(children: Iterable[Child], bound_s: float) -> list[tuple[Child, float]]:
    """Running children (no stop sent) whose pulse is older than bound_s, with its age."""
    if not bound_s:
        return []
    out = []
    for child in children:
        if child.stop_sent_at is None:
            age = child.pulse.age_s()
            if age > bound_s:
                out.append((child, age))
    return out


def overstaying(children: Iterable[Child], limit_s: float, now: float) -> list[Child]:
    """Children sent a stop more than limit_s ago and still not gone."""
    return [c for c in children if c.stop_sent_at is not None and now - c.stop_sent_at > limit_s]


def over_rss(children: Iterable[Child], limit_mb: float) -> list[tuple[Child, float]]:
    """Running children whose resident memory is over limit_mb, with it (0: no limit)."""
    if not limit_mb:
        return []
    out = []
    for child in children:
        if child.stop_sent_at is not None:
            continue
        try:
            rss_mb = psutil.Process(child.pid).memory_info().rss / (1024 * 1024)
        except psutil.Error:
            continue
        if rss_mb > limit_mb:
            out.append((child, rss_mb))
    return out
