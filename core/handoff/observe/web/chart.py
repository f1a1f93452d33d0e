"""The overview's throughput chart: each agent's tasks/s over the last minutes, as SVG.

Runs in: the dashboard. Samples come from the snapshots the monitor loop takes anyway
(throughput_per_s), so the chart costs no Redis call; the lines are computed here as
SVG point lists and drawn by the template (no script, no chart library).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

WINDOW_S = 300.0  # what the chart shows
SAMPLE_EVERY_S = 2.0  # at most one point per agent this often: 150 points a line
MAX_AGENTS = 12  # lines drawn (the busiest); a legend of 40 agents helps nobody
WIDTH, HEIGHT = 1000.0, 180.0  # the SVG's viewBox
# A palette that stays apart on white and for the common colour-vision deficiencies.
COLOURS = (
    "#2563eb", "#ea580c", "#16a34a", "#9333ea", "#dc2626", "#0891b2",
    "#ca8a04", "#db2777", "#4b5563", "#65a30d", "#7c3aed", "#0d9488",
)  # fmt: skip


@dataclass(frozen=True)
class Line:
    agent: str
    colour: str
    points: str  # "x,y x,y ..." in the viewBox
    last: float  # the latest rate, for the legend


class ThroughputHistory:
    """Per agent (time, tasks/s) samples over WINDOW_S. Fed by the monitor loop's thread,
    read by the page builders' threads: one lock."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._series: dict[str, deque[tuple[float, float]]] = {}
        self._last_sample = float("-inf")

    def add(self, snapshot: dict[str, Any]) -> None:
        now = self._clock()
        if now - self._last_sample < SAMPLE_EVERY_S:
            return
        self._last_sample = now
        with self._lock:
            for name, figures in snapshot.get("agents", {}).items():
                series = self._series.setdefault(name, deque())
                series.append((now, float(figures.get("throughput_per_s", 0.0))))
            for name in list(self._series):
                series = self._series[name]
                while series and now - series[0][0] > WINDOW_S:
                    series.popleft()
                if not series:
                    del self._series[name]

    def lines(self) -> tuple[list[Line], float]:
        """The lines to draw and the y axis' top (tasks/s: 1, 2 or 5 x 10^n)."""
        now = self._clock()
        with self._lock:
            series = {name: list(points) for name, points in self._series.items()}
        busiest = sorted(series, key=lambda n: (-max(r for _, r in series[n]), n))[:MAX_AGENTS]
        peak = max((r for name in busiest for _, r in series[name]), default=0.0)
        top = nice_top(peak)
        lines = []
        for index, name in enumerate(sorted(busiest)):
            points = " ".join(
                f"{WIDTH * (1 - (now - t) / WINDOW_S):.1f},{HEIGHT * (1 - r / top):.1f}"
                for t, r in series[name]
            )
            lines.append(Line(name, COLOURS[index % len(COLOURS)], points, series[name][-1][1]))
        return lines, top


def nice_top(peak: float) -> float:
    """The smallest of 1, 2, 5 x 10^n at or above peak (at least 1 task/s)."""
    top = 1.0
    while top < peak:
        for step in (2.0, 2.5, 2.0):  # 1 -> 2 -> 5 -> 10 -> 20 ...
            top *= step
            if top >= peak:
                break
    return top


def gridlines(top: float) -> list[float]:
    """The y values to label: a quarter of 2 x 10^n, a fifth of 1 or 5 x 10^n."""
    parts = 4 if f"{top:g}".lstrip("0.").startswith("2") else 5
    return [top * i / parts for i in range(parts + 1)]
