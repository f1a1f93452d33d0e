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

from handoff.config.autoscale_spec import Bounds

# A process counts as fully used at this share of its slots: room for the load's ups and
# downs, so a steady load does not add and remove the same process over and over.
HEADROOM = 0.6


@dataclass(frozen=True)
class Observation:
    """One tick's look at an agent type (the queue, which every supervisor sees alike, and
    the task time this supervisor's own workers report)."""

    at: float  # monotonic seconds
    queued: int
    oldest_age_s: float
    done: int  # the agent's done counter (all hosts)
    task_s: float = 0.0  # a task's typical run time (its workers' median); 0: not known yet


@dataclass(frozen=True)
class Decision:
    count: int  # this supervisor's processes for the agent type from now on
    total: int  # what all supervisors together should run
    reason: str  # the figures behind it, for the log line


class AgentScaler:
    """One agent type's autoscaling state on one supervisor.

    What a process can do is its slots over the task time (the workers measure it: not
    distorted by prefetched tasks, nor by a load below capacity); the load is the done
    counter's growth. Capacity needed = the larger of load / HEADROOM and load + the
    queue / the target wait (what is left over drains the queue in time)."""

    def __init__(self, bounds: Bounds, target_wait_s: float, cooldown_s: float) -> None:
        self.bounds = bounds
        self.target_wait_s = bounds.target_wait_s or target_wait_s
        self.cooldown_s = cooldown_s
        self.throughput = 0.0  # tasks/s finished on all hosts (recent average)
        self._last: Observation | None = None
        self._busy_at = 0.0  # last time the agent was not quiet
        self._changed_at = -math.inf
        self.pinned: int | None = None  # `handoff scale` set a count: no autoscaling

    def observe(self, obs: Observation) -> None:
        """Learn the load: tasks/s finished on all hosts since the last look."""
        last, self._last = self._last, obs
        if last is not None and obs.at > last.at:
            rate = max(0, obs.done - last.done) / (obs.at - last.at)
            self.throughput = 0.7 * self.throughput + 0.3 * rate

    def decide(
        self, obs: Observation, mine: int, total: int, slots: int, my_share: float
    ) -> Decision | None:
        """A new count for this supervisor, or None to keep it.

        mine: this supervisor's processes; total: all live supervisors' together; slots:
        handlers per process (max_concurrent); my_share: this supervisor's part of the
        total (its max over the live peers' maxima)."""
        if self.pinned is not None:
            return None
        wanted = self.wanted_total(obs, total, slots)
        share = min(self.bounds.max, max(self.bounds.min, math.ceil(wanted * my_share)))
        if obs.queued or wanted >= total:  # not quiet: the cool-down starts again
            self._busy_at = obs.at
        capacity = f"{slots / obs.task_s:.0f}/s" if obs.task_s else "not measured yet"
        reason = (
            f"backlog {obs.queued}, oldest {obs.oldest_age_s:.1f}s, load "
            f"{self.throughput:.0f}/s, per process {capacity}, target wait "
            f"{self.target_wait_s:g}s, all hosts {total} -> {wanted}"
        )
        if share > mine:
            self._changed_at = obs.at
            return Decision(share, wanted, f"up: {reason}")
        quiet_for = obs.at - max(self._busy_at, self._changed_at)
        if share < mine and quiet_for >= self.cooldown_s:
            self._changed_at = obs.at
            return Decision(share, wanted, f"down after {quiet_for:.0f}s quiet: {reason}")
        return None

    def wanted_total(self, obs: Observation, total: int, slots: int) -> int:
        """Processes all hosts together need for this load and this backlog."""
        if not obs.task_s:  # nothing measured yet: keep what runs, one more while work waits
            if obs.queued:
                return total + 1
            return total if self.throughput > 0 else 0
        capacity = slots / obs.task_s  # tasks/s one process can do
        # Enough for the load with headroom, and enough that what is left over drains
        # the queue within the target wait.
        needed = max(self.throughput / HEADROOM, self.throughput + obs.queued / self.target_wait_s)
        wanted = math.ceil(needed / capacity - 1e-9)
        if obs.oldest_age_s > self.target_wait_s and total > 0:
            wanted = max(wanted, total + 1)  # already late: one more at least
        return wanted
