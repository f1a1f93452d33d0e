"""What a worker's helper threads tell its main thread, and what they may read of it.

Runs in: a worker process. The main thread waits on one SimpleQueue (SimpleQueue.put is
safe inside a signal handler); every helper thread (waker, inbox, lease keeper, heartbeat)
says what it saw there as one of these small types, besides the runner's Outcome and
Finished, and the main loop matches on the type (an unknown one raises). What the helper
threads need to know of the main thread's state they read through a HeldView, never
writing it: the main thread is the only one that changes what it holds.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from handoff.backoff import Backoff
from handoff.connection.manager import RedisManager
from handoff.connection.outage import OutageLog
from handoff.protocol.queue import Failure
from handoff.protocol.task import Task
from handoff.runtime import exits

# The helper threads say what they do under the worker's name: one logger per process.
log = logging.getLogger("handoff.runtime.worker")


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
    """A stop signal arrived."""

    signum: int


@dataclass(slots=True, frozen=True)
class Recycle:
    """A helper thread asks the worker to drain and exit with this status (a task timed
    out, a handler ignored its cancel, a recycling limit was reached, a thread failed):
    the main thread records why and drains as on SIGTERM."""

    exit_code: int
    reason: str


class Holder(Protocol):
    """What a HeldView reads: the worker's main-thread state."""

    held: dict[str, Task]
    draining: bool
    state: str
    exit_code: int


class HeldView:
    """What the worker holds and how it stands, read-only, for the helper threads.

    The main thread alone adds and removes held tasks; a reader takes one C-level copy
    (tasks()) where it iterates, so a change meanwhile never breaks its loop."""

    __slots__ = ("_holder", "by_id")

    def __init__(self, holder: Holder) -> None:
        self._holder = holder
        self.by_id = MappingProxyType(holder.held)

    def __len__(self) -> int:
        return len(self._holder.held)

    def tasks(self) -> list[Task]:
        return list(self._holder.held.values())

    def holds_suspect(self) -> bool:
        """A task delivered before without finishing (its worker died) runs alone here."""
        return any(t.deliveries - (t.attempt - 1) >= 2 for t in self.tasks())

    @property
    def draining(self) -> bool:
        return self._holder.draining

    @property
    def state(self) -> str:
        return self._holder.state

    @property
    def recycling(self) -> bool:
        return self._holder.exit_code == exits.EXIT_RECYCLE


@dataclass(slots=True, frozen=True)
class Shared:
    """What every helper thread gets from the worker: where to tell the main thread
    (events), what it may read of it (held), when to stop, and Redis with the worker's
    outage log and backoff (one line per outage, one pace of retries for every thread)."""

    worker_id: str
    events: queue.SimpleQueue
    held: HeldView
    stop_event: threading.Event
    manager: RedisManager
    outage: OutageLog
    backoff: Backoff


class HelperThread:
    """One of the worker's helper threads: it owns its loop (run) and its state.

    A helper thread's loop handles Redis errors itself: anything else that escapes it is
    a bug, and the worker must not go on without the thread (no waker: it would never
    claim again; no lease keeper: its running tasks would be handed to others). It says
    so, and the worker drains and exits as a crash: the supervisor replaces it."""

    name = "helper"

    def __init__(self, shared: Shared) -> None:
        self.worker_id = shared.worker_id
        self.events = shared.events
        self.held = shared.held
        self.stop_event = shared.stop_event
        self.manager = shared.manager
        self.outage = shared.outage
        self.backoff = shared.backoff

    def start(self) -> None:
        threading.Thread(target=self._guarded, name=self.name, daemon=True).start()

    def run(self) -> None:
        raise NotImplementedError

    def _guarded(self) -> None:
        try:
            self.run()
        except BaseException:
            log.exception(
                "worker %s: the %s thread failed; replacing this worker", self.worker_id, self.name
            )
            self.events.put(Recycle(exits.EXIT_CRASH, f"the {self.name} thread failed"))


def claimed_but_not_taken(
    events: queue.SimpleQueue, hold: Callable[[list[Task], list[Failure]], None]
) -> tuple[list[Task], Recycle | None]:
    """At a worker's shutdown: the tasks the waker claimed that the main loop never took
    (to give back), and a Recycle asked for as the loop ended. Those the waker had
    started already are held now (hold), like any other (unfinished: given back too)."""
    tasks: list[Task] = []
    recycle = None
    try:
        while True:
            event = events.get_nowait()
            if isinstance(event, Claimed) and event.started:
                hold(event.tasks, list(event.refused))
            elif isinstance(event, Claimed):
                tasks.extend(event.tasks)
            elif isinstance(event, Recycle):
                recycle = event
    except queue.Empty:
        return tasks, recycle
