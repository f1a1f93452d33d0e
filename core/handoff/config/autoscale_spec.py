"""Autoscaling bounds: `--autoscale coder=1:8,reviewer=0:4:2.5` and `autoscale = "..."`.

MIN:MAX processes per agent type on one supervisor, and optionally the queue wait it aims
for. Parsed here, with the other settings, so a bad value is one line before anything
starts; handoff.runtime.autoscale makes the decisions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from handoff.config.names import AGENT_NAME_RE

_SPEC = re.compile(r"(\d+):(\d+)(?::(\d+(?:\.\d+)?))?")


@dataclass(frozen=True)
class Bounds:
    """An agent type's autoscaling: at least min, at most max processes on this host, and
    the queue wait it aims for (None: the settings' autoscale_target_wait_s)."""

    min: int
    max: int
    target_wait_s: float | None = None


def parse_autoscale(text: str, host_cap: int) -> dict[str, Bounds]:
    """'coder=1:8,reviewer=0:4:2.5' -> bounds per agent; ValueError naming the bad part."""
    out: dict[str, Bounds] = {}
    if not text.strip():
        return out
    for part in (p.strip() for p in text.split(",")):
        name, sep, spec = (s.strip() for s in part.partition("="))
        match = _SPEC.fullmatch(spec)
        if not sep or match is None:
            raise ValueError(f"{part!r}: expected AGENT=MIN:MAX[:TARGET_WAIT_S], like 'coder=1:8'")
        if not AGENT_NAME_RE.fullmatch(name):
            raise ValueError(f"{part!r}: agent names must match ^{AGENT_NAME_RE.pattern}$")
        if name in out:
            raise ValueError(f"{part!r}: agent {name!r} is named twice")
        low, high = int(match.group(1)), int(match.group(2))
        if low > high:
            raise ValueError(f"{part!r}: MIN {low} is over MAX {high}")
        if high < 1 or high > host_cap:
            raise ValueError(f"{part!r}: MAX must be between 1 and {host_cap} (max_processes)")
        wait = float(match.group(3)) if match.group(3) else None
        if wait is not None and wait <= 0:
            raise ValueError(f"{part!r}: TARGET_WAIT_S must be > 0")
        out[name] = Bounds(low, high, wait)
    return out
