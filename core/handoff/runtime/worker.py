"""A worker process: claim, run, ack, for one agent type.

Runs in: `handoff worker AGENT`, or a child the supervisor forked. The constructor only
stores settings (it may run before fork); init_process() builds everything alive: the
pool, the runner, the helper threads and the signal handlers.

Threads: main (this class: claims, finishes outcomes in batches and is the only one to
ack, holds the tasks, shuts down), handler threads or one asyncio thread (runner.py),
and one object per helper thread, each owning its loop and its state: the waker
(waker.py: claims the moment work arrives, handing it straight to the runner), the inbox
(inbox.py: cancels), the lease keeper (lease_keeper.py: renewals, timeouts), the
heartbeat (heartbeat.py: health hash, recycling) and the pulse (pulse_beat.py).
Everything the main thread waits for arrives on one SimpleQueue as a typed event
(worker_events.py): outcomes, wake-ups, cancels and signals; the helper threads read
what it holds through a HeldView, and never write it.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
from typing import Any

from handoff.backoff import Backoff
from handoff.config import Settings
from handoff.connection.manager import get_manager
from handoff.connection.outage import OutageLog
from handoff.connection.server_checks import check_eviction_policy
from handoff.connection.startup import wait_for_server
from handoff.errors import HandoffError, UnsafeServer
from handoff.protocol import messages
from handoff.protocol.keys import Keys
from handoff.protocol.queue import Completion, Failure, TaskQueue
from handoff.protocol.steps import StepStore
from handoff.protocol.task import Task
from handoff.runtime import exits, tracing
from handoff.runtime.agents import AgentSpec
from handoff.runtime.claimer import Claimer
from handoff.runtime.emits import Emits
from handoff.runtime.heartbeat import Heartbeat
from handoff.runtime.inbox import Inbox, lease_check
from handoff.runtime.lease_keeper import LeaseKeeper
from handoff.runtime.liveness import Pulse, beat_every_s
from handoff.runtime.outbound import AckBatches, Pace
from handoff.runtime.pulse_beat import PulseBeat
from handoff.runtime.runner import Finished, Outcome, make_runner
from handoff.runtime.settle import settle
from handoff.runtime.start_gate import StartGate
from handoff.runtime.waker import TICK_S as _TICK_S
from handoff.runtime.waker import Waker
from handoff.runtime.worker_events import (
    CancelRequested,
    Claimed,
    EventsPending,
    HeldView,
    LeasesLost,
    Recycle,
    Shared,
    Signalled,
    WakeFailed,
    claimed_but_not_taken,
)
from handoff.runtime.worker_stats import WorkerStats

log = logging.getLogger(__name__)


# Between claims while Redis is unreachable: long enough not to hammer a server that is
# failing over, short enough to resume within a couple of seconds once it is back.
MAX_BACKOFF_S = 2.0


class Worker:
    def __init__(
        self,
        spec: AgentSpec,
        settings: Settings,
        *,
        worker_id: str | None = None,
        parent_pid: int | None = None,
        pulse: Pulse | None = None,
    ) -> None:
        self.spec = spec
        self.pulse = pulse  # shared with the supervisor, which replaces a silent worker
        self.settings = settings
        self.worker_id = worker_id
        self.parent_pid = parent_pid
        self.exit_code = exits.EXIT_OK

    # -- after fork ------------------------------------------------------------------------

    def init_process(self) -> None:
        self.pid = os.getpid()
        if self.worker_id is None:
            self.worker_id = f"{self.spec.name}-{socket.gethostname()}-{self.pid}"
        self.manager = get_manager(self.settings.redis)
        self.queue = TaskQueue(self.manager, self.settings)
        self.steps = StepStore(self.queue, self.settings)  # task.step (protocol/steps.py)
        messages.install(self.queue)  # task.receive() in this process's handlers
        self.keys = Keys(self.settings.key_prefix)
        self.agent_keys = self.keys.agent(self.spec.name)
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        # The waker starts the tasks it claims, then tells the main thread, both under this
        # lock; handlers report under it too: a task's Claimed is always ahead of its outcome.
        self._handing_over = threading.Lock()
        # Our lease tokens start with this tag: a cancel pushes to our inbox by it.
        self.claim_tag = os.urandom(4).hex()
        # A held task is handed to a slot only if not cancelled meanwhile (start_gate.py).
        self.gate = StartGate(lease_check(self.manager, self.agent_keys, self.claim_tag))
        self.runner = make_runner(self.spec, self._report, self.gate)
        self.held: dict[str, Task] = {}  # leased by us, not yet acked/nacked/released
        self.view = HeldView(self)  # what the helper threads may read of it
        self.stats = WorkerStats()
        self.state = "starting"
        self.draining = False
        self.fast = False
        self.stop_event = threading.Event()
        self.lease_ms = int((self.spec.lease_s or self.settings.lease_s) * 1000)
        self.stop_asked = False  # a stop signal arrived (draining follows on the main thread)
        self.outage = OutageLog(log, f"worker {self.worker_id}", stopping=self._stopping)
        self.backoff = Backoff(0.05, MAX_BACKOFF_S)
        self.pace = Pace(self.outage, self.backoff)
        self.acks = AckBatches(
            self.worker_id, self.queue, self.spec, self.stats, self.view, self.pace, self._account
        )
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the supervisor rolls us instead
        self.emits = Emits(self.settings, self.manager, self.keys, self.events, self.outage)
        self.claimer = Claimer(
            self.spec, self.queue, self.settings, lease_ms=self.lease_ms,
            claim_tag=self.claim_tag, gate=self.gate, stats=self.stats, emitter=self.emits.emit,
            step_store=self.steps,
        )  # fmt: skip
        self.sizer = self.claimer.sizer  # how many to hold: the claimer's, told task times
        self._start_threads()

    def _start_threads(self) -> None:
        """One object per helper thread, each owning its loop and its state; they read
        what we hold through self.view and tell us everything through self.events."""
        shared = Shared(
            self.worker_id, self.events, self.view, self.stop_event, self.manager,
            self.outage, self.backoff,
        )  # fmt: skip
        redis_config, tag, agent_keys = self.settings.redis, self.claim_tag, self.agent_keys
        socket_timeout_s = max(redis_config.read_timeout_s, redis_config.write_timeout_s)
        # The waker blocks on the wake list and on its own nudge list (a stop's token).
        lists = (agent_keys.wake, agent_keys.nudge(tag))
        self.waker = Waker(
            shared, self.claimer, self.runner, self._handing_over, lists, socket_timeout_s
        )
        self.heartbeat = Heartbeat(
            shared, self.spec, self.settings, self.keys, self.stats, self._stopping
        )
        for thread in (
            self.waker,
            Inbox(shared, self.gate, agent_keys.inbox(tag), socket_timeout_s),
            LeaseKeeper(
                shared, self.queue, self.runner, self.lease_ms, self.settings.cancel_grace_s
            ),
            self.heartbeat,
            PulseBeat(shared, self.pulse, beat_every_s(self.settings.worker_stall_s)),
        ):
            thread.start()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_asked = True
        self.events.put_nowait(Signalled(signum))

    def _stopping(self) -> bool:
        """Asked to stop, or draining: Redis going away now is expected (see OutageLog)."""
        return self.stop_asked or self.draining

    # -- main loop -------------------------------------------------------------------------

    def run(self) -> int:
        self.init_process()
        log.info(
            "worker %s started: agent=%s max_concurrent=%d prefetch=%d+ (adaptive)",
            self.worker_id, self.spec.name, self.spec.max_concurrent, self.settings.prefetch,
        )  # fmt: skip
        wait_for_server(self.manager, log, f"worker {self.worker_id}")
        try:
            check_eviction_policy(self.manager, self.settings)
        except UnsafeServer as e:
            log.error("worker %s cannot start: %s", self.worker_id, e)
            return exits.EXIT_BOOT_ERROR
        except HandoffError as e:
            log.warning("could not check the server: %s", e)
        self.state = "idle"
        deadline: float | None = None
        while True:
            self._process_events(block_s=self._wait_s())
            if self.acks.unsent:
                self.acks.flush()
            if self.draining and deadline is None:
                deadline = time.monotonic() + (0 if self.fast else self.settings.graceful_timeout_s)
                self._release(self.runner.take_unstarted())
            if self.draining:
                if not self.held or time.monotonic() >= deadline or self.fast:
                    break
                continue
            self._check_parent()
            self.gate.prune(self.held)
            self._claim()
        self._shutdown()
        return self.exit_code

    def _wait_s(self) -> float:
        if self.draining or self.acks.unsent:
            return 0.05
        backing_off_s = self.pace.until - time.monotonic()
        if backing_off_s > 0:  # Redis refused fast: wait out the backoff, do not spin
            return min(backing_off_s, _TICK_S)
        if self._room() and not self.waker.want_work.is_set():
            return 0.0  # there is room and we have not yet seen an empty queue
        return _TICK_S

    def _room(self) -> int:
        """How many to claim now: 0 until half the capacity is free, unless every held
        task has started (so slots would go idle): fewer, bigger claims."""
        capacity = self.sizer.capacity
        room = capacity - len(self.held)
        unstarted = len(self.held) - self.runner.running
        if room <= 0 or (unstarted > 0 and room < capacity // 2):
            return 0
        return 0 if self.claimer.isolating(self.view) else room

    def _process_events(self, block_s: float) -> None:
        """Take every pending event (blocking up to block_s for the first), then act."""
        outcomes: list[Outcome] = []
        try:
            item = self.events.get(timeout=block_s) if block_s > 0 else self.events.get_nowait()
            while True:
                match item:
                    case Outcome():
                        outcomes.append(item)
                    case Finished(outcomes=finished):
                        outcomes.extend(finished)
                    case WakeFailed():
                        self.waker.want_work.clear()
                    case Claimed(tasks=tasks, started=False):
                        self.waker.want_work.clear()
                        self._take(tasks)
                    case Claimed(tasks=tasks, refused=refused):
                        self.waker.want_work.clear()
                        self._hold(tasks, list(refused))
                    case LeasesLost(tasks=tasks):
                        for task in tasks:
                            self._forget(task)
                    case CancelRequested(ids=ids):
                        self._cancel_held(ids)
                    case EventsPending():
                        self.emits.send()
                    case Signalled(signum=signum):
                        self._handle_signal(signum)
                    case Recycle(exit_code=code, reason=reason):
                        self.exit_code, self.stats.recycle_reason = code, reason
                        self._handle_signal(signal.SIGTERM)
                    case _:
                        raise TypeError(f"unknown worker event {item!r}")
                item = self.events.get_nowait()
        except queue.Empty:
            pass
        if outcomes:
            self._finish(outcomes)

    def _handle_signal(self, signum: int) -> None:
        if signum == signal.SIGQUIT:
            self.fast = True
        if not self.draining:
            log.info("worker %s: %s, draining", self.worker_id, signal.Signals(signum).name)
        self.draining = True  # a repeated SIGTERM (honcho signals the group) changes nothing
        self.state = "stopping"

    def _check_parent(self) -> None:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            log.warning("worker %s: supervisor gone, stopping", self.worker_id)
            self.exit_code = exits.EXIT_PARENT_GONE
            self.draining = True

    # -- claiming --------------------------------------------------------------------------

    def _claim(self) -> None:
        room = self._room()
        if not room or self.waker.want_work.is_set():
            return
        if time.monotonic() < self.pace.until:
            return
        try:
            tasks = self.claimer.claim(room, not self.held)
        except HandoffError as e:
            self.pace.trouble("claim", e)
            return
        self.pace.ok()
        if not tasks:
            self.waker.want_work.set()  # the waker blocks in Redis until work arrives
            return
        self._take(tasks)

    def _take(self, tasks: list[Task]) -> None:
        """Hold and start claimed tasks (main thread only)."""
        if self.draining:
            self._release(tasks)
            return
        refused, runnable = self.claimer.prepare(tasks)
        self._hold(tasks, refused)
        self.runner.submit(runnable)

    def _hold(self, tasks: list[Task], refused: list[Failure]) -> None:
        """Count tasks as ours (main thread only); the refused ones fail at once."""
        for task in tasks:
            self.held[task.id] = task
        self.state = "busy"
        if refused:
            self.acks.send([], refused, [])
        if self.gate.skip:  # a cancel heard before we held it: it is handled now
            self._cancel_held([t.id for t in tasks if (t.id, t.token) in self.gate.skip])

    def _report(self, item: Outcome | Finished) -> None:
        """A handler's outcome, to the main thread (never ahead of its task's Claimed)."""
        with self._handing_over:
            self.events.put(item)

    # -- finishing -------------------------------------------------------------------------

    def _finish(self, outcomes: list[Outcome]) -> None:
        """Turn outcomes into children, acks and nacks: at most three round trips a batch."""
        completions: list[Completion] = []
        failures: list[Failure] = []
        children: list[Task] = []
        stopped: list[Task] = []  # cancelled, their handlers now ended: let go, not acked
        stats = self.stats
        for outcome in outcomes:
            task = outcome.task
            if self.held.get(task.id) is not task:
                continue  # timed out earlier (already nacked), or its lease was lost
            if task.is_cancelled:
                stopped.append(task)
                continue
            if outcome.pause_s is not None:
                self._rate_limited(task, outcome.pause_s)
                continue
            stats.latencies_s.append(outcome.elapsed_s)
            self.sizer.observe_task(outcome.elapsed_s)
            completion, failure, made = settle(outcome, self.spec, self.settings)
            if failure is not None:
                failures.append(failure)
            else:
                completions.append(completion)
                children.extend(made)
        self.acks.send(completions, failures, children)
        self._release(stopped)

    def _cancel_held(self, ids: list[str]) -> None:
        """Cancelled tasks: no outcome of theirs is sent. One that never started is let go
        now; a running one's handler is told, and it is held (its lease renewed) until
        the handler ends, then let go (release): a key's successor waits for that
        (protocol/conflict.py). After client.cancel its lease is gone: letting go is a
        stale release, and a renewal says it was cancelled (told once)."""
        unstarted = []
        for task_id in ids:
            task = self.held.get(task_id)
            if task is None or task.is_cancelled:
                continue
            if not self.runner.cancel(task):
                unstarted.append(task)
            self.stats.cancelled += 1
            log.info("worker %s: task %s cancelled", self.worker_id, task_id)
        self._release(unstarted)
        if not self.held and not self.draining:
            self.state = "idle"

    def _rate_limited(self, task: Task, pause_s: float) -> None:
        """The handler's API said to slow down: back to its place, uncounted, and the
        agent type pauses everywhere. If Redis cannot be told, its lease runs out (the
        task runs again) and the pause is lost: a 429 is a hint, not a task."""
        try:
            self.queue.release([task], pause_s=pause_s)
        except HandoffError as e:
            self.pace.trouble("release", e)
        self._forget(task)
        log.info("worker %s: %s rate limited, agent paused %.1fs", self.worker_id, task.id, pause_s)

    def _forget(self, task: Task) -> None:
        """Stop holding this delivery (not a newer delivery of the same id)."""
        if self.held.get(task.id) is task:
            del self.held[task.id]
        self.gate.finished(task)

    def _account(self, completions: list[Completion], failures: list[Failure]) -> None:
        if completions:
            self.steps.acked(completions)  # the steps of tasks that ended keep their TTL
        for done in completions:
            self._forget(done.task)
        for failure in failures:
            self._forget(failure.task)
            if not failure.dead_now and failure.task.attempt < (failure.task.max_attempts or 3):
                self.stats.retried += 1
        self.stats.processed += len(completions)
        self.stats.failed += len(failures)
        self.stats.handed_off += sum(c.handoffs for c in completions)
        self.stats.last_ack_at = time.time()
        if not self.held and not self.draining:
            self.state = "idle"

    def _release(self, tasks: list[Task]) -> None:
        if not tasks:
            return
        try:
            self.queue.release(tasks)
        except HandoffError as e:
            log.warning(
                "worker %s: could not release %d task(s): %s", self.worker_id, len(tasks), e
            )
        for task in tasks:
            self._forget(task)

    def _shutdown(self) -> None:
        self.stop_event.set()
        # A claim the waker made while the main loop was stopping: wait for one in flight
        # (it gives its tasks back itself once it sees the stop), then give back those it
        # handed over that the main loop did not take.
        self.waker.stop()
        unclaimed, recycle = claimed_but_not_taken(self.events, self._hold)
        if recycle is not None:  # a status asked for as the loop ended
            self.exit_code, self.stats.recycle_reason = recycle.exit_code, recycle.reason
        self._release(unclaimed)
        leftovers = list(self.held.values())
        if leftovers:
            # Still running past the grace period: give them back now rather than wait for
            # their leases to expire (the process exit stops the handlers).
            log.warning(
                "worker %s: releasing %d unfinished task(s)", self.worker_id, len(leftovers)
            )
            self._release(leftovers)
        self.runner.stop()
        self.emits.send()  # what handlers emitted last
        tracing.flush()
        self.heartbeat.deregister()
        log.info(
            "worker %s stopped: processed=%d failed=%d (%s)",
            self.worker_id, self.stats.processed, self.stats.failed, exits.NAMES[self.exit_code],
        )  # fmt: skip
