"""The handler threads of a sync agent (SyncRunner): which thread starts a task, the
hand-over a waker waits on, and stopping. Real threads, no Redis."""

from __future__ import annotations

import queue
import threading
import time

from handoff.protocol.task import Task
from handoff.runtime.agents import AgentSpec
from handoff.runtime.runner import SyncRunner
from handoff.runtime.start_gate import StartGate

DEADLINE_S = 10.0


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def make(handler, threads: int) -> tuple[SyncRunner, queue.SimpleQueue]:
    outcomes: queue.SimpleQueue = queue.SimpleQueue()
    runner = SyncRunner(AgentSpec("a", handler, threads), outcomes.put)
    wait_for(lambda: len(runner._idle) == threads, "every thread to wait")
    return runner, outcomes


def task(i: int, payload=None) -> Task:
    return Task(f"a.{i}", "a", payload)


def test_each_task_goes_to_the_thread_that_went_idle_last():
    """The warmest thread starts the next task; one condition's waiters would take turns
    (the longest idle first), so these tasks would each run on another thread."""
    runner, outcomes = make(lambda t: threading.current_thread().name, threads=4)
    names = []
    for i in range(5):
        runner.submit([task(i)])
        names.append(outcomes.get(timeout=DEADLINE_S).value)
        wait_for(lambda: len(runner._idle) == 4, "the thread to wait again")
    assert len(set(names)) == 1, names
    runner.stop()


def test_begun_is_released_as_a_thread_starts_its_task_and_never_while_all_are_busy():
    entered, release = threading.Event(), threading.Event()

    def handler(t: Task):
        entered.set()
        release.wait(DEADLINE_S)
        return t.payload

    runner, outcomes = make(handler, threads=1)
    first = threading.Lock()
    first.acquire()
    assert runner.submit([task(1, "first")], first) is True
    assert first.acquire(timeout=DEADLINE_S)  # released by the thread that took it
    assert entered.wait(DEADLINE_S)
    second = threading.Lock()
    second.acquire()
    assert runner.submit([task(2, "second")], second) is False  # queued: no thread free
    assert runner.take_unstarted() == [task(2, "second")]  # it never started
    runner.submit([task(3, "third")])
    release.set()
    assert [outcomes.get(timeout=DEADLINE_S).value for _ in range(2)] == ["first", "third"]
    assert not second.acquire(blocking=False)  # nobody started it, nobody released it
    runner.stop()


def test_stop_ends_the_idle_threads_at_once_and_a_busy_one_after_its_task():
    busy: list[str] = []
    entered, release = threading.Event(), threading.Event()

    def handler(t: Task):
        busy.append(threading.current_thread().name)
        entered.set()
        return release.wait(DEADLINE_S)

    runner, outcomes = make(handler, threads=3)
    runner.submit([task(1)])
    assert entered.wait(DEADLINE_S)
    runner.stop()
    for thread in runner._threads:
        if thread.name not in busy:
            thread.join(DEADLINE_S)
            assert not thread.is_alive()
    release.set()
    assert outcomes.get(timeout=DEADLINE_S).value is True
    for thread in runner._threads:
        thread.join(DEADLINE_S)
        assert not thread.is_alive()


def test_a_delivery_let_go_while_queued_for_a_slot_never_starts_and_leaves_no_skip_entry():
    """A cancelled task waiting in the slot's queue is let go by its worker (finished): its
    skip entry goes, and the task still never starts when the busy thread frees up."""
    gate = StartGate()
    release = threading.Event()
    started: list[str] = []

    def handler(t: Task) -> None:
        started.append(t.id)
        release.wait(DEADLINE_S)

    runner = SyncRunner(AgentSpec("a", handler, 1), lambda outcome: None, gate)
    wait_for(lambda: len(runner._idle) == 1, "the thread to wait")
    busy, queued = task(1), task(2)
    queued.token = "t2"
    runner.submit([busy, queued])
    wait_for(lambda: started == ["a.1"], "the first task to start")
    assert not runner.cancel(queued)  # it had not begun
    gate.finished(queued)  # its worker lets it go (released)
    assert gate.skip == set()
    release.set()
    wait_for(lambda: runner.running == 0 and len(runner._idle) == 1, "the thread idle again")
    assert started == ["a.1"]
    runner.stop()


def test_the_skip_set_forgets_what_is_not_held_after_a_prune_period_and_keeps_the_held():
    """Cancels heard for deliveries never held (or held no more) leave the skip set at the
    second prune after they came; a held delivery's entry stays."""
    gate = StartGate(prune_every_s=0)
    gate.applied([("a.1", "t1", 1), ("a.2", "t2", 2)])
    held = {"a.2": Task("a.2", "a", None, token="t2")}  # the worker's held, by id
    gate.prune(held)  # the first look: both are new
    assert gate.skip == {("a.1", "t1"), ("a.2", "t2")}
    gate.applied([("a.3", "t3", 3)])
    gate.prune(held)
    assert gate.skip == {("a.2", "t2"), ("a.3", "t3")}
    gate.prune(held)
    assert gate.skip == {("a.2", "t2")}
    late = Task("a.2", "a", None, token="t2")
    assert gate.admit(late, waited=False) is False  # still never starts
