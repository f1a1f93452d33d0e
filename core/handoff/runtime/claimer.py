"""One claim round trip, and what the last one said.

Runs in: a worker process, from its main thread or its waker (while the main thread waits
for work: the waker claims only once the main thread saw an empty queue, and the main
thread claims again only once the waker handed its tasks over or gave up).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from handoff.config import Settings
from handoff.protocol.queue import ClaimRequest, ClaimResult, Failure, TaskQueue
from handoff.protocol.task import Task
from handoff.runtime.agents import AgentSpec
from handoff.runtime.prefetch import PrefetchSizer
from handoff.runtime.settle import check_payload
from handoff.runtime.start_gate import StartGate
from handoff.runtime.worker_events import HeldView
from handoff.runtime.worker_stats import WorkerStats


class Claimer:
    def __init__(
        self,
        spec: AgentSpec,
        queue: TaskQueue,
        settings: Settings,
        *,
        lease_ms: int,
        claim_tag: str,
        gate: StartGate,
        stats: WorkerStats,
        emitter: Callable,
        step_store: object = None,
    ) -> None:
        self.spec = spec
        self.queue = queue
        self.step_store = step_store  # task.step's store (protocol/steps.py)
        self.lease_ms = lease_ms
        self.claim_tag = claim_tag
        self.gate = gate
        # Prefetched tasks hold leases; under a global limit they would hold other
        # workers' share idle, so a globally limited agent claims only for free slots.
        floor = 0 if spec.global_limit else settings.prefetch
        ceiling = floor if spec.global_limit else settings.claim_batch_max
        self.sizer = PrefetchSizer(spec.max_concurrent, floor, ceiling)
        self.stats = stats
        self.emitter = emitter
        # Swapped whole by whichever thread claims: a reader takes it once.
        self.last = ClaimResult()

    def isolating(self, held: HeldView) -> bool:
        """A suspect runs alone: hold one, or one waits for us -> drain, then claim solo."""
        waiting = self.last.suspects_waiting.get(self.spec.name, False)
        return bool(held) and (waiting or held.holds_suspect())

    def claim(self, room: int, solo: bool, after_pop: tuple | None = None) -> list[Task]:
        """One claim round trip (main thread, or the waker while the main thread waits:
        behind its blocking pop, after_pop)."""
        spec = self.spec
        request = ClaimRequest(
            spec.name,
            room,
            self.lease_ms,
            spec.global_limit or 0,
            isolate_suspects=True,
            solo=solo,
            rate=spec.rate,
            burst=spec.burst,
            group_rate=spec.group_rate,
            group_concurrency=spec.group_concurrency,
            cost_limit=spec.cost_limit,
            claim_tag=self.claim_tag,
        )
        started = time.perf_counter()
        sent_at = time.monotonic()
        self.last = result = self.queue.claim([request], after_pop=after_pop)
        self.gate.observed(sent_at, result.inbox_seq.get(spec.name, 0))
        tasks = result[spec.name]
        if after_pop is None:  # a claim behind a pop waited: not a round trip's time
            self.sizer.observe_round_trip(time.perf_counter() - started)
        self.stats.last_claim_at = time.time()
        return tasks

    def prepare(self, tasks: list[Task]) -> tuple[list[Failure], list[Task]]:
        """Fill in the agent's defaults; (refused: payloads the agent's type rejects, the
        rest). Touches only the tasks: the main thread and the waker both call it."""
        refused: list[Failure] = []
        for task in tasks:
            if task.max_attempts is None:
                task.max_attempts = self.spec.max_attempts
            task.emitter = self.emitter
            task.step_store = self.step_store
            failure = check_payload(self.spec, task)
            if failure is not None:
                refused.append(failure)
        if not refused:
            return refused, tasks
        refused_ids = {f.task.id for f in refused}
        return refused, [t for t in tasks if t.id not in refused_ids]
