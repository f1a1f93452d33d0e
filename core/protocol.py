"""The queue protocol: the path a task takes through Redis.

Runs in: producers (enqueue), workers (claim, ack, nack, extend, release), the
supervisor (reap), and admin commands. Every state change is one Lua script over one
agent type's keys; a batch is one script call, and calls for several agent types go in
one pipeline. Nothing here is per-task chatty: one round trip per batch.
"""

from __future__ import annotations

import logging
import os
import random
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.exceptions as rex

from config import Settings
from core import scripts
from core.errors import InvalidPayload
from core.keys import Keys
from core.manager import RedisManager
from core.task import Task, agent_of, score_for

log = logging.getLogger(__name__)

ENQUEUE_CHUNK = 1000  # tasks per script call: bounds how long one call holds the server
BOUND_PER_CALL = 200  # delayed promotions / lease reaps per claim or reap call
RETRY_MAX_DELAY_S = 300.0


@dataclass(frozen=True)
class ClaimRequest:
    agent: str
    n: int
    lease_ms: int
    global_limit: int = 0
    claim_id: str = ""


@dataclass(frozen=True)
class Completion:
    """A finished task for ack(): its result (already JSON) and how many children it made."""

    task: Task
    result_json: bytes = b"null"
    handoffs: int = 0


@dataclass(frozen=True)
class Failure:
    """A failed task for nack(): why, and whether it must be dead-lettered at once."""

    task: Task
    error: str
    trace: str = ""
    dead_now: bool = False
    retry_delay_s: float = 1.0


def retry_delay_ms(base_s: float, attempt: int) -> int:
    """Exponential backoff with full jitter in [base/2, base) * 2**(attempt-1), capped."""
    ceiling = min(RETRY_MAX_DELAY_S, base_s * (2 ** max(0, attempt - 1)))
    return max(1, int(1000 * ceiling * (0.5 + random.random() / 2)))


def short_traceback(limit_chars: int = 2000) -> str:
    text = traceback.format_exc()
    return text[-limit_chars:]


def new_claim_id() -> str:
    return os.urandom(8).hex()


class TaskQueue:
    """The protocol over one RedisManager and one key prefix."""

    def __init__(self, manager: RedisManager, settings: Settings) -> None:
        self.manager = manager
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self._registered_agents: set[str] = set()
        self._max_bytes = str(settings.max_payload_bytes)
        self.last_now_ms = 0  # server time of the last claim
        self.next_due_ms = -1  # earliest delayed task seen by the last claim (-1: none)

    # -- script calls ----------------------------------------------------------------------

    def run_scripts(self, calls: Sequence[tuple[str, list[str], list[Any]]], extra=()) -> list:
        """Run script calls (plus extra pipeline operations) in one round trip.

        A NOSCRIPT reply loads the scripts and repeats the whole batch: every operation
        is idempotent (see core/scripts.py), so the repeat cannot double anything.
        """
        operations = [
            (lambda p, n=name, k=keys, a=args: p.evalsha(scripts.sha(n), len(k), *k, *a))
            for name, keys, args in calls
        ]
        operations.extend(extra)

        def attempt(client) -> list:
            if len(operations) == 1 and not extra:
                name, keys, args = calls[0]
                return [client.evalsha(scripts.sha(name), len(keys), *keys, *args)]
            pipe = client.pipeline(transaction=False)
            for operation in operations:
                operation(pipe)
            return pipe.execute()

        def run(client) -> list:
            try:
                return attempt(client)
            except rex.NoScriptError:
                scripts.load_all(client)
                return attempt(client)

        if len(operations) == 1:
            return self.manager.execute(run)
        return self.manager.execute_pipelined(run, len(operations))

    def _fixed(self, agent: str) -> list[str]:
        return self.keys.agent(agent).all()

    # -- enqueue ---------------------------------------------------------------------------

    def enqueue(self, tasks: Sequence[Task], *, delay_ms: int = 0) -> list[bool]:
        """Store tasks (any agents) in one round trip; True = added, False = duplicate.

        Every task is serialised and size-checked before anything is sent, so a bad one
        fails the batch with nothing written. The enqueue script checks the size again.
        """
        calls, order = [], []
        by_agent: dict[str, list[Task]] = {}
        for task in tasks:
            by_agent.setdefault(task.agent, []).append(task)
        limit = self.settings.max_payload_bytes
        for agent, group in by_agent.items():
            agent_keys = self.keys.agent(agent)
            fixed = agent_keys.all()
            for start in range(0, len(group), ENQUEUE_CHUNK):
                chunk = group[start : start + ENQUEUE_CHUNK]
                extra_keys: list[str] = []
                args: list[Any] = [self._max_bytes, "", len(chunk)]
                for task in chunk:
                    blob = task.to_json()
                    if len(blob) > limit:
                        raise InvalidPayload(
                            f"task for agent {agent!r} is {len(blob)} bytes, over the "
                            f"max_payload_bytes limit of {limit}"
                        )
                    result_index = 0
                    if task.key is not None or task.parent_id is not None:
                        extra_keys.append(agent_keys.result(task.id))
                        result_index = len(extra_keys)
                    delay = delay_ms if task.not_before is not None else 0
                    args += [
                        task.id,
                        score_for(task.priority, task.enqueued_at),
                        delay,
                        blob,
                        result_index,
                    ]
                calls.append(("enqueue", fixed + extra_keys, args))
                order.append(chunk)
        new_agents = [a for a in by_agent if a not in self._registered_agents]
        extra = [lambda p, a=new_agents: p.sadd(self.keys.agents, *a)] if new_agents else []
        replies = self.run_scripts(calls, extra)
        self._registered_agents.update(new_agents)
        added: dict[str, bool] = {}
        for chunk, reply in zip(order, replies, strict=False):
            for task, flag in zip(chunk, reply, strict=True):
                added[task.id] = bool(flag)
        return [added[task.id] for task in tasks]

    # -- claim -----------------------------------------------------------------------------

    def claim(self, requests: Sequence[ClaimRequest], *, now_ms: int | None = None) -> dict:
        """Lease up to n tasks per request, one script call each, one round trip in all.

        Returns {agent: [Task, ...]}. A corrupt task JSON is dead-lettered with the reason
        (one more round trip, only when it happens) and never reaches a handler.
        """
        calls = []
        s = self.settings
        for request in requests:
            claim_id = request.claim_id or new_claim_id()
            agent_keys = self.keys.agent(request.agent)
            calls.append(
                (
                    "claim",
                    [*agent_keys.all(), agent_keys.claim(claim_id)],
                    [
                        request.n,
                        request.lease_ms,
                        claim_id,
                        s.max_deliveries,
                        request.global_limit,
                        "" if now_ms is None else now_ms,
                        s.claim_batch_max,
                        BOUND_PER_CALL,
                    ],
                )
            )
        replies = self.run_scripts(calls)
        claimed: dict[str, list[Task]] = {}
        corrupt: list[Failure] = []
        for request, (_, _, args), reply in zip(requests, calls, replies, strict=True):
            token = args[2]
            tasks = claimed.setdefault(request.agent, [])
            self.last_now_ms, self.next_due_ms = int(reply[0]), int(reply[1])
            for i in range(2, len(reply), 4):
                task_id = reply[i].decode()
                try:
                    task = Task.from_json(
                        reply[i + 1], attempt=int(reply[i + 2]), deliveries=int(reply[i + 3]),
                        token=token,
                    )  # fmt: skip
                except (ValueError, TypeError) as e:
                    stub = Task(id=task_id, agent=agent_of(task_id), payload=None, token=token)
                    corrupt.append(Failure(stub, f"corrupt task JSON: {e}", dead_now=True))
                    continue
                tasks.append(task)
        if corrupt:
            log.warning("dead-lettering %d corrupt task(s): %s", len(corrupt), corrupt[0].error)
            self.nack(corrupt, now_ms=now_ms)
        return claimed

    # -- finishing -------------------------------------------------------------------------

    def ack(self, completions: Sequence[Completion], *, now_ms: int | None = None) -> list[str]:
        """Finish tasks (token-checked). Returns the ids whose ack was stale (changed nothing)."""
        ttl_ms = int(self.settings.result_ttl_s * 1000)
        calls = []
        for agent, group in _group(completions, lambda c: c.task.agent).items():
            agent_keys = self.keys.agent(agent)
            extra_keys: list[str] = []
            args: list[Any] = ["" if now_ms is None else now_ms, ttl_ms, len(group)]
            for done in group:
                extra_keys.append(agent_keys.result(done.task.id))
                args += [
                    done.task.id,
                    done.task.token,
                    done.result_json,
                    len(extra_keys),
                    done.handoffs,
                ]
            calls.append(("ack", agent_keys.all() + extra_keys, args))
        if not calls:
            return []
        return [i.decode() for reply in self.run_scripts(calls) for i in reply]

    def nack(self, failures: Sequence[Failure], *, now_ms: int | None = None) -> list[str]:
        """Record failures: retry later with backoff, or dead-letter. Returns stale ids."""
        calls = []
        for agent, group in _group(failures, lambda f: f.task.agent).items():
            args: list[Any] = ["" if now_ms is None else now_ms, len(group)]
            for failure in group:
                task = failure.task
                max_attempts = task.max_attempts or 3
                delay = -1 if failure.dead_now else retry_delay_ms(
                    failure.retry_delay_s, task.attempt
                )  # fmt: skip
                reason = orjson.dumps(
                    {
                        "reason": failure.error[:1000],
                        "traceback": failure.trace,
                        "attempt": task.attempt,
                    }
                )
                args += [task.id, task.token, max_attempts, delay, reason]
            calls.append(("nack", self._fixed(agent), args))
        stale: list[str] = []
        for reply in self.run_scripts(calls) if calls else []:
            for item in reply:
                if item == b"|":
                    break
                stale.append(item.decode())
        return stale

    def release(self, tasks: Sequence[Task]) -> int:
        """Give unstarted leased tasks back to their queue (graceful shutdown)."""
        calls = []
        for agent, group in _group(tasks, lambda t: t.agent).items():
            args: list[Any] = [len(group)]
            for task in group:
                args += [task.id, task.token]
            calls.append(("release", self._fixed(agent), args))
        return sum(int(r) for r in self.run_scripts(calls)) if calls else 0

    def extend(
        self, tasks: Sequence[Task], lease_ms: int, *, now_ms: int | None = None
    ) -> list[str]:
        """Renew leases; returns the ids whose lease was lost (abandon those tasks)."""
        calls = []
        for agent, group in _group(tasks, lambda t: t.agent).items():
            args: list[Any] = ["" if now_ms is None else now_ms, lease_ms, len(group)]
            for task in group:
                args += [task.id, task.token]
            calls.append(("extend", self._fixed(agent), args))
        if not calls:
            return []
        return [i.decode() for reply in self.run_scripts(calls) for i in reply]

    def reap(
        self, agents: Iterable[str], *, limit: int = 1000, now_ms: int | None = None
    ) -> dict[str, tuple[int, int]]:
        """Move expired leases back to their queues; {agent: (reaped, promoted)}."""
        agents = list(agents)
        calls = [
            ("reap", self._fixed(a), ["" if now_ms is None else now_ms, limit]) for a in agents
        ]
        if not calls:
            return {}
        return {
            a: (int(r[0]), int(r[1])) for a, r in zip(agents, self.run_scripts(calls), strict=True)
        }

    # -- registry --------------------------------------------------------------------------

    def known_agents(self) -> list[str]:
        members = self.manager.execute(lambda c: c.smembers(self.keys.agents))
        return sorted(m.decode() for m in members)

    def check_server(self) -> None:
        """Warn loudly when eviction could silently delete tasks."""
        try:
            policy = self.manager.execute(lambda c: c.config_get("maxmemory-policy"))
        except rex.ResponseError:  # CONFIG may be forbidden (ACL, managed services)
            log.info("could not read maxmemory-policy (CONFIG not allowed); make sure it "
                     "is noeviction")  # fmt: skip
            return
        value = policy.get(b"maxmemory-policy") or policy.get("maxmemory-policy")
        if isinstance(value, bytes):
            value = value.decode()
        if value and value != "noeviction":
            log.warning(
                "DANGER: server maxmemory-policy is %r, not 'noeviction': under memory "
                "pressure the server will silently delete tasks", value
            )  # fmt: skip


def _group(items, key) -> dict[str, list]:
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups
