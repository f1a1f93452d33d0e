"""The supervisor's Redis side: what its side thread does once a tick.

Runs in: the supervisor's Redis thread (and once in its main thread, before any fork, so
every lazy import is done first). Reaps expired leases (and what dead workers left in
their outboxes), asks the autoscaler, refreshes the supervisor's entry and takes its
control messages; what the main loop must act on goes to it as events on its queue. Redis
errors are said at most every few seconds; bad data (a malformed control message or
notice, a peer's garbage part) is said and dropped where it is read: neither ends the
thread.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Mapping

from handoff.config import Settings
from handoff.config.autoscale_spec import Bounds
from handoff.connection.manager import get_manager
from handoff.errors import HandoffError
from handoff.protocol import waits
from handoff.protocol.keys import Keys
from handoff.protocol.queue import TaskQueue
from handoff.protocol.task import now_ms
from handoff.runtime.autoscaler import Autoscaler
from handoff.runtime.control import BadControlMessage, parse_control

log = logging.getLogger("handoff.runtime.supervisor")

ERROR_EVERY_S = 5.0  # a Redis outage is said at most this often


class Upkeep:
    """One supervisor's Redis work; `events` is its main loop's queue."""

    def __init__(
        self,
        settings: Settings,
        supervisor_id: str,
        autoscale: Mapping[str, Bounds],
        events: queue.SimpleQueue,
    ) -> None:
        self.settings = settings
        self.supervisor_id = supervisor_id
        self.events = events
        self.keys = Keys(settings.key_prefix)
        self.manager = get_manager(settings.redis)
        self.queue = TaskQueue(self.manager, settings)
        self.control_key = self.keys.control(supervisor_id)
        self.autoscaler = Autoscaler(settings, self.queue, supervisor_id, autoscale)
        self._last_error = 0.0

    def tick(
        self,
        targets: Mapping[str, int],
        live_pids: Mapping[str, list[int]],
        slots: Mapping[str, int],
        stopping: Callable[[], bool],
    ) -> None:
        """targets: every supervised agent type's process count here; live_pids: its
        running workers; slots: max_concurrent of each; stopping: is the supervisor
        stopping (Redis going away then is expected)."""
        try:
            reaped = self.queue.reap(list(targets))
            moved = sum(r for r, _ in reaped.values())
            if moved:
                log.info("supervisor: requeued %d task(s) with expired leases", moved)
            self.queue.run(waits.tick_plan(self.queue, list(targets), self.queue._record_ttl_ms))
            if self.autoscaler:
                for event in self.autoscaler.tick(targets, live_pids, slots):
                    self.events.put(event)
            for raw in self.manager.execute(self._heartbeat_and_poll):
                try:
                    request = parse_control(raw, targets, self.settings.max_processes_per_agent)
                except BadControlMessage as e:
                    log.warning("supervisor: control message dropped: %s", e)
                    continue
                self.events.put(request)
        except HandoffError as e:
            if time.monotonic() - self._last_error > ERROR_EVERY_S:
                self._last_error = time.monotonic()
                # While stopping, a server that stops with us (honcho's Ctrl-C stops every
                # process at once) is expected: said, not as an error.
                say = log.info if stopping() else log.error
                say("supervisor: Redis: %s", e)

    def _heartbeat_and_poll(self, client) -> list[bytes]:
        pipe = client.pipeline(transaction=False)
        pipe.zadd(self.keys.supervisors, {self.supervisor_id: now_ms()})
        pipe.lpop(self.control_key, 100)  # takes each message once, no MULTI (one key each)
        return pipe.execute()[1] or []
