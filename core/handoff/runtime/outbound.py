"""What the main thread sends to Redis: outcome batches kept until Redis takes them, and
the pace of its calls while Redis refuses.

Runs in: a worker process, its main thread only (the helper threads read the backoff's
current step, never change it).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from handoff.backoff import Backoff
from handoff.connection.outage import OutageLog
from handoff.errors import HandoffError, ServerOutOfMemory
from handoff.protocol.queue import Completion, Failure, TaskQueue
from handoff.protocol.task import Task
from handoff.protocol.waits import enqueue_children
from handoff.runtime.agents import AgentSpec
from handoff.runtime.settle import handoffs_refused
from handoff.runtime.worker_events import HeldView, log
from handoff.runtime.worker_stats import WorkerStats


class Pace:
    """Back off (capped) after a failed call, and log at most one line per interval
    while Redis is down; one success resets both."""

    def __init__(self, outage: OutageLog, backoff: Backoff) -> None:
        self.outage = outage
        self.backoff = backoff
        self.until = 0.0  # monotonic: no call before this

    def trouble(self, what: str, error: Exception) -> None:
        self.until = time.monotonic() + self.backoff.next_s()
        self.outage.failed(what, error)

    def ok(self) -> None:
        self.backoff.reset()
        self.outage.recovered()


Batch = tuple[list[Completion], list[Failure], list[Task]]


class AckBatches:
    """Children first, then the parents' acks, then nacks: a crash in between only
    repeats a parent whose children are deduplicated by id.

    When Redis is unreachable a batch is kept and sent again on a later turn of the main
    loop (which keeps handling signals meanwhile); the held leases stay renewed."""

    def __init__(
        self,
        worker_id: str,
        queue: TaskQueue,
        spec: AgentSpec,
        stats: WorkerStats,
        held: HeldView,
        pace: Pace,
        sent: Callable[[list[Completion], list[Failure]], None],
    ) -> None:
        self.worker_id = worker_id
        self.queue = queue
        self.spec = spec
        self.stats = stats
        self.held = held
        self.pace = pace
        self.sent = sent  # the worker's accounting, after each batch Redis took
        self.unsent: list[Batch] = []  # batches Redis did not take yet
        # At the memory limit a batch's children are refused while acks go through: said
        # on its own, once per interval, until children are stored again.
        self.handoff_outage = OutageLog(log, f"worker {worker_id} handoffs")

    def send(self, completions: list[Completion], failures: list[Failure], children) -> None:
        self.unsent.append((completions, failures, children))
        self.flush()

    def flush(self) -> None:
        if time.monotonic() < self.pace.until:
            return
        unsent = self.unsent
        while unsent:
            completions, failures, children = unsent[0]
            try:
                if children:
                    enqueue_children(self.queue, children)  # (Waits' then-tasks parked)
                    self.handoff_outage.recovered()
                    unsent[0] = (completions, failures, [])
                if completions:
                    self.stats.stale += len(self.queue.ack(completions))
                    unsent[0] = ([], failures, [])
                if failures:
                    self.stats.stale += len(self.queue.nack(failures))
            except HandoffError as e:
                if children and isinstance(e, ServerOutOfMemory):  # their parents retry later
                    self.handoff_outage.failed(f"hand off {len(children)} task(s)", e)
                    unsent[0] = handoffs_refused(completions, failures, children, str(e), self.spec)
                    continue
                if not self._still_held(completions, failures):
                    # Every lease of the batch was lost (re-claimed elsewhere): its acks
                    # would change nothing, so a batch Redis keeps refusing never blocks
                    # the ones behind it, nor the claims they free room for.
                    unsent.pop(0)
                    log.warning(
                        "worker %s: dropped %d ack(s) whose leases were lost: %s",
                        self.worker_id, len(completions) + len(failures), e,
                    )  # fmt: skip
                    continue
                self.pace.trouble("ack", e)
                return
            unsent.pop(0)
            self.sent(completions, failures)
        self.pace.ok()

    def _still_held(self, completions: list[Completion], failures: list[Failure]) -> bool:
        tasks = [c.task for c in completions] + [f.task for f in failures]
        return any(self.held.by_id.get(t.id) is t for t in tasks)
