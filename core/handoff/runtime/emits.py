"""What handlers emit (task.progress(), task.emit()), buffered for the main thread to send.

Runs in: a worker process. emit() is called from any handler thread or the event loop; it
only appends and, once per batch, wakes the main thread (EventsPending), which sends the
whole batch in one pipeline: no handler ever waits on Redis for it.
"""

from __future__ import annotations

import collections
import queue

from handoff.config import Settings
from handoff.connection.manager import RedisManager
from handoff.connection.outage import OutageLog
from handoff.errors import HandoffError, InvalidPayload
from handoff.protocol import streams
from handoff.protocol.keys import Keys
from handoff.protocol.task import Task
from handoff.runtime.worker_events import EventsPending


class Emits:
    def __init__(
        self,
        settings: Settings,
        manager: RedisManager,
        keys: Keys,
        events: queue.SimpleQueue,
        outage: OutageLog,
    ) -> None:
        self.settings = settings
        self.manager = manager
        self.keys = keys
        self.events = events
        self.outage = outage
        self._emitted: collections.deque[tuple] = collections.deque()
        self._flagged = False
        keep_s = max(60.0, settings.result_ttl_s, settings.run_ttl_s)
        self._stream_keep_ms = int(keep_s * 1000)  # a run's stream lives as long as the run

    def emit(self, task: Task, kind: str, seq: int, blob: bytes) -> None:
        """From a handler (any thread): keep the event for the main thread to send."""
        limit = self.settings.max_event_bytes
        if len(blob) > limit:
            raise InvalidPayload(f"task.{kind}: {len(blob)} bytes, over max_event_bytes ({limit})")
        self._emitted.append(
            (task.run_id, task.id, task.agent, task.attempt, task.deliveries, kind, seq, blob)
        )
        if not self._flagged:  # one wake-up per batch (see send)
            self._flagged = True
            self.events.put(EventsPending())

    def send(self) -> None:
        """Send what handlers emitted, in one pipeline (main thread). Events are a view of
        the work, not the work: when Redis cannot take them they are dropped (said once)."""
        self._flagged = False  # before draining: a later emit flags again
        batch = []
        while self._emitted:
            batch.append(self._emitted.popleft())
        if not batch:
            return
        try:
            self.manager.execute(
                lambda c: streams.append(
                    c, self.keys, batch, self.settings.stream_max_len, self._stream_keep_ms
                ),
                retry=False,
            )
        except HandoffError as e:
            self.outage.failed(f"send {len(batch)} event(s)", e)
