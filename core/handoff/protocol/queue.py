"""The queue protocol: the path a task takes through Redis.

Runs in: producers (enqueue), workers (claim, ack, nack, extend, release), the
supervisor (reap), and admin commands. Every state change is one Lua script over one
agent type's keys; a batch is one script call, and calls for several agent types go in
one pipeline. Nothing here is per-task chatty: one round trip per batch.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from handoff.backoff import exponential_s
from handoff.config import Settings
from handoff.connection.cluster_calls import check_replicated, run_script_calls
from handoff.connection.manager import RedisManager
from handoff.errors import HandoffError, InvalidPayload, TaskRejected
from handoff.protocol import notices as notice
from handoff.protocol import plan, scripts
from handoff.protocol.keys import TASK_ID, Keys, check_claim_id
from handoff.protocol.limits import GUARD, Rate
from handoff.protocol.plan import Call, Pause, Plan, Scripts
from handoff.protocol.task import Task, score_for

log = logging.getLogger(__name__)

T = TypeVar("T")
ENQUEUE_CHUNK = 250  # tasks per script call: bounds how long one call holds the server (~1 ms)
BOUND_PER_CALL = 200  # delayed promotions / lease reaps per claim or reap call
RETRY_MAX_DELAY_S = 300.0
OUTBOX_GRACE_MS = 5000  # a notice still in an outbox this long is the reaper's to deliver
MAX_DELIVERED_KEPT = 10_000  # delivered outbox fields remembered for the next ack to forget
MAX_DELIVERY_ROUNDS = 16  # notices whose delivery ends more, followed at once this deep


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


def _foreign_id(task_id: str, agent: str) -> str:
    return f"task id {task_id[:80]!r} does not belong to agent {agent!r} (expected '{agent}.<id>')"


def retry_delay_ms(base_s: float, attempt: int) -> int:
    """Exponential backoff with jitter in [base/2, base) * 2**(attempt-1), capped."""
    return max(1, int(1000 * exponential_s(attempt, base_s, RETRY_MAX_DELAY_S, jitter="half")))


def new_claim_id(tag: str = "") -> str:
    """A fresh lease token; '<tag>-...' names the worker inbox a cancel is pushed to."""
    return f"{tag}-{os.urandom(6).hex()}" if tag else os.urandom(8).hex()


class LostLeases(list):
    """Ids whose lease was lost; .cancelled: those of them that were cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled: list[str] = []


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

    # -- plans (plan.py) -------------------------------------------------------------------

    def enqueue_plan(self, tasks: Sequence[Task], *, now_ms: int | None = None) -> Plan[list[bool]]:
        """Store tasks (any agents) in one round trip; True = added, False = duplicate.

        Every task is checked (id of its agent, JSON, size) and serialised before anything
        is sent, so a bad one fails the batch with nothing written (TaskRejected names its
        position). The enqueue script checks the size again. A task with not_before waits
        in the delayed set for (not_before - enqueued_at) ms of server time, and takes its
        FIFO place at its due time. now_ms overrides the server clock (tests).
        """
        if len(tasks) == 1 and _ready_now(tasks[0]):
            return [(yield from self._enqueue_ready(tasks[0]))]
        calls, order, new_agents = self._enqueue_calls(tasks, now_ms)
        if not calls:
            return []
        extra = [lambda p, a=new_agents: p.sadd(self.keys.agents, *a)] if new_agents else []
        replies = yield Scripts(calls, extra, self.settings.enqueue_wait_replicas)
        self._registered_agents.update(new_agents)
        added = [False] * len(tasks)
        outgoing: list[tuple[str, str, bytes]] = []
        for chunk, reply in zip(order, replies, strict=False):
            if len(reply) > len(chunk):  # ends of cancelled tasks for other slots' scopes
                kept = reply[len(chunk) + 1 :]
                agent = tasks[chunk[0]].agent
                outgoing += [(agent, kept[k].decode(), kept[k + 1]) for k in range(0, len(kept), 2)]
                reply = reply[: len(chunk)]
            for index, flag in zip(chunk, reply, strict=True):
                added[index] = flag == 1
        if outgoing:
            yield from self.deliver_plan(outgoing, now_ms=now_ms)
        return added

    def deliver_plan(
        self, outgoing: Sequence[tuple[str, str, bytes]], *, now_ms: int | None = None
    ) -> Plan[bool]:
        """Apply notices kept in outboxes ((source agent, outbox field, notice)) to their
        scopes: one script call per target agent, one round trip. On success the fields
        are remembered for the source agent's next ack to forget; on failure they stay
        for the reaper (idempotent either way). Returns whether they were applied."""
        for _ in range(MAX_DELIVERY_ROUNDS):
            by_target: dict[str, list[bytes]] = {}
            for _, _, item in outgoing:
                by_target.setdefault(notice.target_agent(item), []).append(item)
            now_arg = "" if now_ms is None else now_ms
            targets = list(by_target)
            calls = [("scope", self._fixed(t), [now_arg, *by_target[t]]) for t in targets]
            try:
                # Replicated before the outbox may forget them (enqueue_wait_replicas): a
                # failover must not lose a notice whose copy in the outbox is gone.
                replies = yield Scripts(calls, wait_replicas=self.settings.enqueue_wait_replicas)
            except HandoffError as e:
                log.warning("%d run notice(s) left for the reaper to deliver: %s", len(outgoing), e)
                return False
            for source, field_name, _ in outgoing:
                kept = self._delivered.setdefault(source, [])
                if len(kept) < MAX_DELIVERED_KEPT:
                    kept.append(field_name)
            # What applying them ended in turn (a then-task of a cancelled run): at once too.
            outgoing = outboxed_in(targets, replies)
            if not outgoing:
                return True
        return True  # deeper than that: the reaper delivers the rest

    def _enqueue_calls(self, tasks: Sequence[Task], now_ms: int | None) -> tuple[list, list, list]:
        """(script calls, the task indexes of each, agents not registered yet): every task
        checked and serialised, nothing sent."""
        positions: dict[str, list[int]] = {}
        for index, task in enumerate(tasks):
            group = positions.get(task.agent)
            if group is None:
                positions[task.agent] = group = []
            group.append(index)
        limit = self.settings.max_payload_bytes
        now_arg = "" if now_ms is None else now_ms
        calls, order = [], []
        for agent, group in positions.items():
            agent_keys = self.keys.agent(agent)
            fixed = agent_keys.all()
            id_prefix = agent + "."
            for start in range(0, len(group), ENQUEUE_CHUNK):
                chunk = group[start : start + ENQUEUE_CHUNK]
                special: list[Any] = []  # position, delay, deterministic, expires_at, parent, group
                args: list[Any] = [self._max_bytes, now_arg, len(chunk), 0]
                for position, index in enumerate(chunk, 1):
                    task = tasks[index]
                    task_id = task.id
                    blob = self._checked_json(index, task, id_prefix, limit)
                    not_before = task.not_before
                    if not_before is None:
                        args += (task_id, score_for(task.priority, task.enqueued_at), blob)
                        if _ready_now(task):
                            continue  # nothing special to say about it
                        delay = 0
                    else:
                        delay = max(0, not_before - task.enqueued_at)
                        args += (task_id, score_for(task.priority, not_before), blob)
                    deterministic = task.key is not None or task.parent_id is not None
                    special += (
                        position, delay, 1 if deterministic else 0, task.expires_at or 0,
                        task.parent_id or "", task.group or "",
                    )  # fmt: skip
                args[3] = len(special) // 6
                args += special
                calls.append(("enqueue", fixed, args))
                order.append(chunk)
        new_agents = [a for a in positions if a not in self._registered_agents]
        return calls, order, new_agents

    def _enqueue_ready(self, task: Task) -> Plan[bool]:
        """One plain task (ready now, no key, parent, deadline or group): the lean script."""
        agent = task.agent
        keys, args = self._ready_call(task)
        new = agent not in self._registered_agents
        extra = [lambda p: p.sadd(self.keys.agents, agent)] if new else []
        calls = [("enqueue_ready", keys, args)]
        reply = yield Scripts(calls, extra, self.settings.enqueue_wait_replicas)
        self._registered_agents.add(agent)
        return reply[0][0] == 1

    def _ready_call(self, task: Task) -> tuple[list[str], list[Any]]:
        """enqueue_ready's KEYS and ARGV for a plain task (checked and serialised)."""
        agent = task.agent
        blob = self._checked_json(0, task, agent + ".", self.settings.max_payload_bytes)
        keys = self._ready_keys.get(agent)
        if keys is None:
            k = self.keys.agent(agent)
            keys = self._ready_keys[agent] = [k.tasks, k.scores, k.queue, k.stats, k.wake]
        return keys, [self._max_bytes, task.id, score_for(task.priority, task.enqueued_at), blob]

    @staticmethod
    def _checked_json(index: int, task: Task, id_prefix: str, limit: int) -> bytes:
        """The task's JSON, once its id is its agent's and it fits max_payload_bytes."""
        task_id = task.id
        if not task_id.startswith(id_prefix) or TASK_ID.fullmatch(task_id) is None:
            raise TaskRejected(index, _foreign_id(task_id, task.agent))
        try:
            blob = task.to_json()
        except InvalidPayload as e:
            raise TaskRejected(index, str(e)) from None
        if len(blob) > limit:
            raise TaskRejected(
                index,
                f"task for agent {task.agent!r} is {len(blob)} bytes, over the "
                f"max_payload_bytes limit of {limit}",
            )
        return blob

    def known_agents_plan(self) -> Plan[list[str]]:
        members = yield Call(lambda c: c.smembers(self.keys.agents))
        return sorted(m.decode() for m in members)

    def _fixed(self, agent: str) -> list[str]:
        return self.keys.agent(agent).all()


class TaskQueue(QueueBase):
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

    def run(self, operation: Plan[T]) -> T:
        """Perform a plan's requests one by one, blocking; its return value."""
        return plan.run(self.perform, operation)

    def iterate(self, operation: Plan[None]) -> Iterator[Any]:
        return plan.iterate(self.perform, operation)

    def perform(self, request: Any) -> Any:
        kind = type(request)
        if kind is Scripts:
            return self.run_scripts(
                request.calls, request.extra, wait_replicas=request.wait_replicas
            )
        if kind is Call:
            if request.blocking:
                manager = self._waiting() if self._waiting is not None else self.manager
                return manager.execute(request.fn, retry=False)
            if request.n_operations:
                return self.manager.execute_pipelined(request.fn, request.n_operations)
            return self.manager.execute(request.fn)
        if kind is Pause:
            time.sleep(request.seconds)
            return None
        raise TypeError(f"not a protocol request: {request!r}")

    # -- script calls ----------------------------------------------------------------------

    def run_scripts(
        self,
        calls: Sequence[tuple[str, list[str], list[Any]]],
        extra=(),
        *,
        wait_replicas: int = 0,
        before: tuple | None = None,
    ) -> list:
        """Run script calls (plus extra pipeline operations) in one round trip per node.

        A NOSCRIPT reply loads the scripts and repeats the whole batch: every operation
        is idempotent (see scripts.py), so the repeat cannot double anything. With
        wait_replicas, WAIT follows on the same connection (NotReplicated if short).
        before: one command sent ahead of the calls on the same connection, its reply
        dropped (a blocking pop: the server runs the calls the moment it returns); it is
        sent once, a repeat sends the calls alone. On a cluster,
        handoff/connection/cluster_calls.py groups the calls per node instead.
        """
        timeout_ms = self.settings.enqueue_wait_timeout_ms
        if self.manager.is_cluster:
            return self._run_on_cluster(calls, extra, wait_replicas, timeout_ms, before)
        operations = [
            (lambda p, n=name, k=keys, a=args: p.evalsha(scripts.sha(n), len(k), *k, *a))
            for name, keys, args in calls
        ]
        operations.extend(extra)
        if wait_replicas:
            operations.append(lambda p: p.execute_command("WAIT", wait_replicas, timeout_ms))

        ahead = [before]  # sent with the first attempt only

        def attempt(client) -> list:
            first, ahead[0] = ahead[0], None
            if len(operations) == 1 and calls and first is None:
                name, keys, args = calls[0]
                sha = scripts.sha(name)
                return [self.manager.send(client, "EVALSHA", sha, len(keys), *keys, *args)]
            if first is not None and len(operations) == len(calls):  # a pop, then scripts
                commands = [("EVALSHA", scripts.sha(n), len(k), *k, *a) for n, k, a in calls]
                return self.manager.send_all(client, [first, *commands])[1:]
            pipe = client.pipeline(transaction=False)
            if first is not None:
                pipe.execute_command(*first)
            for operation in operations:
                operation(pipe)
            replies = pipe.execute()
            return replies[1:] if first is not None else replies

        def run(client) -> list:
            replies = scripts.with_scripts(client, attempt)
            if wait_replicas:
                check_replicated(replies.pop(), wait_replicas, timeout_ms, "the primary")
            return replies

        if len(operations) == 1:
            return self.manager.execute(run)
        return self.manager.execute_pipelined(run, len(operations))

    def _run_on_cluster(
        self, calls, extra, wait_replicas: int, timeout_ms: int, before: tuple | None
    ) -> list:
        ahead = [before]  # sent with the first attempt only

        def run(cluster) -> list:
            first, ahead[0] = ahead[0], None
            replies = run_script_calls(
                cluster,
                [(scripts.sha(name), keys, args) for name, keys, args in calls],
                load_scripts=scripts.load_all,
                wait_replicas=wait_replicas,
                wait_timeout_ms=timeout_ms,
                before=first,
            )
            if extra:  # plain commands: the cluster pipeline routes them per slot
                pipe = cluster.pipeline()
                for operation in extra:
                    operation(pipe)
                replies += pipe.execute()
            return replies

        return self.manager.execute_pipelined(run, len(calls) + len(extra))

    # -- enqueue ---------------------------------------------------------------------------

    def enqueue(self, tasks: Sequence[Task], *, now_ms: int | None = None) -> list[bool]:
        """enqueue_plan, blocking: True = added, False = duplicate, per task."""
        if len(tasks) == 1 and now_ms is None and self._direct(tasks[0]):
            return [self._enqueue_one_ready(tasks[0])]
        return self.run(self.enqueue_plan(tasks, now_ms=now_ms))

    def _direct(self, task: Task) -> bool:
        """A single enqueue that needs nothing but enqueue_ready's one call: its agent
        known here, no replicas to wait for, one server."""
        return (
            _ready_now(task)
            and task.agent in self._registered_agents
            and not self.settings.enqueue_wait_replicas
            and not self.manager.is_cluster
        )

    def _enqueue_one_ready(self, task: Task) -> bool:
        """_enqueue_ready without the plan's layers (a web request's enqueue: each
        microsecond is a share of the call). The same script, keys and arguments."""
        keys, args = self._ready_call(task)
        command = ("EVALSHA", scripts.sha("enqueue_ready"), len(keys), *keys, *args)
        send = self.manager.send

        def run(client) -> Any:
            return scripts.with_scripts(client, lambda c: send(c, *command))

        return self.manager.execute(run)[0] == 1

    # -- claim -----------------------------------------------------------------------------

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
        task JSON is dead-lettered with the reason (one more round trip, only when it
        happens) and never reaches a handler. A request with an explicit claim_id is a
        retry of that claim: it gets the same batch back.
        """
        calls = []
        s = self.settings
        now_arg = "" if now_ms is None else now_ms
        for request in requests:
            claim_id = (
                check_claim_id(request.claim_id)
                if request.claim_id
                else new_claim_id(request.claim_tag)
            )
            if request.lease_ms < 1 or request.n < 0:
                raise InvalidPayload(
                    f"claim for {request.agent!r}: n = {request.n} must be >= 0 and "
                    f"lease_ms = {request.lease_ms} must be >= 1"
                )
            agent_keys = self.keys.agent(request.agent)
            args = [
                request.n,
                request.lease_ms,
                claim_id,
                s.max_deliveries,
                request.global_limit,
                now_arg,
                s.claim_batch_max,
                BOUND_PER_CALL,
                "1" if request.isolate_suspects else "0",
                "1" if request.solo else "0",
                request.rate.count if request.rate else 0,
                request.rate.window_ms if request.rate else 0,
                request.burst,
                GUARD,
                self._record_ttl_ms,
                request.group_rate.count if request.group_rate else 0,
                request.group_rate.window_ms if request.group_rate else 0,
                request.group_concurrency,
                request.cost_limit.count if request.cost_limit else 0,
                request.cost_limit.window_ms if request.cost_limit else 0,
            ]
            calls.append(("claim", [*agent_keys.all(), agent_keys.claim(claim_id)], args))
        before = None if after_pop is None else ("BLPOP", *after_pop[0], after_pop[1])
        replies = self.run_scripts(calls, before=before)
        result = ClaimResult()
        claimed = result.tasks
        corrupt: list[Failure] = []
        outgoing: list[tuple[str, str, bytes]] = []
        from_json = Task.from_json
        for request, (_, _, args), reply in zip(requests, calls, replies, strict=True):
            token, agent = args[2], request.agent
            tasks = claimed.setdefault(agent, [])
            result.server_ms, result.next_due_ms[agent] = int(reply[0]), int(reply[1])
            result.inbox_seq[agent] = int(reply[2])
            first = 3
            if request.isolate_suspects:
                result.suspects_waiting[agent] = bool(int(reply[3]))
                first = 4
            end = len(reply)
            if b"|" in reply[first:]:  # notices it wrote to the outbox: deliver them now
                end = reply.index(b"|", first)
                kept = reply[end + 1 :]
                outgoing += [(agent, kept[k].decode(), kept[k + 1]) for k in range(0, len(kept), 2)]
            for i in range(first, end, 5):
                task_id = reply[i].decode()
                try:
                    task = from_json(
                        reply[i + 1], attempt=reply[i + 2], deliveries=reply[i + 3], token=token
                    )
                    if task.join is not None:  # a then-task: its join's ends, when asked
                        task.ends_loader = self._ends_loader(task)
                        task.first_dead = orjson.loads(reply[i + 4]) if reply[i + 4] else None
                    if task.id != task_id or task.agent != agent:
                        raise ValueError(
                            f"task JSON says id {task.id[:80]!r} of agent {task.agent[:80]!r}"
                        )
                except (ValueError, TypeError) as e:
                    stub = Task(id=task_id, agent=agent, payload=None, token=token)
                    corrupt.append(Failure(stub, f"corrupt task JSON: {e}", dead_now=True))
                    continue
                tasks.append(task)
        if outgoing:
            self.deliver(outgoing, now_ms=now_ms)
        if corrupt:
            log.warning("dead-lettering %d corrupt task(s): %s", len(corrupt), corrupt[0].error)
            self.nack(corrupt, now_ms=now_ms)
        return result

    def _ends_loader(self, task: Task):
        ends_key = self.keys.agent(task.agent).ends(task.id)
        return lambda: self.manager.execute(lambda c: c.get(ends_key)) or b""

    # -- finishing -------------------------------------------------------------------------

    def ack(self, completions: Sequence[Completion], *, now_ms: int | None = None) -> list[str]:
        """Finish tasks (token-checked). Returns the ids whose ack was stale (changed nothing).

        Their notices go with the ack (applied in the script, or kept in the outbox); those
        kept are delivered in the same round trip on one server, in one more on a cluster
        (only when there are any)."""
        ttl_ms = self._record_ttl_ms
        window_ms = int(self.settings.dedupe_window_s * 1000)
        preview = self.settings.result_ttl_s == 0 and ttl_ms > 0  # only the tree keeps it
        calls, groups = [], []
        new_agents: set[str] = set()  # a join's then agent is enqueued to by a script
        for agent, group in _group(completions, lambda c: c.task.agent).items():
            agent_keys = self.keys.agent(agent)
            result_key = agent_keys.result
            keys = agent_keys.all()
            forget = self._delivered.pop(agent, [])
            args: list[Any] = ["" if now_ms is None else now_ms, ttl_ms, len(group), len(forget)]
            args += forget
            for position, done in enumerate(group, 1):
                task = done.task
                keys.append(result_key(task.id))
                remember = window_ms if task.key is not None or task.parent_id is not None else 0
                result = done.result_json
                if preview:
                    cut = result[: self.settings.tree_result_bytes].decode(errors="ignore")
                    result = orjson.dumps(cut)
                args += (
                    task.id, task.token, result, position, done.handoffs, remember,
                    done.extras, notice.NOTICE_SEP.join(done.notices),
                )  # fmt: skip
                if done.handoffs:
                    for item in done.notices:
                        if item[:1] == b"J":
                            new_agents.add(notice.target_agent(item))
            # what the batch charged (task.charge): the agent's cost limiter settles it
            args.append(repr(float(sum(done.task.charged for done in group))))
            calls.append(("ack", keys, args))
            groups.append((agent, group))
        if not calls:
            return []
        # Notices for scopes in other slots: on one server they ride right behind the
        # acks, in the same round trip (scope.lua checks each against its outbox); on a
        # cluster they are delivered after the acks returned.
        outgoing: list[tuple[str, str, bytes]] = []
        for agent, group in groups:
            for done in group:
                if done.task.run is None and not done.handoffs:
                    continue  # a root that ended: its notice is for its own slot
                for k, item in enumerate(done.notices):
                    if item[:1] not in b"RD" and notice.target_agent(item) != agent:
                        outgoing.append((agent, f"{done.task.id}:{k}", item))
        inline = outgoing and not self.manager.is_cluster
        targets: list[str] = []
        if inline:
            checked, targets = self._checked_deliveries(outgoing, now_ms)
            calls += checked
        joined = sorted(new_agents - self._registered_agents)
        extra = [lambda p: p.sadd(self.keys.agents, *joined)] if joined else []
        replies = self.run_scripts(calls, extra)
        self._registered_agents.update(new_agents)
        stale: list[str] = []
        for reply in replies[: len(groups)]:
            if b"|" not in reply:
                stale.extend(i.decode() for i in reply)
                continue
            cut = reply.index(b"|")
            stale.extend(i.decode() for i in reply[:cut])
            dropped = reply[cut + 1 :]
            log.warning(
                "%d result(s) not stored (the tasks are done all the same): %s: %s",
                len(dropped) // 2, dropped[0].decode(), dropped[1].decode()[:200],
            )  # fmt: skip
        nested = outboxed_in(targets, replies[len(groups) : len(groups) + len(targets)])
        if nested:  # what the inline deliveries ended in turn, in other slots: at once too
            self.deliver(nested, now_ms=now_ms)
        if outgoing and not inline:
            stale_ids = set(stale)
            fresh = [item for item in outgoing if item[1].rpartition(":")[0] not in stale_ids]
            if fresh:
                self.deliver(fresh, now_ms=now_ms)
        return stale

    def _checked_deliveries(
        self, outgoing: list[tuple[str, str, bytes]], now_ms: int | None
    ) -> tuple[list[tuple[str, list[str], list[Any]]], list[str]]:
        """scope calls that apply each notice only if its outbox field exists (one server),
        and the agent each call is for."""
        by_pair: dict[tuple[str, str], list[Any]] = {}
        for source, field_name, item in outgoing:
            by_pair.setdefault((source, notice.target_agent(item)), []).extend((field_name, item))
        now_arg = "" if now_ms is None else now_ms
        calls = [
            ("scope", [*self._fixed(target), self.keys.agent(source).outbox], [now_arg, *pairs])
            for (source, target), pairs in by_pair.items()
        ]
        return calls, [target for _, target in by_pair]

    def deliver(
        self, outgoing: Sequence[tuple[str, str, bytes]], *, now_ms: int | None = None
    ) -> bool:
        """deliver_plan, blocking."""
        return self.run(self.deliver_plan(outgoing, now_ms=now_ms))

    def nack(self, failures: Sequence[Failure], *, now_ms: int | None = None) -> list[str]:
        """Record failures: retry later with backoff, or dead-letter. Returns stale ids."""
        calls, agents = [], []
        for agent, group in _group(failures, lambda f: f.task.agent).items():
            agents.append(agent)
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
                        "traceback": failure.traceback,
                        "attempt": task.attempt,
                    }
                )
                args += [task.id, task.token, max_attempts, delay, reason]
            calls.append(("nack", self._fixed(agent), args))
        stale: list[str] = []
        outgoing: list[tuple[str, str, bytes]] = []
        for source, reply in zip(agents, self.run_scripts(calls) if calls else [], strict=True):
            first = reply.index(b"|")
            stale.extend(item.decode() for item in reply[:first])
            kept = reply[reply.index(b"|", first + 1) + 1 :]
            outgoing += [
                (source, kept[i].decode(), kept[i + 1]) for i in range(0, len(kept), 2)
            ]  # fmt: skip
        if outgoing:
            self.deliver(outgoing, now_ms=now_ms)
        return stale

    def release(self, tasks: Sequence[Task], *, pause_s: float = 0.0) -> int:
        """Give unstarted leased tasks back to their place (graceful shutdown), uncounted;
        pause_s > 0 (a handler's RateLimited): their agent types start nothing anywhere
        for that long."""
        calls = []
        for agent, group in _group(tasks, lambda t: t.agent).items():
            args: list[Any] = [int(pause_s * 1000), len(group)]
            for task in group:
                args += [task.id, task.token]
            calls.append(("release", self._fixed(agent), args))
        return sum(int(r) for r in self.run_scripts(calls)) if calls else 0

    def extend(
        self, tasks: Sequence[Task], lease_ms: int, *, now_ms: int | None = None
    ) -> LostLeases:
        """Renew leases; returns the ids whose lease was lost (abandon those tasks), and
        in .cancelled those of them that were cancelled (stop their handlers)."""
        calls = []
        for agent, group in _group(tasks, lambda t: t.agent).items():
            args: list[Any] = ["" if now_ms is None else now_ms, lease_ms, len(group)]
            for task in group:
                args += [task.id, task.token]
            calls.append(("extend", self._fixed(agent), args))
        lost = LostLeases()
        for reply in self.run_scripts(calls) if calls else []:
            cut = reply.index(b"|")
            lost += [i.decode() for i in reply[:cut]]
            lost.cancelled += [i.decode() for i in reply[cut + 1 :]]
        return lost

    def reap(
        self, agents: Iterable[str], *, limit: int = 1000, now_ms: int | None = None
    ) -> dict[str, tuple[int, int]]:
        """Move expired leases back to their queues; {agent: (reaped, promoted)}."""
        agents = list(agents)
        now_arg = "" if now_ms is None else now_ms
        calls = [("reap", self._fixed(a), [now_arg, limit, OUTBOX_GRACE_MS]) for a in agents]
        if not calls:
            return {}
        counts, left = {}, []
        for agent, reply in zip(agents, self.run_scripts(calls), strict=True):
            counts[agent] = (int(reply[0]), int(reply[1]))
            left += [
                (agent, reply[i].decode(errors="surrogateescape"), reply[i + 1])
                for i in range(2, len(reply), 2)
            ]
        left = self._drop_malformed(left)
        if left:
            self._deliver_left(left, now_ms)
        return counts

    def _drop_malformed(self, left: list[tuple[str, str, bytes]]) -> list:
        """Outbox notices that are not well formed are said once each and deleted: one
        would fail the delivery of every notice sent with it, on every reap."""
        bad: dict[str, list[str]] = {}
        good = []
        for source, field_name, item in left:
            raw_field = field_name.encode(errors="surrogateescape")
            reason = notice.malformed(item) or _not_utf8(raw_field)
            if reason is None:
                good.append((source, field_name, item))
                continue
            log.warning(
                "malformed run notice dropped from %s's outbox (field %.60r): %s",
                source, field_name, reason,
            )  # fmt: skip
            bad.setdefault(source, []).append(raw_field)
        if bad:
            self.manager.execute_pipelined(lambda c: _forget_fields(c, self.keys, bad), len(bad))
        return good

    def _deliver_left(self, left: list[tuple[str, str, bytes]], now_ms: int | None) -> None:
        """Deliver notices their workers did not (they died), then forget them."""
        log.info("delivering %d run notice(s) left in outboxes", len(left))
        if not self.deliver(left, now_ms=now_ms):
            return
        by_source: dict[str, list[str]] = {}
        for source, field_name, _ in left:
            by_source.setdefault(source, []).append(field_name)
        for source in by_source:
            self._delivered.pop(source, None)
        self.manager.execute_pipelined(
            lambda c: _forget_fields(c, self.keys, by_source), len(by_source)
        )

    # -- dead letters ----------------------------------------------------------------------

    def dead_requeue(self, agent: str, ids: Sequence[str], limit: int) -> list[str]:
        """Put dead tasks (ids, or the oldest limit) back in the queue with fresh counts."""
        fixed = self.keys.agent(agent).all()
        reply = self.run_scripts([("dead_requeue", fixed, [limit, *ids])])[0]
        return [i.decode() for i in reply]

    def dead_purge(self, agent: str, ids: Sequence[str], limit: int) -> int:
        """Delete dead tasks (ids, or the oldest limit) and their payloads for good."""
        fixed = self.keys.agent(agent).all()
        return int(self.run_scripts([("dead_purge", fixed, [limit, *ids])])[0])

    # -- registry --------------------------------------------------------------------------

    def known_agents(self) -> list[str]:
        return self.run(self.known_agents_plan())


def _not_utf8(field_name: bytes) -> str | None:
    try:
        field_name.decode()
    except UnicodeDecodeError:
        return "its field name is not UTF-8"
    return None


def _forget_fields(client, keys: Keys, by_source: dict[str, list[Any]]) -> list:
    pipe = client.pipeline(transaction=False)
    for source, fields in by_source.items():
        pipe.hdel(keys.agent(source).outbox, *fields)
    return pipe.execute()


def _ready_now(task: Task) -> bool:
    """A task the lean enqueue_ready script stores exactly as enqueue.lua would."""
    return (
        task.not_before is None
        and task.key is None
        and task.parent_id is None
        and not task.expires_at
        and task.group is None
    )


def _group(items, key) -> dict[str, list]:
    groups: dict[str, list] = {}
    for item in items:
        name = key(item)
        group = groups.get(name)
        if group is None:
            groups[name] = group = []
        group.append(item)
    return groups


def outboxed_in(agents: Sequence[str], replies: Sequence[Any]) -> list[tuple[str, str, bytes]]:
    """The (agent, outbox field, notice) triples scope.lua replies name after '|'."""
    out: list[tuple[str, str, bytes]] = []
    for agent, reply in zip(agents, replies, strict=True):
        if isinstance(reply, list) and b"|" in reply:
            kept = reply[reply.index(b"|") + 1 :]
            out += [(agent, kept[k].decode(), kept[k + 1]) for k in range(0, len(kept), 2)]
    return out
