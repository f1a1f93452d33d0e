"""Client: the producer's and operator's API (enqueue, status, result, admin).

Runs in: any process. A Client builds its RedisManager lazily and rebuilds it when used
in a new process (after fork), so a Client made before fork is safe in the child.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import orjson

from handoff.config import Settings, load_settings
from handoff.config.checks import check_range
from handoff.connection.manager import RedisManager
from handoff.connection.process import current_pid
from handoff.connection.retry import ExponentialBackoff
from handoff.errors import (
    HandoffError,
    InvalidPayload,
    RedisCommandError,
    RedisUnavailable,
    ResultTimeout,
    TaskCancelled,
    TaskDead,
    TaskExpired,
    TaskRejected,
)
from handoff.protocol import messages, runs, signals, streams, waits
from handoff.protocol.cancel import CancelReport, cancel
from handoff.protocol.groups import check_group
from handoff.protocol.keys import Keys, check_agent
from handoff.protocol.plan import Call, Pause, Plan
from handoff.protocol.queue import QueueBase, TaskQueue
from handoff.protocol.task import (
    Task,
    agent_of,
    check_priority,
    derived_task_id,
    new_task_id,
    now_ms,
)
from handoff.runtime import tracing
from handoff.runtime.agents import payload_for, registered
from handoff.runtime.payload_types import JSON_TYPES

# The longest single blocking wait for a result (its connection's read timeout is
# longer): a wait of an hour sends a command every WAIT_CHUNK_S.
WAIT_CHUNK_S = 300.0
DEFAULT_BACKOFF = ExponentialBackoff(0.008, 0.512)  # the pool's defaults (MinRetryBackoff...)
STREAM_CHUNK_S = 5.0  # a stream reader's blocking read: the run's end ends it sooner


def build_task(
    agent: str,
    payload: Any,
    *,
    priority: int = 0,
    delay_s: float = 0,
    key: str | None = None,
    max_attempts: int | None = None,
    timeout_s: float | None = None,
    at_ms: int | None = None,
    expires_in_s: float | None = None,
    run_deadline_s: float | None = None,
) -> Task:
    """Validate one task's fields and build it (no Redis)."""
    check_agent(agent)
    check_priority(priority)
    delay_ms = check_delay_ms(delay_s)
    if max_attempts is not None:
        _check_number("max_attempts", max_attempts, 1, 1000, integer=True)
    if timeout_s is not None:
        _check_number("timeout_s", timeout_s, 0.001, 86_400 * 7)
    stamp = now_ms() if at_ms is None else at_ms
    if key is not None:
        if not isinstance(key, str) or not 0 < len(key) <= 256:
            raise InvalidPayload("key: must be a string of 1 to 256 characters")
        task_id = derived_task_id(agent, "key", key)
    else:
        task_id = new_task_id(agent, stamp)
    expires_at, run_deadline_at = deadlines_at(stamp, expires_in_s, run_deadline_s)
    return Task(
        id=task_id,
        agent=agent,
        payload=payload_for(agent, payload),
        priority=priority,
        max_attempts=max_attempts,
        timeout_s=timeout_s,
        created_at=stamp,
        enqueued_at=stamp,
        not_before=stamp + delay_ms if delay_ms > 0 else None,
        key=key,
        expires_at=expires_at,
        run_deadline_at=run_deadline_at,
    )


def deadlines_at(
    stamp: int, expires_in_s: float | None, run_deadline_s: float | None
) -> tuple[int | None, int | None]:
    """(expires_at, run_deadline_at) in ms: a task's own deadline is its run's too, at most."""
    expires_at = run_deadline_at = None
    if expires_in_s is not None:
        _check_number("expires_in_s", expires_in_s, 0.001, MAX_DELAY_S)
        expires_at = stamp + int(expires_in_s * 1000)
    if run_deadline_s is not None:
        _check_number("run_deadline_s", run_deadline_s, 0.001, MAX_DELAY_S)
        run_deadline_at = stamp + int(run_deadline_s * 1000)
        expires_at = run_deadline_at if expires_at is None else min(expires_at, run_deadline_at)
    return expires_at, run_deadline_at


MAX_DELAY_S = 366 * 86_400.0


def _check_number(name: str, value: object, low: float, high: float, integer=False) -> None:
    check_range(name, value, low, high, integer=integer, error=InvalidPayload)


def check_delay_ms(delay_s: object) -> int:
    """delay_s as whole milliseconds; rejects negatives, NaN, infinities and > a year."""
    _check_number("delay_s", delay_s, 0, MAX_DELAY_S)
    return int(delay_s * 1000)  # type: ignore[operator]


def one_task(agent: str, payload: Any, *, group: str | None = None, **options: Any) -> Task:
    """Client.enqueue's task: validated (build_task), in the caller's trace, in its group."""
    task = build_task(agent, payload, **options)
    task.traceparent = tracing.current_traceparent(agent)  # the run's parent span, if any
    if group is not None:
        task.group = check_group(group)
    return task


def many_tasks(
    agent: str,
    payloads: Iterable[Any],
    *,
    priority: int,
    delay_s: float,
    keys: Sequence[str] | None,
    expires_in_s: float | None,
    run_deadline_s: float | None,
    group: str | None,
) -> list[Task]:
    """Client.enqueue_many's tasks, every one validated before any is sent."""
    check_agent(agent)
    check_priority(priority)
    delay_ms = check_delay_ms(delay_s)
    payloads = list(payloads)
    if keys is not None and len(keys) != len(payloads):
        raise InvalidPayload(f"keys: {len(keys)} given for {len(payloads)} payloads")
    stamp = now_ms()
    not_before = stamp + delay_ms if delay_ms > 0 else None
    expires_at, run_deadline_at = deadlines_at(stamp, expires_in_s, run_deadline_s)
    tasks = []
    append = tasks.append
    traceparent = tracing.current_traceparent(agent)  # the runs' parent span, if any
    if group is not None:
        check_group(group)
    spec = registered(agent)
    typed = spec is not None and spec.payload_type is not None
    for index, payload in enumerate(payloads):
        if typed or type(payload) not in JSON_TYPES:  # a model, or a declared type
            try:
                payload = payload_for(agent, payload)
            except InvalidPayload as e:
                raise TaskRejected(index, str(e), f"payloads[{index}]") from None
        key = None if keys is None else keys[index]
        if key is None:
            task_id = new_task_id(agent, stamp)
        elif isinstance(key, str) and 0 < len(key) <= 256:
            task_id = derived_task_id(agent, "key", key)
        else:
            raise TaskRejected(index, "must be a string of 1 to 256 characters", f"keys[{index}]")
        append(
            Task(
                id=task_id,
                agent=agent,
                payload=payload,
                priority=priority,
                created_at=stamp,
                enqueued_at=stamp,
                not_before=not_before,
                key=key,
                expires_at=expires_at,
                run_deadline_at=run_deadline_at,
                traceparent=traceparent,
                group=group,
            )
        )
    return tasks


def enqueue_many_plan(queue: QueueBase, tasks: list[Task]) -> Plan[list[str]]:
    """Store a batch; a rejected task is named by its place among the payloads."""
    if tasks:
        try:
            yield from queue.enqueue_plan(tasks)
        except TaskRejected as e:
            raise TaskRejected(e.index, e.detail, f"payloads[{e.index}]") from None
    return [task.id for task in tasks]


class Client:
    """Enqueue tasks and look at them. `Client()` reads REDIS_URL / HANDOFF_* settings."""

    def __init__(self, url: str | None = None, *, settings: Settings | None = None) -> None:
        if settings is None:
            settings = load_settings(overrides={"redis.url": url} if url else None)
        self.settings = settings
        self._pid = -1
        self._queue: TaskQueue | None = None
        self._waiting: TaskQueue | None = None
        self._waiting_lock = threading.Lock()

    @property
    def queue(self) -> TaskQueue:
        if self._queue is None or self._pid != current_pid():
            # A new process: drop (never close) the parent's sockets and build our own.
            manager = RedisManager(self.settings.redis)
            self._queue = TaskQueue(manager, self.settings, waiting=self._waiting_manager)
            self._waiting = None
            self._pid = current_pid()
        return self._queue

    @property
    def waiting(self) -> TaskQueue:
        """For blocking waits only (result): its own connections, whose read timeout
        outlasts one wait, so an idle waiter sends nothing until the end notice (the
        main pool's read timeout stays short, to notice a dead server soon)."""
        self.queue  # noqa: B018 - checks the process (a Client used after fork)
        with self._waiting_lock:  # threads of one Client (the demo's waiters) share it
            if self._waiting is None:
                config = replace(
                    self.settings.redis, read_timeout_s=WAIT_CHUNK_S + 10, min_idle_conns=0
                )
                manager = RedisManager(config, background=False)
                self._waiting = TaskQueue(manager, self.settings)
            return self._waiting

    def _waiting_manager(self) -> RedisManager:
        return self.waiting.manager

    def close(self) -> None:
        if self._queue is not None and self._pid == current_pid():
            self._queue.manager.close()
            if self._waiting is not None:
                self._waiting.manager.close()
        self._queue = None
        self._waiting = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- enqueue ---------------------------------------------------------------------------

    def enqueue(
        self,
        agent: str,
        payload: Any,
        *,
        priority: int = 0,
        delay_s: float = 0,
        key: str | None = None,
        max_attempts: int | None = None,
        timeout_s: float | None = None,
        expires_in_s: float | None = None,
        run_deadline_s: float | None = None,
        group: str | None = None,
    ) -> str:
        """Add one task; returns its id (the same id again for a repeated key).

        expires_in_s: not started by then, it ends expired and never runs (a running task
        is not interrupted: that is timeout_s). run_deadline_s: the same for every task of
        the run it starts. group: its group takes turns with the others at every claim,
        under the agent's group_rate and group_concurrency; its handoffs inherit it."""
        task = one_task(
            agent,
            payload,
            priority=priority,
            delay_s=delay_s,
            key=key,
            max_attempts=max_attempts,
            timeout_s=timeout_s,
            expires_in_s=expires_in_s,
            run_deadline_s=run_deadline_s,
            group=group,
        )
        self.queue.enqueue([task])
        return task.id

    def enqueue_many(
        self,
        agent: str,
        payloads: Iterable[Any],
        *,
        priority: int = 0,
        delay_s: float = 0,
        keys: Sequence[str] | None = None,
        expires_in_s: float | None = None,
        run_deadline_s: float | None = None,
        group: str | None = None,
    ) -> list[str]:
        """Add many tasks in one round trip; all are validated before any is sent.

        A bad payload raises TaskRejected (an InvalidPayload) naming its index; nothing of
        the batch is written then.
        """
        tasks = many_tasks(
            agent,
            payloads,
            priority=priority,
            delay_s=delay_s,
            keys=keys,
            expires_in_s=expires_in_s,
            run_deadline_s=run_deadline_s,
            group=group,
        )
        return self.queue.run(enqueue_many_plan(self.queue, tasks))

    # -- looking ---------------------------------------------------------------------------

    def status(self, task_id: str) -> str:
        """queued | delayed | waiting | running | done | dead | expired | cancelled |
        unknown (one round trip; two for waiting)."""
        return self.queue.run(status_plan(self.queue.keys, task_id))[0]

    def result(self, task_id: str, wait_s: float = 5.0, *, follow: bool = False) -> Any:
        """The task's result, waiting up to wait_s for it to finish.

        follow=True waits for the whole run the task started (or, for a task inside a
        run, the run it belongs to) and returns its ends: the single end's result when
        there is one, else the list of ends' results in the order they ended.

        Raises TaskDead (with the reason; for a run, naming its first dead end) and
        ResultTimeout when it is not done in time. Either way it blocks in Redis on the
        end notice the ack writes (no polling): one blocking call per WAIT_CHUNK_S.
        """
        backoff = waits_backoff(self.settings)
        plan = result_plan(self.queue.keys, task_id, wait_s, follow=follow, backoff=backoff)
        return self.queue.run(plan)

    def cancel(self, task_id: str, *, run: bool = False) -> CancelReport:
        """Cancel a task, or (run=True) every task of the run it belongs to, on every agent.

        Queued and delayed tasks end cancelled and never start; running ones end cancelled
        and their handlers are told at once (an async one gets CancelledError, a sync one
        sees task.cancelled); whatever they return afterwards, handoffs included, is
        dropped. A task its worker held for a free slot never starts (report.was says
        "leased"; "claimed" when its worker did not answer within 0.25 s). After a run
        cancel no task of the run starts. A finished or unknown task is left as it is and
        nothing is written: the report says so (report.line() is one line for a person)."""
        return self.queue.run(cancel(self.queue, task_id, run=run, keep_ms=self._keep_ms()))

    def signal(self, event: str, data: Any = None) -> int:
        """Signal an event: every Wait on it resumes once, its then-task seeing task.event
        = data; a Wait returned within signal_ttl_s after resumes at once too. Returns how
        many waits this call resumed. Bad input raises InvalidPayload, nothing written."""
        return self.queue.run(
            waits.signal_plan(self.queue, *waits.signal_args(event, data, self.settings))
        )

    def signal_url(self, event: str, *, expires_in_s: float) -> str:
        """A URL on the monitor's web server (signal_base_url) that signals event when a
        JSON body is POSTed to it, until expires_in_s from now: HMAC-signed with
        signal_secret, bound to the event and the expiry. Nothing is written to Redis."""
        s = self.settings
        return signals.make_url(s.signal_base_url, s.signal_secret, event, expires_in_s)

    def send(self, task_id: str, data: Any) -> str:
        """Append data (any JSON value) to the task's messages: its handler reads them in
        order with task.receive(). Returns the message's id. A finished or unknown task
        raises MessageRefused (one line); data that is not JSON, InvalidPayload."""
        return self.queue.run(messages.send_plan(self.queue, task_id, data))

    def _keep_ms(self) -> int:
        return int(max(self.settings.result_ttl_s, self.settings.run_ttl_s) * 1000)

    def stream(
        self,
        run_or_task_id: str,
        *,
        follow: bool = True,
        after: str = "0-0",
        wait_s: float | None = None,
    ) -> Iterator[streams.Event]:
        """The events of the run a task belongs to (task.progress, task.emit), in order,
        those of later agents in the chain included: each an Event (id, task, agent, kind,
        seq, attempt, data). follow=True waits for more (blocking in Redis, no polling)
        and ends when the run ends; after= resumes after an event's id; wait_s bounds
        the whole wait (ResultTimeout). An unknown id is a one-line InvalidPayload."""
        plan = stream_plan(self.queue.keys, run_or_task_id, follow, after, wait_s)
        return self.queue.iterate(plan)

    def tree(self, run_id: str) -> dict[str, Any]:
        """The run as nested dicts: each task's id, agent, status, attempt, times (ms),
        (shortened) result or reason, children (a join's with their branch index and
        payload in short: branch, label), and a join's then. Raises InvalidPayload
        for an unknown or expired run."""
        return self.queue.run(tree_plan(self.queue.keys, run_id, self.settings.tree_result_bytes))

    def dead_reason(self, task_id: str) -> str:
        keys = self.queue.keys.agent(agent_of(task_id))
        raw = self.queue.manager.execute(lambda c: c.hget(keys.dead_reasons, task_id))
        return orjson.loads(raw).get("reason", "") if raw else ""

    def task(self, task_id: str) -> dict[str, Any]:
        """Everything known about one task (for `handoff inspect task`)."""
        agent = agent_of(task_id)
        keys = self.queue.keys.agent(agent)
        status, raw_result = self.queue.run(status_plan(self.queue.keys, task_id))

        def read(client) -> list:
            pipe = client.pipeline(transaction=False)
            pipe.hget(keys.tasks, task_id)
            pipe.hget(keys.deliveries, task_id)
            pipe.hget(keys.failures, task_id)
            pipe.hget(keys.dead_reasons, task_id)
            return pipe.execute()

        raw, deliveries, failures, dead = self.queue.manager.execute(read)
        info: dict[str, Any] = {"id": task_id, "agent": agent, "status": status}
        if raw is not None:
            try:
                info["task"] = orjson.loads(raw)
            except orjson.JSONDecodeError:
                info["task"] = None
                info["corrupt"] = True
        info["deliveries"] = int(deliveries or 0)
        info["failures"] = int(failures or 0)
        if dead:
            info["dead"] = orjson.loads(dead)
        if raw_result is not None:
            info["result"] = orjson.loads(raw_result)
        return info

    def agents(self) -> list[str]:
        """The agent types this server has seen (enqueued to or served), sorted."""
        return self.queue.known_agents()

    def published_schema(self, agent: str) -> dict[str, Any] | None:
        """The JSON Schema of `agent`'s payload as its workers published it (None: none
        published, an untyped agent or one no worker has served)."""
        keys = self.queue.keys
        raw = self.queue.manager.execute(lambda c: c.hget(keys.schemas, check_agent(agent)))
        return orjson.loads(raw) if raw else None

    def queue_stats(self, agents: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """Per agent: queued, running, delayed, dead, counters, oldest queued age (one trip)."""
        from handoff.protocol.inspect import queue_stats

        return queue_stats(self.queue, agents)

    # -- dead letters ----------------------------------------------------------------------

    def dead_list(self, agent: str, limit: int = 100) -> list[dict[str, Any]]:
        from handoff.protocol.inspect import dead_list

        return dead_list(self.queue, agent, limit)

    def dead_requeue(self, agent: str, ids: Sequence[str] = (), limit: int = 1000) -> list[str]:
        """Put dead tasks (ids, or the oldest limit) back in the queue with fresh counts."""
        _check_dead_selection(agent, ids, limit)
        return self.queue.dead_requeue(agent, ids, limit)

    def dead_purge(self, agent: str, ids: Sequence[str] = (), limit: int = 1000) -> int:
        """Delete dead tasks (ids, or the oldest limit) and their payloads for good."""
        _check_dead_selection(agent, ids, limit)
        return self.queue.dead_purge(agent, ids, limit)


# -- plans shared with AsyncClient (protocol/plan.py) ---------------------------------------


def status_plan(keys: Keys, task_id: str) -> Plan[tuple[str, bytes | None]]:
    """(status, the finished record) of one task."""
    agent_keys = keys.agent(agent_of(task_id))

    def probe(client) -> Any:
        # Not MULTI: a producer's least-privilege ACL (config/acl.conf) allows only reads.
        pipe = client.pipeline(transaction=False)
        pipe.get(agent_keys.result(task_id))
        pipe.zscore(agent_keys.dead, task_id)
        pipe.zscore(agent_keys.leases, task_id)
        pipe.zscore(agent_keys.delayed, task_id)
        pipe.zscore(agent_keys.queue, task_id)
        pipe.hget(agent_keys.task_groups, task_id)
        return pipe.execute()

    # The five reads are not one snapshot: a task that moved between two of them (say
    # queue -> leases) can be missed by both. Such a miss looks "unknown"; look again.
    for _ in range(3):
        done, dead, running, delayed, queued, group = yield Call(probe, n_operations=6)
        if group is not None and {queued, running, delayed, dead} == {None}:
            group_queue = agent_keys.group_queue(group.decode())
            queued = yield Call(lambda c, q=group_queue: c.zscore(q, task_id))
        if done is not None:
            return _finished_status(done), done
        for name, score in (("dead", dead), ("running", running), ("delayed", delayed)):
            if score is not None:
                return name, None
        if queued is not None:
            return "queued", None
        if (yield Call(lambda c: c.zscore(agent_keys.waiting, task_id))) is not None:
            return "waiting", None  # (a Wait's then-task, parked: protocol/waits.py)
    return "unknown", None


def waits_backoff(settings: Settings) -> ExponentialBackoff:
    """The client's retry backoff (RedisPoolConfig), for waits riding out an outage."""
    redis_config = settings.redis
    return ExponentialBackoff(
        redis_config.min_retry_backoff_ms / 1000, redis_config.max_retry_backoff_ms / 1000
    )


def result_plan(
    keys: Keys,
    task_id: str,
    wait_s: float,
    *,
    follow: bool,
    backoff: ExponentialBackoff = DEFAULT_BACKOFF,
) -> Plan[Any]:
    """Client.result: wait on the task's (or its run's) end notice, in chunks. A Redis
    outage meanwhile (a restart, a failover) is ridden out with backoff (the client's
    retry policy's) until wait_s is up: the blocking wait itself is never retried."""
    check_range("wait_s", wait_s, 0, 86_400 * 7, error=InvalidPayload)
    agent_of(task_id)
    if follow:
        return (yield from _follow_plan(keys, task_id, wait_s, backoff))
    deadline = time.monotonic() + wait_s
    block_s = WAIT_CHUNK_S
    failures = 0
    while True:
        remaining = deadline - time.monotonic()
        flag_ms = int((min(remaining, block_s) + 5) * 1000)
        try:
            state = yield from runs.task_state(keys, task_id, flag_ms)
            if state.kind == "done":
                return _result_of(task_id, state.record or {})
            if state.kind == "dead":
                raise TaskDead(f"task {task_id} is dead: {state.reason}")
            if remaining <= 0:
                status = "unknown"
                if state.kind != "unknown":
                    status = (yield from status_plan(keys, task_id))[0]
                raise ResultTimeout(f"task {task_id} is still {status} after {wait_s}s")
            if state.kind == "unknown":  # nothing will push: wait out the time, then say so
                yield Pause(min(remaining, block_s))
                continue
            yield from runs.wait_done(keys, task_id, min(remaining, block_s))
        except HandoffError as e:
            failures += 1
            yield from _ride_out(e, failures, deadline, backoff)
            continue
        failures = 0


def _follow_plan(keys: Keys, task_id: str, wait_s: float, backoff: ExponentialBackoff) -> Plan[Any]:
    deadline = time.monotonic() + wait_s
    block_s = WAIT_CHUNK_S
    root, failures = None, 0
    while True:
        remaining = deadline - time.monotonic()
        flag_ms = int((min(remaining, block_s) + 5) * 1000)
        try:
            if root is None:
                root = yield from runs.run_of(keys, task_id)
            state = yield from runs.run_state(keys, root, flag_ms)
            if state.kind == "single":
                return _result_of(root, state.record or {})
            if state.kind == "dead":
                raise TaskDead(f"run {root} ended dead: task {root}: {state.reason}")
            if state.kind == "ended":
                return _run_result(root, state.ends)
            if state.kind == "unknown":
                raise ResultTimeout(f"run {root} is unknown (never enqueued, or long gone)")
            if remaining <= 0:
                raise ResultTimeout(f"run {root} has not ended after {wait_s}s")
            yield from runs.wait_ended(keys, root, min(remaining, block_s))
        except HandoffError as e:
            failures += 1
            yield from _ride_out(e, failures, deadline, backoff)
            continue
        failures = 0


def _ride_out(
    error: HandoffError, failures: int, deadline: float, backoff: ExponentialBackoff
) -> Plan[None]:
    """A wait met an outage: back off and go on, until the wait's own deadline (then the
    outage is the answer). Anything but an unreachable or loading server is raised."""
    loading = isinstance(error, RedisCommandError) and "LOADING" in str(error)
    if not (isinstance(error, RedisUnavailable) or loading):
        raise error
    left_s = deadline - time.monotonic()
    if left_s <= 0:
        raise error
    yield Pause(min(backoff.sleep_s(failures), left_s))


def stream_plan(
    keys: Keys, run_or_task_id: str, follow: bool, after: str, wait_s: float | None
) -> Plan[None]:
    """Client.stream: the run's events (yielded among the plan's requests)."""
    agent_of(run_or_task_id)
    streams.check_after(after)
    root = yield from runs.run_of(keys, run_or_task_id)
    if (yield from runs.run_state(keys, root, 1000)).kind == "unknown":
        raise InvalidPayload(f"stream of {run_or_task_id}: no such task or run (never "
                             "enqueued, or long gone)")  # fmt: skip
    deadline = None if wait_s is None else time.monotonic() + wait_s

    def ended() -> Plan[bool]:
        if deadline is not None and time.monotonic() > deadline:
            raise ResultTimeout(f"run {root} has not ended after {wait_s}s")
        flag_ms = int((STREAM_CHUNK_S + 5) * 1000)
        return (yield from runs.run_state(keys, root, flag_ms)).kind != "wait"

    block_s = STREAM_CHUNK_S if wait_s is None else min(STREAM_CHUNK_S, wait_s)
    yield from streams.read(keys, root, follow=follow, after=after, block_s=block_s, ended=ended)


def tree_plan(keys: Keys, run_id: str, result_bytes: int) -> Plan[dict[str, Any]]:
    agent_of(run_id)
    tree = yield from runs.read_tree(keys, run_id, result_bytes)
    if tree is None:
        raise InvalidPayload(f"run {run_id} is unknown (never enqueued, or its tree expired)")
    return tree


def _finished_status(record: bytes) -> str:
    for status in ("expired", "cancelled"):
        if record.startswith(b'{"status":"%s"' % status.encode()):
            return status
    return "done"


def _result_of(task_id: str, record: dict) -> Any:
    """A finished task's result, or the error that says why it has none."""
    status = record.get("status")
    if status == "expired":
        raise TaskExpired(f"task {task_id} expired: not started by its deadline")
    if status == "cancelled":
        raise TaskCancelled(f"task {task_id} was cancelled")
    return record.get("result")


def _run_result(root: str, ends: list[dict]) -> Any:
    for end in ends:
        if end.get("status") == "cancelled":
            raise TaskCancelled(
                f"run {root} was cancelled: task {end.get('id')} ({end.get('agent')}) "
                "ended cancelled"
            )
        if end.get("status") == "expired":  # as for a root: TaskExpired, not TaskDead
            raise TaskExpired(
                f"run {root} has an expired end: task {end.get('id')} ({end.get('agent')}): "
                "not started by its deadline"
            )
        if end.get("status") != "done":
            raise TaskDead(
                f"run {root} has a {end.get('status')} end: task {end.get('id')} "
                f"({end.get('agent')}): {end.get('reason', '')}"
            )
    if len(ends) == 1:
        return ends[0].get("result")
    return [end.get("result") for end in ends]


def _check_dead_selection(agent: str, ids: Sequence[str], limit: int) -> None:
    _check_number("limit", limit, 1, 1_000_000, integer=True)
    for task_id in ids:
        if agent_of(task_id) != agent:
            raise InvalidPayload(f"task {task_id!r} does not belong to agent {agent!r}")
