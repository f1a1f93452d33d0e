"""The heartbeat: this worker's health hash in Redis, and the recycling limits.

Runs in: a worker process, its own thread. Every heartbeat_interval_s it writes the hash
the monitor reads (with a TTL: a worker that dies vanishes from the view), and checks
max_tasks_per_worker, max_rss_mb and max_worker_age_s: past one, it asks the main thread
to drain and exit for a fresh process (Recycle).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from handoff.config import Settings
from handoff.connection.outage import OutageLog
from handoff.errors import HandoffError, ServerOutOfMemory
from handoff.protocol.keys import Keys
from handoff.protocol.task import now_ms
from handoff.runtime import exits
from handoff.runtime.agents import AgentSpec, published_schema
from handoff.runtime.worker_events import HelperThread, Recycle, Shared, log
from handoff.runtime.worker_stats import WorkerStats


class Heartbeat(HelperThread):
    name = "heartbeat"

    def __init__(
        self,
        shared: Shared,
        spec: AgentSpec,
        settings: Settings,
        keys: Keys,
        stats: WorkerStats,
        stopping: Callable[[], bool],
    ) -> None:
        super().__init__(shared)
        self.spec = spec
        self.settings = settings
        self.keys = keys
        self.stats = stats
        # At the memory limit heartbeats fail while claims and acks go through: that is
        # said on its own (other failures are the main loop's to say).
        self.own_outage = OutageLog(log, f"worker {self.worker_id} heartbeat", stopping=stopping)
        self._schema_published = False  # written with the first heartbeat that lands
        self._recycle_reason = ""

    def run(self) -> None:
        interval = self.settings.heartbeat_interval_s
        ttl_ms = int(max(5 * interval, 3.0) * 1000)
        while True:
            self._beat(ttl_ms)
            self._check_recycle()
            if self.stop_event.wait(interval):
                return

    def _beat(self, ttl_ms: int) -> None:
        fields = self.stats.health_fields(
            worker_id=self.worker_id,
            agent=self.spec.name,
            state=self.held.state,
            in_flight=len(self.held),
            max_concurrent=self.spec.max_concurrent,
            global_limit=self.spec.global_limit,
            manager=self.manager,
        )
        keys, name, key = self.keys, self.spec.name, self.keys.worker(self.worker_id)
        publish = not self._schema_published  # once per process, not every heartbeat
        schema = published_schema(self.spec) if publish else None

        def write(client) -> None:
            pipe = client.pipeline(transaction=False)
            pipe.hset(key, mapping=fields)
            pipe.pexpire(key, ttl_ms)
            pipe.zadd(keys.workers, {self.worker_id: now_ms()})
            # Known before any task of it is enqueued: a run cancel marks every agent known.
            pipe.sadd(keys.agents, name)
            if publish:  # the payload's schema, in the agent's slot (its worker user's)
                schema_key = keys.agent(name).schema
                if schema is None:  # an agent type that dropped its payload type
                    pipe.delete(schema_key)
                else:
                    pipe.set(schema_key, schema)
            pipe.execute()

        try:
            self.manager.execute(write, retry=False)
        except ServerOutOfMemory as e:  # the monitor sees the heartbeat missing
            self.own_outage.failed("heartbeat", e)
        except HandoffError:
            pass  # an outage: the main loop's outage log says it
        else:
            self._schema_published = True
            self.own_outage.recovered()

    def _check_recycle(self) -> None:
        s, stats = self.settings, self.stats
        reason = ""
        if s.max_tasks_per_worker and stats.processed >= s.max_tasks_per_worker:
            reason = f"processed {stats.processed} tasks"
        elif s.max_rss_mb and stats.rss_mb() > s.max_rss_mb:
            reason = f"RSS {stats.rss_mb():.0f} MB over max_rss_mb={s.max_rss_mb:g}"
        elif s.max_worker_age_s and time.time() - stats.started > s.max_worker_age_s:
            reason = f"older than max_worker_age_s={s.max_worker_age_s:g}"
        if reason and not self._recycle_reason:
            self._recycle_reason = reason
            log.info("worker %s: recycling (%s)", self.worker_id, reason)
            self.events.put(Recycle(exits.EXIT_RECYCLE, reason))

    def deregister(self) -> None:
        """From the main thread, stopping: the hash goes at once, not at its TTL."""
        keys, worker_id = self.keys, self.worker_id

        def delete(client) -> None:
            pipe = client.pipeline(transaction=False)
            pipe.delete(keys.worker(worker_id))
            pipe.zrem(keys.workers, worker_id)
            pipe.execute()

        try:
            self.manager.execute(delete, retry=False)
        except HandoffError:
            pass
