"""A worker process: claim, run, ack, for one agent type.

Runs in: `handoff worker AGENT`, or a child the supervisor forked. The constructor only
stores settings (it may run before fork); init_process() builds everything alive: the
pool, the runner, the helper threads and the signal handlers.

Threads: main (claims, finishes outcomes in batches: the only one acking), handler
threads or one asyncio thread (runner), a waker (while there is room: one pipeline of a
BLPOP on the agent's wake list and the claim behind it, so the server leases work the
moment it arrives, handed straight to the runner), a lease keeper (renews leases of every
held task from its own thread, enforces timeouts), and a heartbeat (health hash).
Everything the main thread waits for arrives on one SimpleQueue: outcomes, wake-ups and
signals (SimpleQueue.put is safe inside a signal handler).
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from handoff.backoff import Backoff
from handoff.config import Settings
from handoff.connection.manager import get_manager
from handoff.connection.outage import OutageLog
from handoff.connection.server_checks import check_eviction_policy
from handoff.connection.startup import wait_for_server
from handoff.errors import HandoffError, InvalidPayload, ServerOutOfMemory, UnsafeServer
from handoff.protocol import messages, streams
from handoff.protocol.keys import Keys
from handoff.protocol.queue import ClaimRequest, ClaimResult, Completion, Failure, TaskQueue
from handoff.protocol.task import Task, now_ms
from handoff.protocol.waits import enqueue_children
from handoff.runtime import exits, tracing
from handoff.runtime.agents import AgentSpec, published_schema
from handoff.runtime.liveness import Pulse, beat_every_s
from handoff.runtime.prefetch import PrefetchSizer
from handoff.runtime.runner import Finished, Outcome, make_runner
from handoff.runtime.settle import check_payload, handoffs_refused, settle
from handoff.runtime.start_gate import StartGate
from handoff.runtime.worker_stats import WorkerStats

log = logging.getLogger(__name__)


# The main thread's events: one small type each (besides the runner's Outcome and
# Finished), matched by type.
@dataclass(slots=True, frozen=True)
class WakeFailed:
    """The waker could not reach Redis: the main thread retries (and backs off)."""


@dataclass(slots=True, frozen=True)
class Claimed:
    """The waker claimed these after a wake-up: the main thread takes them (started: the
    waker already handed them to the runner, all but the refused ones)."""

    tasks: list[Task]
    started: bool = False
    refused: tuple[Failure, ...] = ()


@dataclass(slots=True, frozen=True)
class LeasesLost:
    """Their leases expired and were re-claimed elsewhere: forget them."""

    tasks: list[Task]


@dataclass(slots=True, frozen=True)
class CancelRequested:
    """These tasks were cancelled (client.cancel): stop their handlers, drop outcomes."""

    ids: list[str]


@dataclass(slots=True, frozen=True)
class EventsPending:
    """Handlers emitted progress or output: the main thread sends the batch."""


@dataclass(slots=True, frozen=True)
class Signalled:
    """A stop signal arrived, or a helper thread asks the worker to stop."""

    signum: int


_TICK_S = 1.0
_HANDED_WAIT_S = 0.005  # the most the waker waits for a handler thread to start its task
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
        messages.install(self.queue)  # task.receive() in this process's handlers
        self.keys = Keys(self.settings.key_prefix)
        self.agent_keys = self.keys.agent(self.spec.name)
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        # The waker starts the tasks it claims, then tells the main thread, both under this
        # lock; handlers report under it too: a task's Claimed is always ahead of its outcome.
        self._handing_over = threading.Lock()
        # A held task is handed to a slot only if not cancelled meanwhile (start_gate.py).
        self.gate = StartGate(self._check_lease)
        self.runner = make_runner(self.spec, self._report, self.gate)
        self.held: dict[str, Task] = {}  # leased by us, not yet acked/nacked/released
        self.stats = WorkerStats()
        self.state = "starting"
        self.draining = False
        self.fast = False
        self.stop_event = threading.Event()
        self.want_work = threading.Event()
        redis_config = self.settings.redis
        self._socket_timeout_s = max(redis_config.read_timeout_s, redis_config.write_timeout_s)
        self.lease_ms = int((self.spec.lease_s or self.settings.lease_s) * 1000)
        # Prefetched tasks hold leases; under a global limit they would hold other
        # workers' share idle, so a globally limited agent claims only for free slots.
        floor = 0 if self.spec.global_limit else self.settings.prefetch
        ceiling = floor if self.spec.global_limit else self.settings.claim_batch_max
        self.sizer = PrefetchSizer(self.spec.max_concurrent, floor, ceiling)
        self.stop_asked = False  # a stop signal arrived (draining follows on the main thread)
        self.outage = OutageLog(log, f"worker {self.worker_id}", stopping=self._stopping)
        # At the memory limit heartbeats fail while claims and acks go through: that is
        # said on its own (other failures are the main loop's to say).
        self.heartbeat_outage = OutageLog(
            log, f"worker {self.worker_id} heartbeat", stopping=self._stopping
        )
        # At the memory limit a batch's children are refused while acks go through: said
        # on its own, once per interval, until children are stored again.
        self.handoff_outage = OutageLog(log, f"worker {self.worker_id} handoffs")
        self.backoff = Backoff(0.05, MAX_BACKOFF_S)
        self.last_claim = ClaimResult()  # swapped whole by whichever thread claims
        self._backoff_until = 0.0
        self._recycle_reason = ""
        self._unsent: list[tuple[list, list, list]] = []  # batches Redis did not take yet
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the supervisor rolls us instead
        self._waker_claiming = threading.Lock()
        # Our lease tokens start with this tag: a cancel pushes to our inbox by it.
        self.claim_tag = os.urandom(4).hex()
        # The waker blocks on the wake list and on its own nudge list (_shutdown's token).
        self._waker_lists = (self.agent_keys.wake, self.agent_keys.nudge(self.claim_tag))
        self._waker_popping = False
        # task.progress() / task.emit() from any handler: buffered, sent by the main thread
        self._emitted: collections.deque[tuple] = collections.deque()
        self._emits_flagged = False
        keep_s = max(60.0, self.settings.result_ttl_s, self.settings.run_ttl_s)
        self._stream_keep_ms = int(keep_s * 1000)  # a run's stream lives as long as the run
        for name, target in (
            ("waker", self._waker_loop),
            ("inbox", self._inbox_loop),
            ("lease-keeper", self._lease_loop),
            ("heartbeat", self._heartbeat_loop),
            ("pulse", self._pulse_loop),
        ):
            threading.Thread(target=self._guarded(name, target), name=name, daemon=True).start()

    def _guarded(self, name: str, target: Callable[[], None]) -> Callable[[], None]:
        """A helper thread's loop, which handles Redis errors itself: anything else that
        escapes it is a bug, and the worker must not go on without the thread (no waker:
        it would never claim again; no lease keeper: its running tasks would be handed to
        others). It says so, drains and exits as a crash: the supervisor replaces it."""

        def run() -> None:
            try:
                target()
            except BaseException:
                log.exception(
                    "worker %s: the %s thread failed; replacing this worker", self.worker_id, name
                )
                self.stats.recycle_reason = f"the {name} thread failed"
                self.exit_code = exits.EXIT_CRASH
                self.events.put(Signalled(signal.SIGTERM))

        return run

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
            if self._unsent:
                self._flush()
            if self.draining and deadline is None:
                deadline = time.monotonic() + (0 if self.fast else self.settings.graceful_timeout_s)
                self._release(self.runner.take_unstarted())
            if self.draining:
                if not self.held or time.monotonic() >= deadline or self.fast:
                    break
                continue
            self._check_parent()
            self._claim()
        self._shutdown()
        return self.exit_code

    def _wait_s(self) -> float:
        if self.draining or self._unsent:
            return 0.05
        backing_off_s = self._backoff_until - time.monotonic()
        if backing_off_s > 0:  # Redis refused fast: wait out the backoff, do not spin
            return min(backing_off_s, _TICK_S)
        if self._room() and not self.want_work.is_set():
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
        return 0 if self._isolating() else room

    def _isolating(self) -> bool:
        """A suspect runs alone: hold one, or one waits for us -> drain, then claim solo."""
        waiting = self.last_claim.suspects_waiting.get(self.spec.name, False)
        return bool(self.held) and (waiting or self._holds_suspect())

    def _holds_suspect(self) -> bool:
        """A task delivered before without finishing (its worker died) runs alone here."""
        held = list(self.held.values())  # (one C-level copy: the waker asks too)
        return any(t.deliveries - (t.attempt - 1) >= 2 for t in held)

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
                        self.want_work.clear()
                    case Claimed(tasks=tasks, started=False):
                        self.want_work.clear()
                        self._take(tasks)
                    case Claimed(tasks=tasks, refused=refused):
                        self.want_work.clear()
                        self._hold(tasks, list(refused))
                    case LeasesLost(tasks=tasks):
                        for task in tasks:
                            self._forget(task)
                    case CancelRequested(ids=ids):
                        self._cancel_held(ids)
                    case EventsPending():
                        self._send_events()
                    case Signalled(signum=signum):
                        self._handle_signal(signum)
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
        if not room or self.want_work.is_set():
            return
        if time.monotonic() < self._backoff_until:
            return
        try:
            tasks = self._claim_batch(room)
        except HandoffError as e:
            self._redis_trouble("claim", e)
            return
        self.backoff.reset()
        self.outage.recovered()
        if not tasks:
            self.want_work.set()  # the waker blocks in Redis until work arrives
            return
        self._take(tasks)

    def _claim_batch(self, room: int, after_pop: tuple | None = None) -> list[Task]:
        """One claim round trip (main thread, or the waker while the main thread waits:
        behind its blocking pop, after_pop)."""
        request = ClaimRequest(
            self.spec.name,
            room,
            self.lease_ms,
            self.spec.global_limit or 0,
            isolate_suspects=True,
            solo=not self.held,
            rate=self.spec.rate,
            burst=self.spec.burst,
            group_rate=self.spec.group_rate,
            group_concurrency=self.spec.group_concurrency,
            cost_limit=self.spec.cost_limit,
            claim_tag=self.claim_tag,
        )
        started = time.perf_counter()
        sent_at = time.monotonic()
        self.last_claim = result = self.queue.claim([request], after_pop=after_pop)
        self.gate.observed(sent_at, result.inbox_seq.get(self.spec.name, 0))
        tasks = result[self.spec.name]
        if after_pop is None:  # a claim behind a pop waited: not a round trip's time
            self.sizer.observe_round_trip(time.perf_counter() - started)
        self.stats.last_claim_at = time.time()
        return tasks

    def _take(self, tasks: list[Task]) -> None:
        """Hold and start claimed tasks (main thread only)."""
        if self.draining:
            self._release(tasks)
            return
        refused, runnable = self._prepare(tasks)
        self._hold(tasks, refused)
        self.runner.submit(runnable)

    def _prepare(self, tasks: list[Task]) -> tuple[list[Failure], list[Task]]:
        """Fill in the agent's defaults; (refused: payloads the agent's type rejects, the
        rest). Touches only the tasks: the waker calls it too."""
        refused: list[Failure] = []
        for task in tasks:
            if task.max_attempts is None:
                task.max_attempts = self.spec.max_attempts
            task.emitter = self._emit
            failure = check_payload(self.spec, task)
            if failure is not None:
                refused.append(failure)
        if not refused:
            return refused, tasks
        refused_ids = {f.task.id for f in refused}
        return refused, [t for t in tasks if t.id not in refused_ids]

    def _hold(self, tasks: list[Task], refused: list[Failure]) -> None:
        """Count tasks as ours (main thread only); the refused ones fail at once."""
        for task in tasks:
            self.held[task.id] = task
        self.state = "busy"
        if refused:
            self._send([], refused, [])

    def _report(self, item: Outcome | Finished) -> None:
        """A handler's outcome, to the main thread (never ahead of its task's Claimed)."""
        with self._handing_over:
            self.events.put(item)

    def _redis_trouble(self, what: str, error: Exception) -> None:
        """Back off (capped) and log at most one line per interval while Redis is down."""
        self._backoff_until = time.monotonic() + self.backoff.next_s()
        self.outage.failed(what, error)

    # -- finishing -------------------------------------------------------------------------

    def _finish(self, outcomes: list[Outcome]) -> None:
        """Turn outcomes into children, acks and nacks: at most three round trips a batch."""
        completions: list[Completion] = []
        failures: list[Failure] = []
        children: list[Task] = []
        stats = self.stats
        for outcome in outcomes:
            task = outcome.task
            if self.held.get(task.id) is not task:
                continue  # timed out earlier (already nacked), or its lease was lost
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
        self._send(completions, failures, children)

    def _emit(self, task: Task, kind: str, seq: int, blob: bytes) -> None:
        """From a handler (any thread): keep the event for the main thread to send."""
        limit = self.settings.max_event_bytes
        if len(blob) > limit:
            raise InvalidPayload(f"task.{kind}: {len(blob)} bytes, over max_event_bytes ({limit})")
        self._emitted.append(
            (task.run_id, task.id, task.agent, task.attempt, task.deliveries, kind, seq, blob)
        )
        if not self._emits_flagged:  # one wake-up per batch (see _send_events)
            self._emits_flagged = True
            self.events.put(EventsPending())

    def _send_events(self) -> None:
        """Send what handlers emitted, in one pipeline. Events are a view of the work,
        not the work: when Redis cannot take them they are dropped (said once)."""
        self._emits_flagged = False  # before draining: a later emit flags again
        batch = []
        while self._emitted:
            batch.append(self._emitted.popleft())
        if not batch:
            return
        try:
            self.manager.execute(
                lambda c: streams.append(
                    c, self.keys, batch, self.settings.stream_max_len, self._stream_keep_ms
                ),
                retry=False,
            )
        except HandoffError as e:
            self.outage.failed(f"send {len(batch)} event(s)", e)

    def _cancel_held(self, ids: list[str]) -> None:
        """Cancelled tasks (their leases are gone already): an unstarted one never
        starts, a running one's handler is told, and no outcome of theirs is sent."""
        for task_id in ids:
            task = self.held.get(task_id)
            if task is None:
                continue
            self.runner.cancel(task)
            self._forget(task)
            self.stats.cancelled += 1
            log.info("worker %s: task %s cancelled", self.worker_id, task_id)
        if not self.held and not self.draining:
            self.state = "idle"

    def _rate_limited(self, task: Task, pause_s: float) -> None:
        """The handler's API said to slow down: back to its place, uncounted, and the
        agent type pauses everywhere. If Redis cannot be told, its lease runs out (the
        task runs again) and the pause is lost: a 429 is a hint, not a task."""
        try:
            self.queue.release([task], pause_s=pause_s)
        except HandoffError as e:
            self._redis_trouble("release", e)
        self._forget(task)
        log.info("worker %s: %s rate limited, agent paused %.1fs", self.worker_id, task.id, pause_s)

    def _send(self, completions: list[Completion], failures: list[Failure], children) -> None:
        """Children first, then the parents' acks: a crash in between only repeats a
        parent whose children are deduplicated by id.

        When Redis is unreachable the batch is kept and sent again on a later turn of the
        main loop (which keeps handling signals meanwhile); the held leases stay renewed.
        """
        self._unsent.append((completions, failures, children))
        self._flush()

    def _flush(self) -> None:
        if time.monotonic() < self._backoff_until:
            return
        while self._unsent:
            completions, failures, children = self._unsent[0]
            try:
                if children:
                    enqueue_children(self.queue, children)  # (Waits' then-tasks parked)
                    self.handoff_outage.recovered()
                    self._unsent[0] = (completions, failures, [])
                if completions:
                    self.stats.stale += len(self.queue.ack(completions))
                    self._unsent[0] = ([], failures, [])
                if failures:
                    self.stats.stale += len(self.queue.nack(failures))
            except HandoffError as e:
                if children and isinstance(e, ServerOutOfMemory):  # their parents retry later
                    self.handoff_outage.failed(f"hand off {len(children)} task(s)", e)
                    refused = handoffs_refused(completions, failures, children, str(e), self.spec)
                    self._unsent[0] = refused
                    continue
                if not self._still_held(completions, failures):
                    # Every lease of the batch was lost (re-claimed elsewhere): its acks
                    # would change nothing, so a batch Redis keeps refusing never blocks
                    # the ones behind it, nor the claims they free room for.
                    self._unsent.pop(0)
                    log.warning(
                        "worker %s: dropped %d ack(s) whose leases were lost: %s",
                        self.worker_id, len(completions) + len(failures), e,
                    )  # fmt: skip
                    continue
                self._redis_trouble("ack", e)
                return
            self._unsent.pop(0)
            self._account(completions, failures)
        self.backoff.reset()
        self.outage.recovered()

    def _still_held(self, completions: list[Completion], failures: list[Failure]) -> bool:
        tasks = [c.task for c in completions] + [f.task for f in failures]
        return any(self.held.get(t.id) is t for t in tasks)

    def _forget(self, task: Task) -> None:
        """Stop holding this delivery (not a newer delivery of the same id)."""
        if self.held.get(task.id) is task:
            del self.held[task.id]
        self.gate.finished(task)

    def _account(self, completions: list[Completion], failures: list[Failure]) -> None:
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
        self._nudge_waker()
        # A claim the waker made while the main loop was stopping: wait for one in flight
        # (it gives its tasks back itself once it sees the stop), then give back those it
        # handed over that the main loop did not take.
        with self._waker_claiming:
            pass
        self._release(self._claimed_but_not_taken())
        leftovers = list(self.held.values())
        if leftovers:
            # Still running past the grace period: give them back now rather than wait for
            # their leases to expire (the process exit stops the handlers).
            log.warning(
                "worker %s: releasing %d unfinished task(s)", self.worker_id, len(leftovers)
            )
            self._release(leftovers)
        self.runner.stop()
        self._send_events()  # what handlers emitted last
        tracing.flush()
        try:
            self.manager.execute(lambda c: self._deregister(c), retry=False)
        except HandoffError:
            pass
        log.info(
            "worker %s stopped: processed=%d failed=%d (%s)",
            self.worker_id, self.stats.processed, self.stats.failed, exits.NAMES[self.exit_code],
        )  # fmt: skip

    def _claimed_but_not_taken(self) -> list[Task]:
        """Tasks the waker claimed that the main loop never took: to give back. Those it
        had started already are held now, like any other (unfinished: given back too)."""
        tasks: list[Task] = []
        try:
            while True:
                event = self.events.get_nowait()
                if isinstance(event, Claimed) and event.started:
                    self._hold(event.tasks, list(event.refused))
                elif isinstance(event, Claimed):
                    tasks.extend(event.tasks)
        except queue.Empty:
            return tasks

    def _deregister(self, client) -> None:
        pipe = client.pipeline(transaction=False)
        pipe.delete(self.keys.worker(self.worker_id))
        pipe.zrem(self.keys.workers, self.worker_id)
        pipe.execute()

    # -- helper threads --------------------------------------------------------------------

    def _waker_loop(self) -> None:
        """While the main thread has room and saw an empty queue: block in Redis for a wake
        token with the claim queued behind it on the same connection (the server leases the
        tasks the moment the token arrives: one round trip), and hand the tasks over."""
        while not self.stop_event.is_set():
            if not self.want_work.wait(timeout=_TICK_S):
                continue
            # Block for less than the socket timeout, or the read would time out first.
            timeout_s = min(_TICK_S, self._socket_timeout_s / 2)
            last = self.last_claim  # one read: the main thread may swap it meanwhile
            due = last.next_due_ms.get(self.spec.name, -1)
            until_due = -1.0
            if due >= 0:
                until_due = (due - last.server_ms) / 1000.0
                timeout_s = min(timeout_s, max(0.01, until_due))
            try:
                with self._waker_claiming:  # _shutdown waits for a claim in flight
                    if due >= 0 and timeout_s == max(0.01, until_due):
                        # Work is due at a known time (a retry, a rate limit's next start):
                        # wait for it here, to the millisecond, not in BLPOP's coarser
                        # timeout, then claim.
                        if self.stop_event.wait(max(0.0, until_due)):
                            continue
                        self._claim_after_wake(None)
                    else:
                        self._claim_after_wake(timeout_s)
                self.outage.recovered()
            except HandoffError as e:
                self.outage.failed("wait for work", e)
                self.stop_event.wait(max(0.1, self.backoff.current_s()))
                self.events.put(WakeFailed())  # let the main thread retry (and back off)

    def _claim_after_wake(self, pop_timeout_s: float | None) -> None:
        """Claim what room there is, behind a blocking pop of the wake list when
        pop_timeout_s is given (or only pop, with no room: isolating a suspect)."""
        # held only shrinks while the main thread waits, so this room is safe.
        room = 0 if self._isolating() else self.sizer.capacity - len(self.held)
        after_pop = None
        if pop_timeout_s is not None:
            self._waker_popping = True  # _shutdown pushes to the nudge list from now on
            if self.stop_event.is_set():
                return
            after_pop = (self._waker_lists, pop_timeout_s)
        try:
            if room <= 0 or self.draining:
                if after_pop is not None:
                    self.manager.execute(lambda c: c.blpop(list(after_pop[0]), after_pop[1]))
                return
            tasks = self._claim_batch(room, after_pop)
        finally:
            self._waker_popping = False
        if tasks and self.stop_event.is_set():
            self.queue.release(tasks)  # claimed while the worker stopped: give back
        elif tasks:
            # Claim nothing more until the main thread has taken these: until then
            # self.held does not show them (room and "solo" would be wrong).
            self.want_work.clear()
            if self.draining:
                self.events.put(Claimed(tasks))  # the main thread gives them back
                return
            # Straight to the handlers, not through the main thread: one thread hop from
            # wake-up to start. A handler thread is woken before the main thread, so it
            # is first in line for the interpreter (the main thread only counts them as
            # held); _report keeps their outcomes behind this Claimed.
            refused, runnable = self._prepare(tasks)
            begun = threading.Lock()
            begun.acquire()
            with self._handing_over:
                if self.runner.submit(runnable, begun):
                    # Let that thread start its task before the main thread is woken: both
                    # would wait for the interpreter, and the main thread came first about
                    # one pickup in eight, which then started 0.15-0.2 ms later.
                    begun.acquire(timeout=_HANDED_WAIT_S)
                self.events.put(Claimed(tasks, started=True, refused=tuple(refused)))

    def _nudge_waker(self) -> None:
        """Unblock our own waker's pop (stopping): a token in the list only it waits on."""
        if not self._waker_popping:
            return
        nudge = self._waker_lists[1]

        def push(client) -> None:
            pipe = client.pipeline(transaction=False)
            pipe.rpush(nudge, "stop")
            pipe.pexpire(nudge, 10_000)
            pipe.execute()

        try:
            self.manager.execute(push, retry=False)
        except HandoffError:
            pass  # the pop times out on its own (at most _TICK_S)

    def _inbox_loop(self) -> None:
        """Block in Redis on this worker's inbox: the ids of its tasks that were cancelled
        while it held them (cancel.lua pushes them), passed to the main thread at once."""
        inbox = self.agent_keys.inbox(self.claim_tag)
        timeout_s = max(0.1, self._socket_timeout_s / 2)

        def pop_all(client) -> list[bytes]:
            first = client.blpop([inbox], timeout=timeout_s)
            if first is None:
                return []
            return [first[1], *(client.lpop(inbox, 1000) or [])]

        while not self.stop_event.is_set():
            try:
                entries = self.manager.execute(pop_all, retry=False)
            except HandoffError as e:
                self.outage.failed("wait for cancels", e)
                self.stop_event.wait(max(0.1, self.backoff.current_s()))
                continue
            if entries:
                self._apply_cancels([e.decode() for e in entries])

    def _apply_cancels(self, entries: list[str]) -> None:
        """From the inbox thread: the tasks never start from now on (the gate, at once,
        not after a hop through the main thread); each cancel hears whether its handler
        had started; then the main thread tells running handlers and forgets them all."""
        parsed: list[tuple[str, str, int]] = []
        answer_to: list[str] = []
        for entry in entries:  # 'id|token|seq|answers list' (cancel.lua)
            task_id, token, seq, answers = [*entry.split("|"), "", "", ""][:4]
            held = self.held.get(task_id)
            token = token or (held.token if held is not None else "")
            parsed.append((task_id, token, int(seq or 0)))
            answer_to.append(answers)
        started = self.gate.applied(parsed)
        answers = [
            (key, f"{tid}|{'started' if began else 'waiting'}")
            for (tid, _, _), key, began in zip(parsed, answer_to, started, strict=True)
            if key
        ]
        if answers:

            def send(client) -> None:
                pipe = client.pipeline(transaction=False)
                for key, answer in answers:
                    pipe.rpush(key, answer)
                    pipe.pexpire(key, 60_000)
                pipe.execute()

            try:
                self.manager.execute(send)
            except HandoffError as e:  # the cancel reports it unanswered: no harm
                self.outage.failed("answer a cancel", e)
        self.events.put(CancelRequested([tid for tid, _, _ in parsed]))

    def _check_lease(self, task: Task) -> tuple[int, bool]:
        """For the gate (a handler thread): the inbox's sequence number, and whether the
        task's lease is still this delivery's. One round trip."""
        seq_key, tokens = self.agent_keys.inbox_seq(self.claim_tag), self.agent_keys.tokens

        def read(client) -> list:
            pipe = client.pipeline(transaction=False)
            pipe.get(seq_key)
            pipe.hget(tokens, task.id)
            return pipe.execute()

        seq, holder = self.manager.execute(read)
        return int(seq or 0), holder is not None and holder.decode() == task.token

    def _lease_loop(self) -> None:
        """Renew every held lease each third of the lease; fail tasks past their timeout;
        replace this process when a cancelled handler outstays cancel_grace_s."""
        interval = max(0.05, self.lease_ms / 3000.0)
        renew_at = time.monotonic() + interval
        # Renewals keep their schedule; timeouts and ignored cancels are also looked at in
        # between (at least every 0.25 s), so a cancel's grace is kept to that.
        while not self.stop_event.wait(max(0.0, min(renew_at - time.monotonic(), 0.25))):
            self._check_ignored_cancels()
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
                    self.stats.recycle_reason = f"task {task.id} timed out"
                    self.exit_code = exits.EXIT_RECYCLE
                    self.events.put(Signalled(signal.SIGTERM))
            if time.monotonic() < renew_at:
                continue
            renew_at = time.monotonic() + interval
            held = list(self.held.values())
            if not held:
                continue
            try:
                lost = self.queue.extend(held, self.lease_ms)
            except HandoffError as e:
                self.outage.failed("lease renewal", e)
                continue
            if lost.cancelled:
                self.events.put(CancelRequested(lost.cancelled))
            gone = set(lost) - set(lost.cancelled)
            if gone:
                self._abandon([t for t in held if t.id in gone])

    def _check_ignored_cancels(self) -> None:
        grace_s = self.settings.cancel_grace_s
        ignoring = self.runner.ignoring_cancel(time.monotonic(), grace_s)
        if ignoring and self.exit_code != exits.EXIT_RECYCLE:
            log.warning(
                "worker %s: the handler of cancelled task %s still runs %gs after the "
                "cancel; recycling this worker",
                self.worker_id, ignoring[0].id, grace_s,
            )  # fmt: skip
            self.exit_code = exits.EXIT_RECYCLE
            self.stats.recycle_reason = f"cancelled task {ignoring[0].id} ignored its cancel"
            self.events.put(Signalled(signal.SIGTERM))

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

    def _pulse_loop(self) -> None:
        """The supervisor's sign that this interpreter still runs (liveness.py): a thread
        of its own, so a slow Redis never delays it, and one that needs the GIL."""
        every_s = beat_every_s(self.settings.worker_stall_s)
        while self.pulse is not None:
            self.pulse.beat()
            time.sleep(every_s)

    def _heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat_interval_s
        ttl_ms = int(max(5 * interval, 3.0) * 1000)
        while True:
            self._heartbeat(ttl_ms)
            self._check_recycle()
            if self.stop_event.wait(interval):
                return

    def _heartbeat(self, ttl_ms: int) -> None:
        fields = self.stats.health_fields(
            worker_id=self.worker_id,
            agent=self.spec.name,
            state=self.state,
            in_flight=len(self.held),
            max_concurrent=self.spec.max_concurrent,
            global_limit=self.spec.global_limit,
            manager=self.manager,
        )
        key = self.keys.worker(self.worker_id)
        if not hasattr(self, "_schema"):  # worked out once: pydantic builds it each call
            self._schema = published_schema(self.spec)
        schema = self._schema

        def write(client) -> None:
            pipe = client.pipeline(transaction=False)
            pipe.hset(key, mapping=fields)
            pipe.pexpire(key, ttl_ms)
            pipe.zadd(self.keys.workers, {self.worker_id: now_ms()})
            # Known before any task of it is enqueued: a run cancel marks every agent known.
            pipe.sadd(self.keys.agents, self.spec.name)
            if schema is None:  # an agent type that dropped its payload type
                pipe.hdel(self.keys.schemas, self.spec.name)
            else:
                pipe.hset(self.keys.schemas, self.spec.name, schema)
            pipe.execute()

        try:
            self.manager.execute(write, retry=False)
        except ServerOutOfMemory as e:  # the monitor sees the heartbeat missing
            self.heartbeat_outage.failed("heartbeat", e)
        except HandoffError:
            pass  # an outage: the main loop's outage log says it
        else:
            self.heartbeat_outage.recovered()

    def _check_recycle(self) -> None:
        s = self.settings
        reason = ""
        if s.max_tasks_per_worker and self.stats.processed >= s.max_tasks_per_worker:
            reason = f"processed {self.stats.processed} tasks"
        elif s.max_rss_mb and self.stats.rss_mb() > s.max_rss_mb:
            reason = f"RSS {self.stats.rss_mb():.0f} MB over max_rss_mb={s.max_rss_mb:g}"
        elif s.max_worker_age_s and time.time() - self.stats.started > s.max_worker_age_s:
            reason = f"older than max_worker_age_s={s.max_worker_age_s:g}"
        if reason and not self._recycle_reason:
            self._recycle_reason = self.stats.recycle_reason = reason
            log.info("worker %s: recycling (%s)", self.worker_id, reason)
            self.exit_code = exits.EXIT_RECYCLE
            self.events.put(Signalled(signal.SIGTERM))
