"""Cancelling a task, or a whole run, wherever its tasks are.

Runs in: producers and operators (client.cancel, `handoff cancel`), as a plan (plan.py).

The picture. A task lives in its agent's slot; a run spreads over many. Cancelling marks
first, then ends: the id (a run's root, or a running task) is marked in every agent's slot
(<base>:cancelled), so whatever of it appears from now on (a child handed off at this
instant, a join's then-task, a retry coming due) ends cancelled instead of starting; then
the cancel script ends the tasks themselves: queued and delayed ones at once, running ones
too (their leases go, and their workers are told through their inboxes, which stop the
handlers). For a run, each cancel reply names the open tasks of the scopes it met (the
run's, a join's), and those are cancelled in turn until none is left.

A leased task may not have started: a worker holds a few prefetched tasks for its next
free slot. Its worker answers whether the handler had started (cancel waits for that up to
ANSWER_WAIT_S), and never starts it afterwards: it hands a held task to a slot only while
it knows, from a reply sent less than START_FRESH_S ago, that it has applied every cancel
pushed to its inbox (runtime/start_gate.py). So when cancel() returns, a task that had not
started never will, and the report says which it was.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from handoff.errors import HandoffError
from handoff.protocol.plan import Call, Plan, Scripts
from handoff.protocol.queue import QueueBase
from handoff.protocol.runs import run_of
from handoff.protocol.task import agent_of

# Records of cancelled tasks, and the marks, live this long at least (ms).
MIN_KEEP_MS = 60_000
# Passes over a run's scopes: each goes one level deeper (joins within joins).
MAX_PASSES = 64
# How long a cancel waits for the workers of leased tasks to say whether they had started;
# a worker starts a held task only on news of its inbox fresher than START_FRESH_S (under
# ANSWER_WAIT_S, with room for the two clocks' rates): past the wait, none starts.
ANSWER_WAIT_S = 0.25
START_FRESH_S = 0.1


# What a cancel ends: queued, delayed, running (its handler had started), leased (held by
# its worker for a free slot: it never starts), claimed (leased; its worker did not answer).
ENDED_BY_CANCEL = ("queued", "delayed", "waiting", "running", "leased", "claimed")


@dataclass
class CancelReport:
    """What a cancel found: how many tasks were in each state (queued, delayed and
    running ones are now cancelled; the others were left as they were)."""

    task_id: str
    run: str | None = None  # the run's root, for a run cancel
    was: Counter = field(default_factory=Counter)

    @property
    def cancelled(self) -> int:
        return sum(self.was[state] for state in ENDED_BY_CANCEL)

    def line(self) -> str:
        """One line for a person: what happened."""
        if self.run is None:
            state = next(iter(self.was), "unknown")
            if state in ("queued", "delayed", "waiting"):
                return f"task {self.task_id} cancelled (it was {state}: it never starts)"
            if state == "running":
                return f"task {self.task_id} cancelled (it was running: its handler is told)"
            if state == "leased":
                return (
                    f"task {self.task_id} cancelled (it was leased by a worker, waiting for "
                    "a free slot: it never starts)"
                )
            if state == "claimed":
                return (
                    f"task {self.task_id} cancelled (it was leased by a worker that did not "
                    f"answer within {ANSWER_WAIT_S:g}s: if it waited for a slot it never "
                    "starts; a handler started, or starting as its claim arrives, is told)"
                )
            if state == "unknown":
                return f"task {self.task_id} is unknown: nothing to cancel"
            return f"task {self.task_id} is already {state}: nothing changed"
        parts = ", ".join(f"{n} {state}" for state, n in sorted(self.was.items()))
        return f"run {self.run}: {self.cancelled} task(s) cancelled ({parts or 'none found'})"


def cancel(queue: QueueBase, task_id: str, *, run: bool, keep_ms: int) -> Plan[CancelReport]:
    """Cancel one task, or (run=True) every task of the run it belongs to."""
    agent_of(task_id)  # a malformed id fails here, before anything is written
    keep_ms = max(MIN_KEEP_MS, keep_ms)
    answers_key = queue.keys.cancel_answers(os.urandom(8).hex())
    leased: list[str] = []  # what the script found leased: started or not, its worker says
    if not run:
        report = CancelReport(task_id)
        if (yield from _live(queue, task_id, run=False)):
            yield from _mark_everywhere(queue, task_id, keep_ms, skip=agent_of(task_id))
        by_agent = {agent_of(task_id): [task_id]}
        was, _ = yield from _cancel_in(queue, by_agent, task_id, keep_ms, answers_key)
        report.was[was[task_id]] += 1
        leased += [task_id] if was[task_id] == "held" else []
        yield from _hear_workers(queue, answers_key, leased, report)
        return report
    root = yield from run_of(queue.keys, task_id)
    report = CancelReport(task_id, run=root)
    if (yield from _live(queue, root, run=True)):
        yield from _mark_everywhere(queue, root, keep_ms, skip="")
    pending, seen = [root], {root}
    for _ in range(MAX_PASSES):
        if not pending:
            break
        by_agent: dict[str, list[str]] = {}
        for tid in pending:
            by_agent.setdefault(agent_of(tid), []).append(tid)
        was, opened = yield from _cancel_in(queue, by_agent, root, keep_ms, answers_key)
        for tid in pending:
            # A join's then-task that was never created is not a task of the run yet.
            if not (was[tid] == "unknown" and tid != root):
                report.was[was[tid]] += 1
            if was[tid] == "held":
                leased.append(tid)
        pending = [tid for tid in opened if tid not in seen]
        seen.update(pending)
    yield from _hear_workers(queue, answers_key, leased, report)
    return report


def _hear_workers(
    queue: QueueBase, answers_key: str, leased: list[str], report: CancelReport
) -> Plan[None]:
    """Wait (up to ANSWER_WAIT_S) for the workers of the leased tasks to say whether each
    had started ('running') or waited for a slot ('leased': it never starts); one that does
    not answer is 'claimed' (it does not start after this either: see the module's notes)."""
    deadline = time.monotonic() + ANSWER_WAIT_S
    heard: dict[str, str] = {}
    while leased and len(heard) < len(leased):
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            break
        try:
            popped = yield Call(lambda c, t=left_s: c.blpop([answers_key], t), blocking=True)
        except HandoffError:
            break  # unreachable now: as if unanswered
        if popped is None:
            break
        tid, _, state = popped[1].decode().partition("|")
        heard[tid] = state
    for tid in leased:
        state = {"started": "running", "waiting": "leased"}.get(heard.get(tid, ""), "claimed")
        report.was["held"] -= 1
        report.was[state] += 1
    report.was += Counter()  # drops the states counted down to 0


def _live(queue: QueueBase, task_id: str, *, run: bool) -> Plan[bool]:
    """Whether anything of the id could still appear (a stored task; for a run, its open
    scope too): only then are marks worth writing into every slot. An unknown or finished
    id writes nothing (a mark lives an hour and takes every claim off its fast path)."""
    agent_keys = queue.keys.agent(agent_of(task_id))

    def read(client) -> Any:
        pipe = client.pipeline(transaction=False)
        pipe.hexists(agent_keys.tasks, task_id)
        if run:
            pipe.exists(agent_keys.scope(task_id))
        return pipe.execute()

    return any((yield Call(read)))


def cancel_keys(queue: QueueBase, agent: str) -> list[str]:
    """cancel.lua's KEYS: the agent's fixed keys, and the two sets a parked wait leaves."""
    agent_keys = queue.keys.agent(agent)
    return [*agent_keys.all(), agent_keys.waiting, agent_keys.waiting_since]


def _mark_everywhere(queue: QueueBase, mark: str, keep_ms: int, *, skip: str) -> Plan[None]:
    """Mark the id in every known agent's slot: one round trip (the agent of a single
    task is marked by its own cancel call, in the same script that ends it)."""
    agents = [a for a in (yield from queue.known_agents_plan()) if a != skip]
    calls = [("cancel", cancel_keys(queue, a), ["", keep_ms, mark, ""]) for a in agents]
    if calls:
        yield Scripts(calls)


def _cancel_in(
    queue: QueueBase, by_agent: dict[str, list[str]], mark: str, keep_ms: int, answers_key: str
) -> Plan[tuple[dict[str, str], list[str]]]:
    """One cancel call per agent, one round trip: what each id was, and the open tasks
    of the scopes met. Ends written to other slots' outboxes are delivered right away."""
    agents = list(by_agent)
    args = ["", keep_ms, mark, answers_key]
    calls = [("cancel", cancel_keys(queue, a), [*args, *by_agent[a]]) for a in agents]
    was: dict[str, str] = {}
    opened: list[str] = []
    outgoing: list[tuple[str, str, bytes]] = []
    for agent, reply in zip(agents, (yield Scripts(calls)), strict=True):
        ids = by_agent[agent]
        for i, tid in enumerate(ids):
            was[tid] = reply[2 * i].decode()
            scope_open = reply[2 * i + 1]
            if scope_open:
                opened += scope_open.decode().split(",")
        kept = reply[2 * len(ids) + 1 :]
        outgoing += [(agent, kept[k].decode(), kept[k + 1]) for k in range(0, len(kept), 2)]
    if outgoing:
        yield from queue.deliver_plan(outgoing)
    return was, opened
