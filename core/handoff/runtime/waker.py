"""The waker: while the worker has room and saw an empty queue, wait in Redis for work.

Runs in: a worker process, its own thread. One pipeline holds a BLPOP on the agent's wake
list and the claim behind it, so the server leases work the moment it arrives (one round
trip), and the tasks go straight to the handlers, not through the main thread: one thread
hop from wake-up to start. The main thread hears of them afterwards (Claimed).
"""

from __future__ import annotations

import threading

from handoff.errors import HandoffError
from handoff.runtime.claimer import Claimer
from handoff.runtime.worker_events import Claimed, HelperThread, Shared, WakeFailed

TICK_S = 1.0
_HANDED_WAIT_S = 0.005  # the most the waker waits for a handler thread to start its task


class Waker(HelperThread):
    name = "waker"

    def __init__(
        self,
        shared: Shared,
        claimer: Claimer,
        runner,  # the worker's SyncRunner or AsyncRunner
        handing_over: threading.Lock,
        lists: tuple[str, str],
        socket_timeout_s: float,
    ) -> None:
        super().__init__(shared)
        self.claimer = claimer
        self.runner = runner
        # Handlers report under this lock too: a task's Claimed is always ahead of its
        # outcome on the main thread's queue.
        self.handing_over = handing_over
        self.lists = lists  # the wake list, and our own nudge list (stopping)
        self.socket_timeout_s = socket_timeout_s
        self.want_work = threading.Event()  # set by the main thread: the queue was empty
        self._claiming = threading.Lock()  # held while a claim is in flight
        self._popping = False  # blocked in BLPOP: a stop must nudge it

    def run(self) -> None:
        """While the main thread has room and saw an empty queue: block in Redis for a wake
        token with the claim queued behind it on the same connection (the server leases the
        tasks the moment the token arrives: one round trip), and hand the tasks over."""
        name = self.claimer.spec.name
        while not self.stop_event.is_set():
            if not self.want_work.wait(timeout=TICK_S):
                continue
            # Block for less than the socket timeout, or the read would time out first.
            timeout_s = min(TICK_S, self.socket_timeout_s / 2)
            last = self.claimer.last  # one read: the main thread may swap it meanwhile
            due = last.next_due_ms.get(name, -1)
            until_due = -1.0
            if due >= 0:
                until_due = (due - last.server_ms) / 1000.0
                timeout_s = min(timeout_s, max(0.01, until_due))
            try:
                with self._claiming:  # a stopping worker waits for a claim in flight
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
        held, claimer = self.held, self.claimer
        # held only shrinks while the main thread waits, so this room is safe.
        room = 0 if claimer.isolating(held) else claimer.sizer.capacity - len(held)
        after_pop = None
        if pop_timeout_s is not None:
            self._popping = True  # a stop pushes to the nudge list from now on
            if self.stop_event.is_set():
                return
            after_pop = (self.lists, pop_timeout_s)
        try:
            if room <= 0 or held.draining:
                if after_pop is not None:
                    self.manager.execute(lambda c: c.blpop(list(after_pop[0]), after_pop[1]))
                return
            tasks = claimer.claim(room, not held, after_pop)
        finally:
            self._popping = False
        if tasks and self.stop_event.is_set():
            claimer.queue.release(tasks)  # claimed while the worker stopped: give back
        elif tasks:
            # Claim nothing more until the main thread has taken these: until then its
            # held does not show them (room and "solo" would be wrong).
            self.want_work.clear()
            if held.draining:
                self.events.put(Claimed(tasks))  # the main thread gives them back
                return
            self._hand_over(tasks)

    def _hand_over(self, tasks: list) -> None:
        """Straight to the handlers, then tell the main thread. A handler thread is woken
        before the main thread, so it is first in line for the interpreter (the main
        thread only counts them as held); the worker's report keeps their outcomes
        behind this Claimed."""
        refused, runnable = self.claimer.prepare(tasks)
        begun = threading.Lock()
        begun.acquire()
        with self.handing_over:
            if self.runner.submit(runnable, begun):
                # Let that thread start its task before the main thread is woken: both
                # would wait for the interpreter, and the main thread came first about
                # one pickup in eight, which then started 0.15-0.2 ms later.
                begun.acquire(timeout=_HANDED_WAIT_S)
            self.events.put(Claimed(tasks, started=True, refused=tuple(refused)))

    def stop(self) -> None:
        """From the main thread, stopping (stop_event set): unblock our pop, and wait for
        a claim in flight (it gives its tasks back itself once it sees the stop)."""
        self._nudge()
        with self._claiming:
            pass

    def _nudge(self) -> None:
        """Unblock our own pop: a token in the list only this waker waits on."""
        if not self._popping:
            return
        nudge = self.lists[1]

        def push(client) -> None:
            pipe = client.pipeline(transaction=False)
            pipe.rpush(nudge, "stop")
            pipe.pexpire(nudge, 10_000)
            pipe.execute()

        try:
            self.manager.execute(push, retry=False)
        except HandoffError:
            pass  # the pop times out on its own (at most TICK_S)
