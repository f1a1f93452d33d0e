"""Start-rate limits: "10/s", "600/min", "5000/h", held in the claim script.

Runs in: workers (their agents' declared limits go with each claim), operators
(`handoff limits`). Pure: no Redis here.

The claim admits tasks by GCRA (the generic cell rate algorithm): one timestamp per agent
type (`tat`, in its limits hash), so any number of processes and hosts share one limit
exactly, against the server's clock. Admissions are spaced GUARD wider than the rate,
because what users measure is their handlers' starts, which follow the claim by a
little: a start that lags its claim by up to 3/4 GUARD x the window (30 ms in a second)
cannot put one start too many into a window. A claim up to 1/4 GUARD x the window late
keeps the schedule, so the rate is held at 1 / (1 + GUARD) of the limit (96 %).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from handoff.errors import InvalidPayload

GUARD = 0.04  # admissions spaced 4 % wider than the rate: ~96 % of it, sustained
WINDOWS_MS = {"s": 1000, "min": 60_000, "h": 3_600_000}
MAX_COUNT = 10_000_000
_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(s|min|h)\s*")


@dataclass(frozen=True)
class Rate:
    """count starts per window_ms."""

    count: float
    window_ms: int

    def __str__(self) -> str:
        unit = next(u for u, ms in WINDOWS_MS.items() if ms == self.window_ms)
        count = int(self.count) if self.count == int(self.count) else self.count
        return f"{count}/{unit}"

    @property
    def per_s(self) -> float:
        return self.count * 1000 / self.window_ms


def parse_rate(text: object, what: str = "rate") -> Rate:
    """'10/s' -> Rate(10, 1000); anything else is a one-line InvalidPayload."""
    match = _RATE.fullmatch(text) if isinstance(text, str) else None
    count = float(match.group(1)) if match else 0.0
    if match is None or not 0 < count <= MAX_COUNT:
        shown = repr(text)[:40]
        raise InvalidPayload(
            f"invalid {what} {shown}: expected N/s, N/min or N/h with 0 < N <= {MAX_COUNT:,}"
        )
    return Rate(count, WINDOWS_MS[match.group(2)])


def check_burst(burst: object) -> int:
    if isinstance(burst, bool) or not isinstance(burst, int) or not 0 <= burst <= MAX_COUNT:
        raise InvalidPayload(f"invalid burst {burst!r}: a whole number from 0 to {MAX_COUNT:,}")
    return burst
