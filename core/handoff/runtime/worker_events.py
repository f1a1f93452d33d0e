"""What a worker's helper threads tell its main thread.

Runs in: a worker process. The main thread waits on one SimpleQueue (SimpleQueue.put is
safe inside a signal handler); every helper thread (waker, inbox, lease keeper, heartbeat)
says what it saw there as one of these small types, besides the runner's Outcome and
Finished, and the main loop matches on the type (an unknown one raises).
"""

from __future__ import annotations

from dataclasses import dataclass

from handoff.protocol.queue import Failure
from handoff.protocol.task import Task


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
