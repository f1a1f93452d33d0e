"""The supervisor's autoscaler: it looks at the queues and the peers, and says what count
each autoscaled agent type should run here.

Runs in: the supervisor's Redis thread, once a tick (tick()); the main loop applies what
it returns (Autoscaled events) and tells it of `handoff scale` pins (pin()). The rule
itself is pure and lives in autoscale.py (AgentScaler); this object does the Redis side
around it: it publishes this supervisor's part beside its peers' (so all of them share
the total), sweeps parts that stopped being refreshed, reads the task time its workers
report, and keeps the host cap (max_processes, min_free_memory_mb).

What it reads is data others wrote (a peer's part, a worker's health hash): a part that
is not well formed is said once and deleted, a latency that is not a number is ignored.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Mapping

import orjson
import psutil

from handoff.config import Settings
from handoff.config.autoscale_spec import Bounds
from handoff.connection.manager import RedisManager
from handoff.protocol.inspect import queue_stats
from handoff.protocol.keys import Keys
from handoff.protocol.queue import TaskQueue
from handoff.protocol.task import now_ms
from handoff.runtime.autoscale import AgentScaler, Observation
from handoff.runtime.control import Autoscaled

log = logging.getLogger(__name__)

PART_FIELDS = ("min", "max", "current", "until")


class Autoscaler:
    """The autoscaled agent types of one supervisor (supervisor_id), each with its rule."""

    def __init__(
        self,
        settings: Settings,
        task_queue: TaskQueue,
        supervisor_id: str,
        bounds: Mapping[str, Bounds],
    ) -> None:
        self.settings = settings
        self.queue = task_queue
        self.manager: RedisManager = task_queue.manager
        self.keys = Keys(settings.key_prefix)
        self.supervisor_id = supervisor_id
        self.scalers = {
            name: AgentScaler(b, settings.autoscale_target_wait_s, settings.autoscale_cooldown_s)
            for name, b in bounds.items()
        }
        self.capped = False  # the host cap is in the way (said once per time it starts)

    def __bool__(self) -> bool:
        return bool(self.scalers)

    def __contains__(self, agent: str) -> bool:
        return agent in self.scalers

    def pin(self, agent: str, count: int | None) -> None:
        """`handoff scale`: a count pins an autoscaled agent type; None resumes it."""
        scaler = self.scalers.get(agent)
        if scaler is None:
            return
        scaler.pinned = count
        log.info(
            "supervisor: autoscale %s %s", agent,
            "resumed" if count is None else f"pinned at {count} (scale {agent}=auto resumes)",
        )  # fmt: skip

    def tick(
        self,
        targets: Mapping[str, int],
        live_pids: Mapping[str, list[int]],
        slots: Mapping[str, int],
    ) -> list[Autoscaled]:
        """The new counts, given every agent type's target here, this supervisor's live
        worker pids and each agent type's slots per process (max_concurrent)."""
        total_here = sum(targets.values())
        out = []
        for name, (obs, total, share) in self._observe(targets, live_pids).items():
            mine = targets[name]
            decision = self.scalers[name].decide(obs, mine, total, slots[name], share)
            if decision is None:
                continue
            count = decision.count
            if count > mine:
                room = self._host_room(total_here)
                if room <= 0:
                    continue
                count = min(count, mine + room)
            total_here += count - mine
            out.append(Autoscaled(name, count, decision.reason))
        return out

    def leave(self) -> None:
        """Stopped: this supervisor's parts no longer count (else they expire alone)."""
        for agent in self.scalers:
            self._sweep(agent, [self.supervisor_id])

    def _observe(
        self, targets: Mapping[str, int], live_pids: Mapping[str, list[int]]
    ) -> dict[str, tuple[Observation, int, float]]:
        """Per autoscaled agent type: what the queue and this supervisor's workers say,
        all live supervisors' processes together, and this one's share."""
        names = list(self.scalers)
        stats = queue_stats(self.queue, names)
        now = now_ms()
        replies = self.manager.execute(lambda c: self._publish_and_read(c, targets, live_pids))
        latencies = iter(replies[2 * len(names) + 1 :])
        out = {}
        for index, name in enumerate(names):
            live, expired = self._parts(name, replies[2 * index + 1], now)
            self._sweep(name, expired)
            total = sum(p["current"] for p in live)
            share = self.scalers[name].bounds.max / max(1, sum(p["max"] for p in live))
            measured = sorted(
                ms for ms in (_number(next(latencies)) for _ in live_pids.get(name, ())) if ms
            )
            task_s = measured[len(measured) // 2] / 1000 if measured else 0.0
            s = stats[name]
            obs = Observation(time.monotonic(), s["queued"], s["oldest_queued_age_s"], s["done"],
                              task_s)  # fmt: skip
            self.scalers[name].observe(obs)
            out[name] = (obs, total, share)
        return out

    def _publish_and_read(self, client, targets, live_pids) -> list:
        """One round trip: publish this supervisor's part (and read the peers'), mark the
        agent types known, read the task time its workers report."""
        names = list(self.scalers)
        until = now_ms() + int(max(3.0, 5 * self.settings.reaper_interval_s) * 1000)
        host = socket.gethostname()
        pipe = client.pipeline(transaction=False)
        for name in names:
            bounds = self.scalers[name].bounds
            part = {"min": bounds.min, "max": bounds.max, "current": targets[name],
                    "until": until, "capped": self.capped}  # fmt: skip
            key = self.keys.agent(name).autoscalers
            pipe.hset(key, self.supervisor_id, orjson.dumps(part))
            pipe.hgetall(key)
        pipe.sadd(self.keys.agents, *names)  # shown by the monitor before any task
        for name in names:
            for pid in live_pids.get(name, ()):
                pipe.hget(self.keys.worker(f"{name}-{host}-{pid}"), "latency_p50_ms")
        return pipe.execute()

    def _parts(self, agent: str, raw: dict[bytes, bytes], now: int) -> tuple[list, list]:
        """(live parts, fields to delete): expired parts, and malformed ones (said once:
        they are deleted)."""
        live, gone = [], []
        for field_name, value in raw.items():
            part = _part(value)
            if part is None:
                log.warning(
                    "supervisor: autoscale %s: malformed part %.60r of %.60r dropped",
                    agent, value, field_name,
                )  # fmt: skip
                gone.append(field_name)
            elif part["until"] < now:
                gone.append(field_name)
            else:
                live.append(part)
        return live, gone

    def _sweep(self, agent: str, expired: list) -> None:
        """Forget the parts of supervisors that stopped refreshing them (dead or gone)."""
        if expired:
            key = self.keys.agent(agent).autoscalers
            self.manager.execute(lambda c: c.hdel(key, *expired))

    def _host_room(self, processes: int) -> int:
        """How many more processes this host takes (max_processes, min_free_memory_mb);
        says once when a cap starts to be in the way, and once when it no longer is."""
        free_mb = psutil.virtual_memory().available / 2**20
        room = self.settings.max_processes - processes
        if free_mb < self.settings.min_free_memory_mb:
            room = 0
        capped = room <= 0
        if capped != self.capped:
            self.capped = capped
            if capped:
                log.warning(
                    "supervisor: host cap reached (%d of max_processes %d, %.0f MB free of "
                    "min_free_memory_mb %g): not adding processes",
                    processes, self.settings.max_processes, free_mb,
                    self.settings.min_free_memory_mb,
                )  # fmt: skip
            else:
                log.info("supervisor: below the host cap again")
        return room


def _part(value: bytes) -> dict | None:
    """A peer's part, or None when it is not one (whole numbers, max at least 1)."""
    try:
        part = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(part, dict):
        return None
    if not all(type(part.get(k)) is int and part[k] >= 0 for k in PART_FIELDS):
        return None
    return part


def _number(raw: bytes | None) -> float:
    """A worker's reported latency in ms; 0 when missing or not a finite number."""
    try:
        value = float(raw or 0)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) and value > 0 else 0.0
