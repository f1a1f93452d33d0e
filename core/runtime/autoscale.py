"""Autoscaling: how many processes an agent type needs, decided from its backlog.

Runs in: the supervisor's Redis thread, once a tick. Pure: observations in, a decision
out; the supervisor reads the queue and the peers, and applies the decision.

The rule, per agent type: measure what one process finishes per second (an average over
the recent ticks); add processes when the backlog would take longer than the target
queue wait to drain at that rate, or when the oldest queued task is already older than
the target; remove them only after the agent has been mostly idle for a cool-down, one
step at a time down to what the running tasks need. Up is at once, down is slow: the
asymmetry is the hysteresis that keeps a steady load from flapping.

Several supervisors share one agent type: each computes the same total from the same
queue, and takes its share of it in proportion to its maximum among the live peers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from handoff.config.autoscale import Bounds

# A process counts as fully used at this share of its slots: room for the load's ups and
# downs, so a steady load does not add and remove the same process over and over.
HEADROOM = 0.6


@dataclass(frozen=True)
class Observation:
    """One tick's look at an agent type's queue (every supervisor sees the same)."""

    at: float  # monotonic seconds
    queued: int
    running: int
    oldest_age_s: float
    done: int  # the agent's done counter (all hosts)


@dataclass(frozen=True)
class Decision:
    count: int  # this supervisor's processes for the agent type from now on
    total: int  # what all supervisors together should run
    reason: str  # the figures behind it, for the log line


class AgentScaler:
    """One agent type's autoscaling state on one supervisor."""

    def __init__(self, bounds: Bounds, target_wait_s: float, cooldown_s: float) -> None:
        self.bounds = bounds
        self.target_wait_s = bounds.target_wait_s or target_wait_s
        self.cooldown_s = cooldown_s
        # Tasks/s one process finishes when it has all it can take (measured while a
        # backlog waits), and tasks/s finished on all hosts: recent averages.
        self.rate_per_process = 0.0
        self.throughput = 0.0
        self._last: Observation | None = None
        self._busy_at = 0.0  # last time the agent was not mostly idle
        self._changed_at = -math.inf
        self.pinned: int | None = None  # `handoff scale` set a count: no autoscaling

    def observe(self, obs: Observation, total_processes: int, slots: int) -> None:
        """Learn the load (tasks/s finished on all hosts) and, while work waited through
        the whole interval (the processes had all they could take), what one process
        can do."""
        last, self._last = self._last, obs
        if last is None or obs.at <= last.at:
            return
        rate = max(0, obs.done - last.done) / (obs.at - last.at)
        self.throughput = 0.7 * self.throughput + 0.3 * rate
        saturated = waiting(last, total_processes, slots) and waiting(obs, total_processes, slots)
        if total_processes == 0 or not saturated:
            return  # not saturated: what a process does now is not what it can do
        per_process = rate / total_processes
        if self.rate_per_process == 0:
            self.rate_per_process = per_process
        else:
            self.rate_per_process = 0.7 * self.rate_per_process + 0.3 * per_process

    def decide(
        self, obs: Observation, mine: int, total: int, slots: int, my_share: float
    ) -> Decision | None:
        """A new count for this supervisor, or None to keep it.

        mine: this supervisor's processes; total: all live supervisors' together; slots:
        handlers per process (max_concurrent); my_share: this supervisor's part of the
        total (its max over the live peers' maxima)."""
        if self.pinned is not None:
            return None
        wanted = self._wanted_total(obs, total, slots)
        share = min(self.bounds.max, max(self.bounds.min, math.ceil(wanted * my_share)))
        if waiting(obs, total, slots) or wanted >= total:  # not quiet: cool-down restarts
            self._busy_at = obs.at
        reason = (
            f"backlog {obs.queued}, running {obs.running}, oldest {obs.oldest_age_s:.1f}s, "
            f"rate {self.rate_per_process:.1f}/s per process, target wait "
            f"{self.target_wait_s:g}s, all hosts {total} -> {wanted}"
        )
        if share > mine:
            self._changed_at = obs.at
            return Decision(share, wanted, f"up: {reason}")
        idle_for = obs.at - max(self._busy_at, self._changed_at)
        if share < mine and idle_for >= self.cooldown_s:
            self._changed_at = obs.at
            return Decision(share, wanted, f"down after {idle_for:.0f}s mostly idle: {reason}")
        return None

    def _wanted_total(self, obs: Observation, total: int, slots: int) -> int:
        """Processes all hosts together need: enough for the load with headroom, plus
        enough to drain what waits within the target wait."""
        backlog = waiting(obs, total, slots)
        rate = self.rate_per_process
        if rate <= 0:  # not measured yet: keep what runs, one more while work waits
            if backlog == 0:
                return total if self.throughput > 0 or obs.running else 0
            return total + 1
        wanted = math.ceil(self.throughput / (HEADROOM * rate) - 1e-9)
        if backlog:
            wanted += math.ceil(backlog / (rate * self.target_wait_s))
        if obs.oldest_age_s > self.target_wait_s and total > 0:
            wanted = max(wanted, total + 1)  # already late: one more at least
        return wanted


def waiting(obs: Observation, total: int, slots: int) -> int:
    """Tasks that wait for a slot: queued, and leased beyond the slots (prefetched)."""
    return obs.queued + max(0, obs.running - total * slots)
