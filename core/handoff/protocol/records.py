"""The records the queue operations take and return, and the small helpers they share.

Runs in: producers, workers, the supervisor. Plain data and pure functions, no Redis: the
operation modules (enqueue.py, claim.py, finish.py, reap.py, ...) and queue.py's facade
all import from here, so none of them imports another's facade (no cycle).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from handoff.backoff import exponential_s
from handoff.protocol.limits import Rate
from handoff.protocol.task import Task

RETRY_MAX_DELAY_S = 300.0


@dataclass(frozen=True)
class ClaimRequest:
    agent: str
    n: int
    lease_ms: int
    global_limit: int = 0
    claim_id: str = ""
    # Workers isolate suspects (tasks whose last worker died): such a task is leased only
    # to a caller holding nothing else (solo), and alone. See claim.lua.
    isolate_suspects: bool = False
    solo: bool = True
    # A worker's inbox tag: its claim ids (lease tokens) start '<tag>-', so a cancel
    # knows where to push the news (see cancel.lua).
    claim_tag: str = ""
    # The agent's declared start-rate limit (a live one in Redis overrides it): starts
    # per window_ms, and a burst. See limits.py.
    rate: Rate | None = None
    burst: int = 0
    # Each group's limits (groups.py): starts per window, running at most (0 = none).
    group_rate: Rate | None = None
    group_concurrency: int = 0
    # Cost units (task.charge) per window (cost_limit="200000/min"); see lib/admission.lua.
    cost_limit: Rate | None = None


@dataclass
class ClaimResult:
    """What one claim() call leased, per agent, and what the server said on the way: its
    clock, the earliest delayed task it saw (so an idle waker sleeps until then), and
    whether a suspect waits for a solo claim. Returned, not kept on the queue, so two
    threads claiming on one TaskQueue never read each other's answer."""

    tasks: dict[str, list[Task]] = field(default_factory=dict)
    server_ms: int = 0
    next_due_ms: dict[str, int] = field(default_factory=dict)  # -1: nothing delayed
    suspects_waiting: dict[str, bool] = field(default_factory=dict)
    # The last cancel pushed to the claiming worker's inbox (cancel.lua): per agent.
    inbox_seq: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, agent: str) -> list[Task]:
        return self.tasks[agent]


@dataclass(slots=True)  # not frozen: made once per task, and frozen init costs 4x
class Completion:
    """A finished task for ack(): its result (already JSON), how many children it made,
    the notices its run or join gets (notices.py) and its record's tree fields."""

    task: Task
    result_json: bytes = b"null"
    handoffs: int = 0
    notices: tuple[bytes, ...] = ()
    extras: bytes = b""  # ',"ran_ms":..' fields for the run tree, or nothing


@dataclass(slots=True)
class Failure:
    """A failed task for nack(): why, and whether it must be dead-lettered at once."""

    task: Task
    error: str
    traceback: str = ""
    dead_now: bool = False
    retry_delay_s: float = 1.0


class LostLeases(list):
    """Ids whose lease was lost; .cancelled: those of them that were cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled: list[str] = []


# An outbox entry on its way: (source agent, outbox field, notice). The source's outbox
# keeps the notice until it is delivered to its target's scope (notices.py).
Outgoing = tuple[str, str, bytes]


def retry_delay_ms(base_s: float, attempt: int) -> int:
    """Exponential backoff with jitter in [base/2, base) * 2**(attempt-1), capped."""
    return max(1, int(1000 * exponential_s(attempt, base_s, RETRY_MAX_DELAY_S, jitter="half")))


def new_claim_id(tag: str = "") -> str:
    """A fresh lease token; '<tag>-...' names the worker inbox a cancel is pushed to."""
    return f"{tag}-{os.urandom(6).hex()}" if tag else os.urandom(8).hex()


def now_arg(now_ms: int | None) -> int | str:
    """The scripts' now ARGV: '' asks the server's clock; a number overrides it (tests)."""
    return "" if now_ms is None else now_ms


def by_agent(items: Iterable[Any], agent_of: Callable[[Any], str]) -> dict[str, list]:
    """Items grouped per agent, in first-seen order: one script call per agent."""
    groups: dict[str, list] = {}
    for item in items:
        name = agent_of(item)
        group = groups.get(name)
        if group is None:
            groups[name] = group = []
        group.append(item)
    return groups


def kept_pairs(agent: str, kept: list) -> list[Outgoing]:
    """A script's trailing (field, notice, ...) reply: what it kept in agent's outbox."""
    return [(agent, kept[k].decode(), kept[k + 1]) for k in range(0, len(kept), 2)]
