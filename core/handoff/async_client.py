"""AsyncClient: the producer's API for asyncio applications (FastAPI, aiohttp, ...).

Runs in: an event loop, with no threads. The same operations as Client (enqueue,
enqueue_many, status, result with follow, cancel, stream, tree), written once as plans
(protocol/plan.py) and awaited here on redis-py's asyncio client, with Client's pool
settings, retry policy, circuit breaker and error messages (connection/async_manager.py).

Process and loop: an AsyncClient builds its connections on first use and again in a new
process (after fork) or on another event loop (asyncio connections belong to one loop),
so one made at import time is safe anywhere.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import replace
from typing import Any

from handoff.config import Settings, load_settings
from handoff.connection.async_manager import AsyncRedisManager
from handoff.connection.process import current_pid
from handoff.producing import enqueue_many_plan, many_tasks, one_task
from handoff.protocol import messages, runs, streams, waits
from handoff.protocol.async_queue import AsyncTaskQueue
from handoff.protocol.cancel import CancelReport, cancel
from handoff.protocol.conflict import enqueue_keyed
from handoff.protocol.rerun import RerunReport
from handoff.protocol.rerun import rerun as rerun_plan
from handoff.protocol.streams import stream_plan
from handoff.protocol.task_reads import WAIT_CHUNK_S, result_plan, status_plan, waits_backoff


class AsyncClient:
    """`async with AsyncClient() as client: await client.enqueue(...)`. Reads REDIS_URL and
    HANDOFF_* settings like Client; every method but stream() is a coroutine."""

    def __init__(self, url: str | None = None, *, settings: Settings | None = None) -> None:
        if settings is None:
            settings = load_settings(overrides={"redis.url": url} if url else None)
        self.settings = settings
        self._queue: AsyncTaskQueue | None = None
        self._waiting: AsyncRedisManager | None = None

    @property
    def queue(self) -> AsyncTaskQueue:
        """This process's and this loop's queue (a new one after fork or on a new loop:
        the old one's sockets are dropped, never closed from here)."""
        queue = self._queue
        if queue is None or not queue.manager.owned_here():
            queue = AsyncTaskQueue(
                AsyncRedisManager(self.settings.redis), self.settings, waiting=self._waiting_manager
            )
            self._queue, self._waiting = queue, None
        return queue

    def _waiting_manager(self) -> AsyncRedisManager:
        """For blocking waits (result, stream): connections whose read timeout outlasts
        one wait, so an idle waiter sends nothing until the end notice."""
        if self._waiting is None or not self._waiting.owned_here():
            config = replace(self.settings.redis, read_timeout_s=WAIT_CHUNK_S + 10)
            self._waiting = AsyncRedisManager(config)
        return self._waiting

    async def close(self) -> None:
        """Close this loop's connections (a client used in another process or loop only
        forgets them)."""
        for manager in (self._queue.manager if self._queue else None, self._waiting):
            if manager is not None and manager.pid == current_pid():
                try:
                    await manager.close()
                except RuntimeError:  # their loop is closed: nothing left to close
                    pass
        self._queue, self._waiting = None, None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- enqueue ---------------------------------------------------------------------------

    async def enqueue(
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
        """Add one task; returns its id (see Client.enqueue)."""
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
            limit = self.settings.max_payload_bytes
            keep_ms = int(max(self.settings.result_ttl_s, self.settings.run_ttl_s) * 1000)
            queue = self.queue
            return await queue.run(
                enqueue_keyed(
                    queue, task, on_conflict,
                    debounce_max_s=debounce_max_s, max_bytes=limit, keep_ms=keep_ms,
                )
            )  # fmt: skip
        await self.queue.enqueue([task])
        return task.id

    async def enqueue_many(
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
        """Add many tasks in one round trip, all validated first (see Client.enqueue_many)."""
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
        queue = self.queue
        return await queue.run(enqueue_many_plan(queue, tasks))

    # -- looking ---------------------------------------------------------------------------

    async def status(self, task_id: str) -> str:
        """queued | delayed | running | done | dead | expired | cancelled | unknown."""
        queue = self.queue
        return (await queue.run(status_plan(queue.keys, task_id)))[0]

    async def result(self, task_id: str, wait_s: float = 5.0, *, follow: bool = False) -> Any:
        """The task's (follow=True: its run's) result, waiting up to wait_s: awaits the end
        notice in Redis, no polling (see Client.result)."""
        queue = self.queue
        backoff = waits_backoff(self.settings)
        plan = result_plan(queue.keys, task_id, wait_s, follow=follow, backoff=backoff)
        return await queue.run(plan)

    async def signal(self, event: str, data: Any = None) -> int:
        """Signal an event: every Wait on it resumes once (see Client.signal)."""
        queue = self.queue
        return await queue.run(
            waits.signal_plan(queue, *waits.signal_args(event, data, self.settings))
        )

    async def send(self, task_id: str, data: Any) -> str:
        """Append data to the task's messages (see Client.send)."""
        return await self.queue.run(messages.send_plan(self.queue, task_id, data))

    async def cancel(self, task_id: str, *, run: bool = False) -> CancelReport:
        """Cancel a task, or (run=True) its whole run (see Client.cancel)."""
        keep_ms = int(max(self.settings.result_ttl_s, self.settings.run_ttl_s) * 1000)
        queue = self.queue
        return await queue.run(cancel(queue, task_id, run=run, keep_ms=keep_ms))

    def stream(
        self,
        run_or_task_id: str,
        *,
        follow: bool = True,
        after: str = "0-0",
        wait_s: float | None = None,
    ) -> AsyncIterator[streams.Event]:
        """`async for event in client.stream(id)`: the run's events as they happen, ending
        with the run (see Client.stream)."""
        queue = self.queue
        return queue.iterate(stream_plan(queue.keys, run_or_task_id, follow, after, wait_s))

    async def rerun(self, run_id: str) -> RerunReport:
        """Send the run's dead tasks through again (see Client.rerun)."""
        return await self.queue.run(rerun_plan(self.queue.keys, run_id))

    async def tree(self, run_id: str) -> dict[str, Any]:
        """The run as nested dicts (see Client.tree)."""
        queue = self.queue
        return await queue.run(runs.tree_plan(queue.keys, run_id, self.settings.tree_result_bytes))
