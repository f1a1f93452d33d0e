"""AsyncTaskQueue: the protocol's plans (plan.py), awaited on an AsyncRedisManager.

Runs in: AsyncClient's event loop. A producer's share of the protocol (enqueue, and the
plans of runs.py, cancel.py and streams.py): the same plans TaskQueue runs blocking,
performed here with awaits. Workers use the blocking TaskQueue.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import redis.exceptions as rex
from redis.asyncio.cluster import RedisCluster

from handoff.config import Settings
from handoff.connection.async_manager import AsyncRedisManager
from handoff.connection.cluster_calls import check_replicated
from handoff.errors import ConfigError
from handoff.protocol import plan, scripts
from handoff.protocol.plan import Call, Pause, Plan, Scripts
from handoff.protocol.queue import QueueBase
from handoff.protocol.task import Task

T = TypeVar("T")


class AsyncTaskQueue(QueueBase):
    """The plans over one AsyncRedisManager (and another for blocking waits)."""

    def __init__(
        self,
        manager: AsyncRedisManager,
        settings: Settings,
        waiting: Callable[[], AsyncRedisManager] | None = None,
    ) -> None:
        super().__init__(manager, settings)
        self._waiting = waiting

    async def run(self, operation: Plan[T]) -> T:
        return await plan.arun(self.perform, operation)

    def iterate(self, operation: Plan[None]) -> AsyncIterator[Any]:
        return plan.aiterate(self.perform, operation)

    async def perform(self, request: Any) -> Any:
        kind = type(request)
        if kind is Scripts:
            return await self.run_scripts(
                request.calls, request.extra, wait_replicas=request.wait_replicas
            )
        if kind is Call:
            if request.blocking and self._waiting is not None:
                return await self._waiting().execute(request.fn, retry=False)
            return await self.manager.execute(request.fn, retry=not request.blocking)
        if kind is Pause:
            await asyncio.sleep(request.seconds)
            return None
        raise TypeError(f"not a protocol request: {request!r}")

    async def enqueue(self, tasks: Sequence[Task]) -> list[bool]:
        return await self.run(self.enqueue_plan(tasks))

    async def known_agents(self) -> list[str]:
        return await self.run(self.known_agents_plan())

    async def run_scripts(
        self, calls: Sequence[tuple[str, list[str], list[Any]]], extra=(), *, wait_replicas=0
    ) -> list:
        """TaskQueue.run_scripts, awaited: one pipeline; NOSCRIPT loads and repeats (every
        operation is idempotent). On a cluster each call goes to its slot's primary."""
        if self.manager.is_cluster:
            return await self._run_on_cluster(calls, extra, wait_replicas)
        timeout_ms = self.settings.enqueue_wait_timeout_ms

        async def attempt(client) -> list:
            pipe = client.pipeline(transaction=False)
            for name, keys, args in calls:
                pipe.evalsha(scripts.sha(name), len(keys), *keys, *args)
            for operation in extra:
                operation(pipe)
            if wait_replicas:
                pipe.execute_command("WAIT", wait_replicas, timeout_ms)
            return await pipe.execute()

        async def run(client) -> list:
            try:
                replies = await attempt(client)
            except rex.NoScriptError:
                await scripts.load_all(client)
                replies = await attempt(client)
            if wait_replicas:
                check_replicated(replies.pop(), wait_replicas, timeout_ms, "the primary")
            return replies

        return await self.manager.execute(run)

    async def _run_on_cluster(self, calls, extra, wait_replicas: int) -> list:
        if wait_replicas:  # WAIT must follow the writes on their connection: not here
            raise ConfigError(
                "enqueue_wait_replicas: AsyncClient on a cluster cannot confirm replication "
                "(use Client for such enqueues)"
            )

        async def one(cluster: RedisCluster, name: str, keys: list[str], args: list) -> Any:
            try:
                return await cluster.evalsha(scripts.sha(name), len(keys), *keys, *args)
            except rex.NoScriptError:
                for script in scripts.NAMES:  # (SCRIPT LOAD goes to every primary)
                    await cluster.script_load(scripts.source(script))
                return await cluster.evalsha(scripts.sha(name), len(keys), *keys, *args)

        async def run(cluster: RedisCluster) -> list:
            replies = list(await asyncio.gather(*(one(cluster, *call) for call in calls)))
            for operation in extra:
                await operation(cluster)
            return replies

        return await self.manager.execute(run)
