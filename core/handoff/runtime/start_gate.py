"""Whether a claimed task may still start: the hand-over to a slot checks its cancel.

Runs in: a worker process (handler threads or the event loop ask; the inbox thread and
claims tell). A worker leases a few tasks beyond its free slots (prefetch); one may be
cancelled while it waits, and the worker hears of it through its inbox, a moment later. So
a task is handed to a slot only while the worker knows it has applied every cancel pushed
to its inbox: each claim returns the inbox's sequence number (cancel.lua), and a reply sent
less than START_FRESH_S ago whose number this worker has applied is such knowledge. A
cancel waits longer than that for the worker's answer (protocol/cancel.py), so once it
returns, a task that had not started never does.

A task handed to a free slot straight from its claim's reply is started without more ado
(its cancel may cross the claim in flight: it is then told it started, and the handler is
told at once). A task that waited for a slot (prefetched) needs the knowledge above. The
hot path pays nothing more: claims come often while tasks are short, and each refreshes the
knowledge. Only a waiting task handed over when no claim was sent for START_FRESH_S (slow
tasks: the round trip is small beside them; or every one when round trips take longer than
START_FRESH_S), or while a cancel is being applied, costs one round trip (check): is its
lease still ours (then it starts, as a task fresh from its claim would), and what is the
inbox's number.

The skip set stays small: a delivery its worker lets go is marked on the task itself
(never started from then on, wherever a slot's queue still has it) and leaves the set;
what the set keeps of deliveries never held (a cancel heard before, or after, its claim)
goes after one to two PRUNE_EVERY_S, far longer than a claim's reply can be in flight.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from handoff.errors import HandoffError
from handoff.protocol.cancel import START_FRESH_S
from handoff.protocol.task import Task

Key = tuple[str, str]  # (task id, lease token): one delivery
# check(task) -> (the inbox's sequence number, whether the task's lease is still ours)
Check = Callable[[Task], tuple[int, bool]]
PRUNE_EVERY_S = 60.0


class StartGate:
    def __init__(
        self,
        check: Check | None = None,
        fresh_s: float = START_FRESH_S,
        prune_every_s: float = PRUNE_EVERY_S,
    ) -> None:
        self._check = check
        self.fresh_s = fresh_s
        self.prune_every_s = prune_every_s
        self._next_prune = time.monotonic() + prune_every_s
        self._old: set[Key] = set()  # what skip held at the last prune
        self._lock = threading.Lock()
        self.skip: set[Key] = set()  # deliveries never to start (cancelled, lease lost)
        self._begun: set[Key] = set()  # deliveries handed to a slot, still held
        self._applied_seq = 0  # the last inbox entry applied (skip updated)
        self._fresh_until = 0.0  # monotonic: every cancel pushed so far is applied until

    def observed(self, sent_at: float, seq: int) -> None:
        """A reply (sent at monotonic sent_at) said the inbox's number was seq."""
        with self._lock:
            if seq <= self._applied_seq:
                self._fresh_until = max(self._fresh_until, sent_at + self.fresh_s)

    def applied(self, entries: list[tuple[str, str, int]]) -> list[bool]:
        """Cancels from the inbox ((id, token, seq), in order): never start these; for
        each, whether its handler had started already."""
        started = []
        with self._lock:
            for task_id, token, seq in entries:
                self.skip.add((task_id, token))
                started.append((task_id, token) in self._begun)
                self._applied_seq = max(self._applied_seq, seq)
        return started

    def admit(self, task: Task, waited: bool = True, block: bool = True) -> bool | None:
        """Right before the handler starts: True to run it (counted as begun), False if it
        was cancelled (or its lease lost) and must not start. A task handed to a slot as
        it was claimed (waited=False) is started as the claim's own reply says: a cancel
        meeting it in flight is told it started, and its handler is told at once. While
        Redis cannot be asked: wait for it, or (block=False: an event loop) None."""
        key = (task.id, task.token)
        if not waited:
            with self._lock:
                if key in self.skip or task._let_go:
                    return False
                self._begun.add(key)
                return True
        checked = False  # its own lease was just found ours in Redis: start it now
        failures = 0
        while True:
            with self._lock:
                if key in self.skip or task._let_go:
                    return False
                if checked or self._check is None or time.monotonic() < self._fresh_until:
                    self._begun.add(key)
                    return True
            sent_at = time.monotonic()
            try:
                seq, ours = self._check(task)
            except HandoffError:  # Redis unreachable: wait for it (the lease is renewed)
                if not block:
                    return None
                failures += 1
                time.sleep(min(0.05 * 2**failures, 1.0))
                continue
            if not ours:
                with self._lock:
                    self.skip.add(key)
                return False
            checked = True  # (a cancel after the check meets it started, as after a claim)
            self.observed(sent_at, seq)

    def begun(self, task: Task) -> bool:
        """Whether this delivery was admitted (its handler runs, or ran and its outcome is
        on its way). Asked once it is in skip, the answer holds: admit decides under the
        lock whether it begins."""
        with self._lock:
            return (task.id, task.token) in self._begun

    def finished(self, task: Task) -> None:
        """Its worker no longer holds it (acked, failed, released, cancelled, lost): until
        then a cancel that finds it leased hears it had started, even if it has returned.
        One that had not started never does (a slot's queue may still have it)."""
        key = (task.id, task.token)
        with self._lock:
            task._let_go = True
            self._begun.discard(key)
            self.skip.discard(key)

    def prune(self, held: Mapping[str, Task]) -> None:
        """Every prune_every_s (the worker's main loop asks each turn, passing what it
        holds by id): forget the deliveries never to start that were in skip at the last
        prune and are not held."""
        now = time.monotonic()
        if now < self._next_prune:
            return
        self._next_prune = now + self.prune_every_s
        holding = {(t.id, t.token) for t in held.values()} if self._old else set()
        with self._lock:
            self.skip.difference_update(self._old - holding)
            self._old = set(self.skip)
