"""The lease keeper: keep every held task's lease, and enforce handlers' time limits.

Runs in: a worker process, its own thread, so a busy main thread never lets a lease lapse.
It renews every held lease each third of the lease, fails tasks past their timeout, and
asks for this process to be replaced when a handler is stuck (timed out) or a cancelled
handler outstays cancel_grace_s: all of it told to the main thread as events.
"""

from __future__ import annotations

import time

from handoff.errors import HandoffError
from handoff.protocol.queue import TaskQueue
from handoff.protocol.task import Task
from handoff.runtime import exits
from handoff.runtime.runner import Outcome
from handoff.runtime.worker_events import (
    CancelRequested,
    HelperThread,
    LeasesLost,
    Recycle,
    Shared,
    log,
)


class LeaseKeeper(HelperThread):
    name = "lease-keeper"

    def __init__(
        self,
        shared: Shared,
        queue: TaskQueue,
        runner,  # the worker's SyncRunner or AsyncRunner
        lease_ms: int,
        cancel_grace_s: float,
    ) -> None:
        super().__init__(shared)
        self.queue = queue
        self.runner = runner
        self.lease_ms = lease_ms
        self.cancel_grace_s = cancel_grace_s
        self._recycle_asked = False  # said once: the main thread drains from then on

    def run(self) -> None:
        interval = max(0.05, self.lease_ms / 3000.0)
        renew_at = time.monotonic() + interval
        # Renewals keep their schedule; timeouts and ignored cancels are also looked at in
        # between (at least every 0.25 s), so a cancel's grace is kept to that.
        while not self.stop_event.wait(max(0.0, min(renew_at - time.monotonic(), 0.25))):
            self._check_ignored_cancels()
            self._check_timeouts()
            if time.monotonic() < renew_at:
                continue
            renew_at = time.monotonic() + interval
            self._renew()

    def _check_timeouts(self) -> None:
        for task, ran_s in self.runner.overdue(time.monotonic()):
            if self.runner.started_at.pop(task.id, None) is not None:
                log.warning(
                    "worker %s: task %s timed out after %.1fs; recycling this worker",
                    self.worker_id, task.id, ran_s,
                )  # fmt: skip
                self.events.put(
                    Outcome(task, error=f"timed out after {ran_s:.1f}s", timed_out=True)
                )
                # The thread is stuck in the handler: replace the process once drained.
                self._recycle_asked = True
                self.events.put(Recycle(exits.EXIT_RECYCLE, f"task {task.id} timed out"))

    def _check_ignored_cancels(self) -> None:
        grace_s = self.cancel_grace_s
        ignoring = self.runner.ignoring_cancel(time.monotonic(), grace_s)
        if ignoring and not (self._recycle_asked or self.held.recycling):
            log.warning(
                "worker %s: the handler of cancelled task %s still runs %gs after the "
                "cancel; recycling this worker",
                self.worker_id, ignoring[0].id, grace_s,
            )  # fmt: skip
            self._recycle_asked = True
            reason = f"cancelled task {ignoring[0].id} ignored its cancel"
            self.events.put(Recycle(exits.EXIT_RECYCLE, reason))

    def _renew(self) -> None:
        held = self.held.tasks()
        if not held:
            return
        try:
            lost = self.queue.extend(held, self.lease_ms)
        except HandoffError as e:
            self.outage.failed("lease renewal", e)
            return
        if lost.cancelled:
            self.events.put(CancelRequested(lost.cancelled))
        gone = set(lost) - set(lost.cancelled)
        if gone:
            self._abandon([t for t in held if t.id in gone])

    def _abandon(self, tasks: list[Task]) -> None:
        """Leases lost (expired and re-claimed elsewhere): never start these deliveries;
        a running one's outcome is ignored (its ack would be stale anyway)."""
        log.warning(
            "worker %s: lost the lease of %d task(s); abandoning them", self.worker_id, len(tasks)
        )
        for task in tasks:
            if task.id in self.runner.started_at:
                log.warning(
                    "worker %s: the lease of task %s was lost while its handler was still "
                    "running (lease_s=%g): it may run again elsewhere. A call that holds the "
                    "GIL longer than lease_s starves the lease keeper; see "
                    "docs/operations/reliability.md",
                    self.worker_id, task.id, self.lease_ms / 1000,
                )  # fmt: skip
        self.runner.skip.update((t.id, t.token) for t in tasks)
        self.events.put(LeasesLost(tasks))
