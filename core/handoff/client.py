"""Client: the producer's and operator's API (enqueue, status, result, admin).

Runs in: any process. A Client builds its RedisManager lazily and rebuilds it when used
in a new process (after fork), so a Client made before fork is safe in the child.

It only drives plans: the reads are written once in the protocol layer (task_reads.py:
status, result, a task's record; runs.py: the tree; streams.py: a run's events) and
AsyncClient drives the same ones; tasks are built and checked in producing.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import orjson

from handoff.config import Settings, load_settings
from handoff.connection.manager import RedisManager
from handoff.connection.process import current_pid
from handoff.errors import InvalidPayload
from handoff.producing import build_task, check_number, enqueue_many_plan, many_tasks, one_task
from handoff.protocol import messages, runs, signals, streams, task_reads, waits
from handoff.protocol.cancel import CancelReport, cancel
from handoff.protocol.conflict import enqueue_keyed
from handoff.protocol.keys import check_agent
from handoff.protocol.queue import TaskQueue
from handoff.protocol.rerun import RerunReport
from handoff.protocol.rerun import rerun as rerun_plan
from handoff.protocol.steps import read_steps
from handoff.protocol.task import agent_of
from handoff.protocol.task_reads import WAIT_CHUNK_S

__all__ = ["Client", "build_task"]  # build_task: tests and benchmarks build tasks here


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
        on_conflict: str = "skip",
        debounce_s: float | None = None,
        debounce_max_s: float | None = None,
    ) -> str:
        """Add one task; returns its id (the same id again for a repeated key).

        expires_in_s: not started by then, it ends expired and never runs (a running task
        is not interrupted: that is timeout_s). run_deadline_s: the same for every task of
        the run it starts. group: its group takes turns with the others at every claim,
        under the agent's group_rate and group_concurrency; its handoffs inherit it.
        on_conflict (with a key): "skip" (the task holding the key stays), "replace" (one
        still waiting takes this payload, in its place; a started one is followed by this
        one), "debounce" (with debounce_s, and debounce_max_s: it starts debounce_s after
        the last enqueue, with the last payload, at most debounce_max_s after the first),
        "cancel_running" (a started one is cancelled, this one runs once its handler has
        ended): see protocol/conflict.py."""
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
            on_conflict=on_conflict,
            debounce_s=debounce_s,
            debounce_max_s=debounce_max_s,
        )
        if on_conflict != "skip":  # a repeated key replaces, debounces, cancels (conflict.py)
            limit, keep_ms = self.settings.max_payload_bytes, self._keep_ms()
            return self.queue.run(
                enqueue_keyed(
                    self.queue, task, on_conflict,
                    debounce_max_s=debounce_max_s, max_bytes=limit, keep_ms=keep_ms,
                )
            )  # fmt: skip
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
        unknown (one round trip)."""
        return self.queue.run(task_reads.status_plan(self.queue.keys, task_id))[0]

    def result(self, task_id: str, wait_s: float = 5.0, *, follow: bool = False) -> Any:
        """The task's result, waiting up to wait_s for it to finish.

        follow=True waits for the whole run the task started (or, for a task inside a
        run, the run it belongs to) and returns its ends: the single end's result when
        there is one, else the list of ends' results in the order they ended.

        Raises TaskDead (with the reason; for a run, naming its first dead end) and
        ResultTimeout when it is not done in time. Either way it blocks in Redis on the
        end notice the ack writes (no polling): one blocking call per WAIT_CHUNK_S.
        """
        backoff = task_reads.waits_backoff(self.settings)
        plan = task_reads.result_plan(
            self.queue.keys, task_id, wait_s, follow=follow, backoff=backoff
        )
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
        plan = streams.stream_plan(self.queue.keys, run_or_task_id, follow, after, wait_s)
        return self.queue.iterate(plan)

    def tree(self, run_id: str) -> dict[str, Any]:
        """The run as nested dicts: each task's id, agent, status, attempt, times (ms),
        (shortened) result or reason, children (a join's with their branch index and
        payload in short: branch, label), and a join's then. Raises InvalidPayload
        for an unknown or expired run."""
        plan = runs.tree_plan(self.queue.keys, run_id, self.settings.tree_result_bytes)
        return self.queue.run(plan)

    def rerun(self, run_id: str) -> RerunReport:
        """Send the run's dead tasks through again, reusing what finished (rerun.py);
        report.line() says what it did, or why it did nothing."""
        return self.queue.run(rerun_plan(self.queue.keys, run_id))

    def dead_reason(self, task_id: str) -> str:
        """Why a dead task was dead-lettered ("" when it is not dead)."""
        return self.queue.run(task_reads.dead_reason(self.queue.keys, task_id))

    def task(self, task_id: str) -> dict[str, Any]:
        """Everything known about one task (for `handoff inspect task`)."""
        info = self.queue.run(task_reads.task_info(self.queue.keys, task_id))
        steps_key = self.queue.keys.agent(agent_of(task_id)).steps(task_id)
        if steps := read_steps(self.queue.manager.execute, steps_key):
            info["steps"] = steps  # task.step: what is stored (protocol/steps.py)
        return info

    def agents(self) -> list[str]:
        """The agent types this server has seen (enqueued to or served), sorted."""
        return self.queue.known_agents()

    def published_schema(self, agent: str) -> dict[str, Any] | None:
        """The JSON Schema of `agent`'s payload as its workers published it (None: none
        published, an untyped agent or one no worker has served)."""
        key = self.queue.keys.agent(check_agent(agent)).schema
        raw = self.queue.manager.execute(lambda c: c.get(key))
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


def _check_dead_selection(agent: str, ids: Sequence[str], limit: int) -> None:
    check_number("limit", limit, 1, 1_000_000, integer=True)
    for task_id in ids:
        if agent_of(task_id) != agent:
            raise InvalidPayload(f"task {task_id!r} does not belong to agent {agent!r}")
