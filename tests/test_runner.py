"""The handler threads of a sync agent (SyncRunner): which thread starts a task, the
hand-over a waker waits on, and stopping. Real threads, no Redis."""

from __future__ import annotations

import queue
import threading
import time

from handoff.protocol.task import Task
from handoff.runtime.agents import AgentSpec
from handoff.runtime.runner import SyncRunner

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
