"""The monitor's loop: take a snapshot every interval, publish it, show it, and log each
change of health once (not once a tick).

Runs in: `handoff monitor`. On a terminal the view refreshes in place; otherwise (under
honcho) a line per agent every LOG_EVERY_S and one log line per change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from handoff.observe.monitor import Monitor
from handoff.observe.view import log_lines, problem_lines, render

log = logging.getLogger("handoff.observe.monitor")
LOG_EVERY_S = 10.0


class ChangeLog:
    """Remembers what it last said about each worker, the server and each cluster
    primary, and logs only what changed."""

    def __init__(self) -> None:
        self.healthy: dict[str, bool] = {}  # worker id -> healthy
        self.reachable: dict[str, bool] = {}  # "redis" or a cluster node -> reachable

    def note(self, snapshot: dict[str, Any]) -> None:
        self._workers(snapshot["workers"])
        redis_view = snapshot.get("redis", {})
        redis_ok = redis_view.get("ok", True)
        if self._changed("redis", redis_ok):
            if redis_ok:
                log.info("Redis reachable again")
            else:
                log.error("Redis unreachable: %s", redis_view.get("error"))
        for node in redis_view.get("nodes", []):  # a cluster's primaries
            if self._changed(node["node"], node["ok"]):
                if node["ok"]:
                    log.info("cluster primary %s reachable again", node["node"])
                else:
                    log.error("cluster primary %s unreachable: %s", node["node"], node["error"])

    def _workers(self, workers: list[dict[str, Any]]) -> None:
        seen = set()
        for worker in workers:
            seen.add(worker["id"])
            was = self.healthy.get(worker["id"])
            if was is None or was != worker["healthy"]:
                if worker["healthy"] and was is not None:
                    log.info("worker %s is healthy again", worker["id"])
                elif not worker["healthy"]:
                    log.warning("worker %s: %s", worker["id"], "; ".join(worker["problems"]))
                self.healthy[worker["id"]] = worker["healthy"]
        for gone in set(self.healthy) - seen:
            log.warning("worker %s is gone", gone)
            del self.healthy[gone]

    def _changed(self, what: str, ok: bool) -> bool:
        """A server or node starts out reachable: only going down, or back up, is news."""
        changed = self.reachable.get(what, True) != ok
        self.reachable[what] = ok
        return changed


def watch(
    monitor: Monitor,
    interval_s: float,
    stop: threading.Event,
    *,
    tty: bool,
    emit: Callable[[str], None],
    on_snapshot: Callable[[dict[str, Any]], None] = lambda _snapshot: None,
) -> None:
    """Until stop is set: snapshot, publish (best effort), note changes, show."""
    changes = ChangeLog()
    last_log = 0.0
    last_fault = 0.0
    while not stop.is_set():
        snapshot = monitor.snapshot()
        try:  # the aggregate first: nothing a viewer of it does may hold it back
            monitor.publish(snapshot)
        except Exception as e:
            log.debug("monitor: publish failed: %s", e)
        try:
            on_snapshot(snapshot)
        except Exception:  # the dashboard's or the metrics' trouble, not the loop's
            if time.monotonic() - last_fault >= LOG_EVERY_S:
                last_fault = time.monotonic()
                log.exception("monitor: passing the snapshot on failed (the loop goes on)")
        changes.note(snapshot)
        if tty:
            emit("\x1b[2J\x1b[H" + render(snapshot))
        elif time.monotonic() - last_log >= LOG_EVERY_S:
            last_log = time.monotonic()
            for line in log_lines(snapshot) or problem_lines(snapshot):
                emit(line)
        stop.wait(interval_s)
