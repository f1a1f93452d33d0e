"""The queue protocol's facade: the path a task takes through Redis.

Runs in: producers (enqueue), workers (claim, ack, nack, extend, release), the
supervisor (reap), and admin commands. Every state change is one Lua script over one
agent type's keys; a batch is one script call, and calls for several agent types go in
one pipeline. Nothing here is per-task chatty: one round trip per batch.

One module per operation does the work; the methods here only delegate:
  enqueue.py (its routes)   claim.py   finish.py (ack, nack, release, extend)
  deliver.py (run notices)  reap.py    dead_letters.py
records.py holds the records they take and return; execution.py performs the requests
blocking (AsyncTaskQueue in async_queue.py awaits them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from handoff.config import Settings
from handoff.connection.manager import RedisManager
from handoff.protocol import claim as claiming
from handoff.protocol import dead_letters, deliver, finish, reap
from handoff.protocol import enqueue as enqueuing
from handoff.protocol.claim import BOUND_PER_CALL  # noqa: F401  (re-exported)
from handoff.protocol.deliver import (  # noqa: F401  (re-exported)
    MAX_DELIVERED_KEPT,
    MAX_DELIVERY_ROUNDS,
    outboxed_in,
)
from handoff.protocol.enqueue import ENQUEUE_CHUNK  # noqa: F401  (re-exported)
from handoff.protocol.execution import BlockingExecution
from handoff.protocol.keys import Keys
from handoff.protocol.plan import Call, Plan
from handoff.protocol.reap import OUTBOX_GRACE_MS  # noqa: F401  (re-exported)
from handoff.protocol.records import (  # noqa: F401  (re-exported: the queue's names)
    RETRY_MAX_DELAY_S,
    ClaimRequest,
    ClaimResult,
    Completion,
    Failure,
    LostLeases,
    Outgoing,
    new_claim_id,
    retry_delay_ms,
)
from handoff.protocol.task import Task


class QueueBase:
    """What both drivers share: the key prefix, settings, what this process registered,
    and the plans (plan.py) of a producer's operations. TaskQueue performs them blocking,
    AsyncTaskQueue (async_queue.py) awaiting them."""

    def __init__(self, manager: Any, settings: Settings) -> None:
        self.manager = manager
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self._registered_agents: set[str] = set()
        self._ready_keys: dict[str, list[str]] = {}  # per agent: enqueue_ready's KEYS
        self._max_bytes = str(settings.max_payload_bytes)
        # Outbox fields (per agent) whose notices were delivered: the agent's next ack
        # forgets them (the reaper forgets what no ack came for).
        self._delivered: dict[str, list[str]] = {}
        ttl_s = settings.result_ttl_s
        if settings.run_ttl_s > 0:
            ttl_s = max(ttl_s, settings.run_ttl_s)
        self._record_ttl_ms = int(ttl_s * 1000)

    def enqueue_plan(self, tasks: Sequence[Task], *, now_ms: int | None = None) -> Plan[list[bool]]:
        """Store tasks (any agents) in one round trip; True = added, False = duplicate.
        The route each case takes: enqueue.py. now_ms overrides the server clock (tests)."""
        return enqueuing.enqueue_plan(self, tasks, now_ms)

    def deliver_plan(
        self, outgoing: Sequence[Outgoing], *, now_ms: int | None = None
    ) -> Plan[bool]:
        """Apply notices kept in outboxes to their scopes (deliver.py); whether applied."""
        return deliver.deliver_plan(self, outgoing, now_ms)

    def known_agents_plan(self) -> Plan[list[str]]:
        members = yield Call(lambda c: c.smembers(self.keys.agents))
        return sorted(m.decode() for m in members)

    def _fixed(self, agent: str) -> list[str]:
        """The agent's fixed KEYS, as every script takes them first."""
        return self.keys.agent(agent).all()


class TaskQueue(BlockingExecution, QueueBase):
    """The protocol over one RedisManager and one key prefix, blocking: the plans, and
    everything workers do (claim, ack, nack, extend, release, reap)."""

    def __init__(
        self,
        manager: RedisManager,
        settings: Settings,
        waiting: Callable[[], RedisManager] | None = None,
    ) -> None:
        super().__init__(manager, settings)
        self._waiting = waiting  # the manager for blocking waits, when not this one

    def enqueue(self, tasks: Sequence[Task], *, now_ms: int | None = None) -> list[bool]:
        """enqueue_plan, blocking: True = added, False = duplicate, per task. One ready
        task whose agent is known here goes the direct route (enqueue.py)."""
        if len(tasks) == 1 and now_ms is None and enqueuing.is_direct(self, tasks[0]):
            return [enqueuing.direct_one_ready(self, tasks[0])]
        return self.run(enqueuing.enqueue_plan(self, tasks, now_ms))

    def claim(
        self,
        requests: Sequence[ClaimRequest],
        *,
        now_ms: int | None = None,
        after_pop: tuple[Sequence[str], float] | None = None,
    ) -> ClaimResult:
        """Lease up to n tasks per request, one script call each, one round trip in all.

        after_pop=(list keys, timeout_s): the claim waits on the same connection behind a
        BLPOP of those lists (an idle worker's wake list), so the server leases the tasks
        the moment a wake-up arrives, or the timeout passes: one round trip from wake-up
        to tasks. The lists must share the first request's slot.

        Returns the tasks per agent (result[agent]) and what the server said. A corrupt
        task JSON is dead-lettered with the reason and never reaches a handler. A request
        with an explicit claim_id is a retry of that claim: it gets the same batch back.
        """
        return claiming.claim(self, requests, now_ms, after_pop)

    def ack(self, completions: Sequence[Completion], *, now_ms: int | None = None) -> list[str]:
        """Finish tasks (token-checked). Returns the ids whose ack was stale (changed nothing).

        Their notices go with the ack (applied in the script, or kept in the outbox); those
        kept are delivered in the same round trip on one server, in one more on a cluster
        (only when there are any)."""
        return finish.ack(self, completions, now_ms)

    def _checked_deliveries(
        self, outgoing: list[Outgoing], now_ms: int | None
    ) -> tuple[list[tuple[str, list[str], list[Any]]], list[str]]:
        """The scope calls that ride behind an ack on one server (deliver.py)."""
        return deliver.checked_deliveries(self, outgoing, now_ms)

    def deliver(self, outgoing: Sequence[Outgoing], *, now_ms: int | None = None) -> bool:
        """deliver_plan, blocking."""
        return self.run(deliver.deliver_plan(self, outgoing, now_ms))

    def nack(self, failures: Sequence[Failure], *, now_ms: int | None = None) -> list[str]:
        """Record failures: retry later with backoff, or dead-letter. Returns stale ids."""
        return finish.nack(self, failures, now_ms)

    def release(self, tasks: Sequence[Task], *, pause_s: float = 0.0) -> int:
        """Give unstarted leased tasks back to their place (graceful shutdown), uncounted;
        pause_s > 0 (a handler's RateLimited): their agent types start nothing anywhere
        for that long."""
        return finish.release(self, tasks, pause_s)

    def extend(
        self, tasks: Sequence[Task], lease_ms: int, *, now_ms: int | None = None
    ) -> LostLeases:
        """Renew leases; returns the ids whose lease was lost (abandon those tasks), and
        in .cancelled those of them that were cancelled (stop their handlers)."""
        return finish.extend(self, tasks, lease_ms, now_ms)

    def reap(
        self, agents: Iterable[str], *, limit: int = 1000, now_ms: int | None = None
    ) -> dict[str, tuple[int, int]]:
        """Move expired leases back to their queues; {agent: (reaped, promoted)}."""
        return reap.reap(self, agents, limit, now_ms)

    def dead_requeue(self, agent: str, ids: Sequence[str], limit: int) -> list[str]:
        """Put dead tasks (ids, or the oldest limit) back in the queue with fresh counts."""
        return dead_letters.dead_requeue(self, agent, ids, limit)

    def dead_purge(self, agent: str, ids: Sequence[str], limit: int) -> int:
        """Delete dead tasks (ids, or the oldest limit) and their payloads for good."""
        return dead_letters.dead_purge(self, agent, ids, limit)

    def known_agents(self) -> list[str]:
        return self.run(self.known_agents_plan())
