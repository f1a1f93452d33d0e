"""Run handlers with capability-limited concurrency.

Runs in: a worker process (after fork). A SyncRunner owns max_concurrent threads; an
AsyncRunner owns one event loop thread running at most max_concurrent coroutines. Either
way, at most max_concurrent handlers run at once, tasks not yet started can be taken back
(graceful shutdown, lost leases), and every outcome goes to one `report` callable (the
worker's event queue; the async runner reports a list per loop iteration), so the
worker's main thread is the only one that talks to Redis about results.
"""

from __future__ import annotations

import asyncio
import math
import os
import selectors
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from handoff.errors import RateLimited
from handoff.protocol.task import Task
from handoff.runtime import tracing
from handoff.runtime.agents import AgentSpec
from handoff.runtime.start_gate import StartGate

# A handler that forks: only the forking thread lives on in the child, and it would go back
# to the runner for the next (prefetched) task, ack into a queue nobody reads and ignore
# SIGTERM (its handler only queues an event). The child belongs to the handler's code: it
# takes the default signal actions and ends when that code returns.
_runner_pid: int | None = None  # the process whose runner runs handlers
_runner_loop: asyncio.AbstractEventLoop | None = None  # its event loop (async handlers)
_forked_from_handler = False
_forking_task: asyncio.Task | None = None  # the coroutine that forked (async handlers)


def _after_fork_in_child() -> None:
    global _forked_from_handler, _forking_task
    if _runner_pid is not None and _runner_pid != os.getpid():
        _forked_from_handler = True
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        # A coroutine that forked: the loop's other handlers are not the child's. (The
        # loop is named: asyncio sees no running loop in a forked child.) A thread that
        # forked came alone: the other handler threads are not in the child.
        loop = _runner_loop
        _forking_task = asyncio.current_task(loop) if loop is not None else None
        if _forking_task is not None:
            for other in asyncio.all_tasks(loop):
                if other is not _forking_task:
                    other.cancel()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _end_if_forked() -> None:
    """Where a handler returns: in a process the handler forked, stop here."""
    if _forked_from_handler:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@dataclass(slots=True)
class Outcome:
    task: Task
    value: Any = None
    error: str | None = None  # set when the handler raised or timed out
    traceback: str = ""
    elapsed_s: float = 0.0
    timed_out: bool = False
    pause_s: float | None = None  # the handler raised RateLimited(pause_s)
    traceparent: str | None = None  # its span (OpenTelemetry): the parent of its children


@dataclass(slots=True, frozen=True)
class Finished:
    """Outcomes of coroutines that finished in one event-loop iteration, reported together."""

    outcomes: list[Outcome]


Report = Callable[[Outcome | Finished], None]


class _BaseRunner:
    def __init__(self, spec: AgentSpec, report: Report, gate: StartGate | None = None) -> None:
        global _runner_pid
        _runner_pid = os.getpid()
        self.spec = spec
        self.report = report
        self.max_concurrent = spec.max_concurrent
        self.started_at: dict[str, tuple[float, Task]] = {}  # running: id -> (monotonic, task)
        # Asked right before a handler starts: was the task cancelled meanwhile?
        self.gate = gate if gate is not None else StartGate()
        self.skip = self.gate.skip  # (id, token) deliveries not to start
        self.peak_running = 0
        self.cancelled_at: dict[str, float] = {}  # running, cancelled: id -> monotonic

    @property
    def running(self) -> int:
        return len(self.started_at)

    def _mark_started(self, task: Task) -> None:
        self.started_at[task.id] = (time.monotonic(), task)
        running = len(self.started_at)
        if running > self.peak_running:
            self.peak_running = running

    def cancel(self, task: Task) -> bool:
        """The task was cancelled: do not start it, or tell its running handler (its flag;
        an async runner also cancels its coroutine). Its outcome is the caller's to drop.
        Returns whether its handler began (an outcome comes), else it never will."""
        self.skip.add((task.id, task.token))
        task.cancelled.set()
        running = self.started_at.get(task.id)
        if running is not None and running[1] is task:
            self.cancelled_at.setdefault(task.id, time.monotonic())
        return self.gate.begun(task)

    def ignoring_cancel(self, now: float, grace_s: float) -> list[Task]:
        """Running tasks cancelled more than grace_s ago whose handlers go on."""
        out = []
        for task_id, at in list(self.cancelled_at.items()):
            running = self.started_at.get(task_id)
            if running is None or not running[1].cancelled:
                self.cancelled_at.pop(task_id, None)  # it ended (or a new delivery runs)
            elif now - at > grace_s:
                out.append(running[1])
        return out

    def overdue(self, now: float) -> list[tuple[Task, float]]:
        """Running tasks past their timeout: (task, seconds running)."""
        out = []
        for started, task in list(self.started_at.values()):
            limit = task.timeout_s or self.spec.timeout_s
            if limit is not None and now - started > limit:
                out.append((task, now - started))
        return out


class _Slot:
    """One handler thread's mailbox: the task handed to it, the lock it waits on (held
    while idle; released by the hand-over), and a lock to release as it starts the task."""

    __slots__ = ("begun", "task", "wake")

    def __init__(self) -> None:
        self.task: Task | None = None
        self.wake = threading.Lock()
        self.wake.acquire()
        self.begun: threading.Lock | None = None


class SyncRunner(_BaseRunner):
    """max_concurrent threads; a task goes straight to the thread that went idle last (its
    stack and the handler's code are the warmest in the CPU's caches: an idle worker's
    pickup starts sooner), or waits in a deque of ready tasks while all are busy."""

    def __init__(self, spec: AgentSpec, report: Report, gate: StartGate | None = None) -> None:
        super().__init__(spec, report, gate)
        self._ready: deque[Task | None] = deque()
        self._lock = threading.Lock()
        self._idle: list[_Slot] = []  # the last to go idle at the end
        self._threads = [
            threading.Thread(target=self._loop, name=f"handler-{i}", daemon=True)
            for i in range(spec.max_concurrent)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, tasks: list[Task], begun: threading.Lock | None = None) -> bool:
        """Start tasks on idle threads, or queue them. begun (a held lock): the thread
        given the first task releases it as it starts that task, so a caller waiting on it
        lets that thread run before whatever it wakes next. Returns whether the first
        task went to a thread at once (else nothing will release begun soon)."""
        handed = False
        with self._lock:
            for task in tasks:
                if self._idle:
                    slot = self._idle.pop()
                    if task is tasks[0]:
                        slot.begun, handed = begun, True
                    self._hand(slot, task)
                else:
                    self._ready.append(task)
        return handed

    def _hand(self, slot: _Slot, task: Task | None) -> None:
        """Give an idle thread its task (None: stop); counted as started from here, so
        take_unstarted never sees it. Under self._lock."""
        if task is not None:
            self._mark_started(task)
        slot.task = task
        slot.wake.release()

    def take_unstarted(self) -> list[Task]:
        with self._lock:
            taken = [t for t in self._ready if t is not None]
            self._ready.clear()
            return taken

    def stop(self) -> None:
        with self._lock:
            self._ready.clear()
            idle, self._idle = self._idle, []
            for slot in idle:
                self._hand(slot, None)
            self._ready.extend([None] * (len(self._threads) - len(idle)))

    def _next(self, slot: _Slot) -> tuple[Task | None, bool]:
        """The next task, and whether it waited for a slot (not handed over as claimed)."""
        with self._lock:
            if self._ready:
                task = self._ready.popleft()
                if task is not None:
                    self._mark_started(task)
                return task, True
            self._idle.append(slot)
        slot.wake.acquire()  # until _hand
        task, slot.task = slot.task, None
        begun, slot.begun = slot.begun, None
        if begun is not None:
            begun.release()
        return task, False

    def _loop(self) -> None:
        handler = self.spec.handler
        traced = tracing.active()  # decided once: a worker's tracing is set up at its start
        slot = _Slot()
        while True:
            task, waited = self._next(slot)
            if task is None:
                return
            if not self.gate.admit(task, waited):  # cancelled while it waited for this slot
                self.started_at.pop(task.id, None)
                continue
            started = time.perf_counter()
            span = None
            try:
                if traced:
                    with tracing.task_span(task) as span:
                        outcome = Outcome(task, handler(task))
                else:
                    outcome = Outcome(task, handler(task))
            except RateLimited as e:
                outcome = Outcome(task, error=str(e), pause_s=e.retry_after_s)
            except BaseException as e:  # the handler's failure is the task's, not ours
                outcome = Outcome(task, error=f"{type(e).__name__}: {e}", traceback=_tb())
            if span is not None:
                outcome.traceparent = span.traceparent
            _end_if_forked()
            outcome.elapsed_s = time.perf_counter() - started
            self.started_at.pop(task.id, None)
            self.report(outcome)


class PreciseSelector(selectors.DefaultSelector):  # type: ignore[misc, valid-type]
    """The default selector with timers to the microsecond, not the millisecond.

    epoll waits in whole milliseconds and asyncio's selector rounds up, so every
    asyncio.sleep(0.01) overshoots by half a millisecond on average: 5% of a 10 ms
    task's slot. Here the wait is rounded down to whole milliseconds and the rest is
    slept precisely (under a millisecond, during which fd events wait, as they did for
    the rounding), so a timer fires on time.
    """

    def select(self, timeout: float | None = None):
        if timeout is None or timeout <= 0:
            return super().select(timeout)
        deadline = time.monotonic() + timeout
        whole_ms = math.floor(timeout * 1000) / 1000
        ready = super().select(whole_ms) if whole_ms > 0 else []
        if ready:
            return ready
        remaining = deadline - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
        return super().select(0)


class AsyncRunner(_BaseRunner):
    """One event loop thread; at most max_concurrent coroutines; real timeouts."""

    def __init__(self, spec: AgentSpec, report: Report, gate: StartGate | None = None) -> None:
        super().__init__(spec, report, gate)
        self._pending: deque[Task] = deque()
        self._coroutines: dict[str, asyncio.Task] = {}  # running: id -> its coroutine
        self._traced = tracing.active()
        self._finished: list[Outcome] = []
        self._flush_scheduled = False
        global _runner_loop
        self._loop = _runner_loop = asyncio.SelectorEventLoop(PreciseSelector())
        self._thread = threading.Thread(target=self._loop.run_forever, name="asyncio", daemon=True)
        self._thread.start()

    def submit(self, tasks: list[Task], begun: threading.Lock | None = None) -> bool:
        """Start tasks on the loop (begun is never released: see SyncRunner.submit)."""
        self._loop.call_soon_threadsafe(self._add, tasks)
        return False

    def _add(self, tasks: list[Task]) -> None:
        self._pending.extend(tasks)
        self._pump({id(task) for task in tasks})

    def _pump(self, claimed_now: set[int] | frozenset[int] = frozenset()) -> None:
        """Start pending tasks while there is room; those of claimed_now (just claimed:
        not waiting) go without the gate's freshness check (see start_gate.py)."""
        while self._pending and self.running < self.max_concurrent:
            task = self._pending.popleft()
            admitted = self.gate.admit(task, waited=id(task) not in claimed_now, block=False)
            if admitted is None:  # Redis unreachable: try again shortly, loop running on
                self._pending.appendleft(task)
                self._loop.call_later(0.1, self._pump)
                return
            if not admitted:
                continue
            self._mark_started(task)
            self._coroutines[task.id] = self._loop.create_task(self._run(task))

    async def _run(self, task: Task) -> None:
        started = time.perf_counter()
        limit = task.timeout_s or self.spec.timeout_s
        span = None
        try:
            if self._traced:
                with tracing.task_span(task) as span:
                    value = await asyncio.wait_for(self.spec.handler(task), limit)
            else:
                value = await asyncio.wait_for(self.spec.handler(task), limit)
            outcome = Outcome(task, value)
        except TimeoutError:
            outcome = Outcome(task, error=f"timed out after {limit}s", timed_out=True)
        except RateLimited as e:
            outcome = Outcome(task, error=str(e), pause_s=e.retry_after_s)
        except BaseException as e:
            outcome = Outcome(task, error=f"{type(e).__name__}: {e}", traceback=_tb())
        if span is not None:
            outcome.traceparent = span.traceparent
        if _forked_from_handler:  # in a process a handler forked
            if asyncio.current_task(self._loop) is _forking_task:
                _end_if_forked()
            return  # another handler's coroutine, cancelled in the child: nothing to report
        outcome.elapsed_s = time.perf_counter() - started
        self.started_at.pop(task.id, None)
        self._coroutines.pop(task.id, None)
        self._finished.append(outcome)
        if not self._flush_scheduled:
            # Coroutines finishing in the same loop iteration are reported together:
            # one wake-up and one ack round trip for the lot.
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        self._pump()

    def _flush(self) -> None:
        self._flush_scheduled = False
        finished, self._finished = self._finished, []
        if finished:
            self.report(Finished(finished))

    def cancel(self, task: Task) -> bool:
        began = super().cancel(task)
        self._loop.call_soon_threadsafe(self._cancel_coroutine, task)
        return began

    def _cancel_coroutine(self, task: Task) -> None:
        coroutine = self._coroutines.get(task.id)
        running = self.started_at.get(task.id)
        if coroutine is not None and running is not None and running[1] is task:
            coroutine.cancel()  # CancelledError at the handler's next await

    def take_unstarted(self) -> list[Task]:
        done = threading.Event()
        taken: list[Task] = []

        def take() -> None:
            taken.extend(self._pending)
            self._pending.clear()
            done.set()

        self._loop.call_soon_threadsafe(take)
        done.wait(5)
        return taken

    def overdue(self, now: float) -> list[tuple[Task, float]]:
        return []  # asyncio.wait_for cancels overdue coroutines itself

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)


def make_runner(spec: AgentSpec, report: Report, gate: StartGate | None = None) -> _BaseRunner:
    """The runner for the agent's kind of handler; gate: see start_gate.py."""
    runner = AsyncRunner if spec.is_async else SyncRunner
    return runner(spec, report, gate)


def _tb() -> str:
    return traceback.format_exc()[-2000:]
