"""Periodic schedules: declared in code or in the config file, fired by every supervisor,
each tick enqueued exactly once in total.

Runs in: the app's import (`schedule(...)` registers, like @agent), supervisors (the
Scheduler, in a side thread of its own) and `handoff schedules` (read only).

No leader is elected: every supervisor fires every tick, and three things make the
firings of one tick one task:

1. The task's id is derived from the idempotency key `schedule:<name>:<tick ms>`, so a
   second enqueue of a tick is refused while its task is queued, running, delayed or
   dead, and for `dedupe_window_s` after it finished (enqueue.lua's finished set).
2. `<prefix>:schedules` (a ZSET: schedule name -> last fired tick) is read before each
   firing and moved forward after it with ZADD GT (it never goes back): a supervisor
   never fires a tick at or before the recorded one, however late it is.
3. Between those two, the only way to fire a tick twice is for a supervisor to read the
   record, stall, and enqueue after the first task of that tick has finished *and* its
   dedupe window has passed. So schedules require `dedupe_window_s >=
   MIN_DEDUPE_WINDOW_S` (5 minutes; the default is an hour): far longer than any one
   enqueue call, retries and backoff included, takes. (The window is applied by the
   worker that acks the task: keep dedupe_window_s the same in every process.)

A supervisor that dies loses nothing while another runs: the others fire the same ticks
anyway. One that dies between its enqueue and its ZADD leaves a task the others' enqueue
of that tick is refused against (point 1), and they move the record on.

Catch-up, on start only: the latest tick at or before now, when it is after the recorded
one, is fired once with catch_up = "last" (the default) and skipped with "none"; older
missed ticks are never fired. A schedule with no record yet (new, or a flushed server)
starts with its next tick. While running, a supervisor that fell behind (a Redis outage)
fires the latest due tick once, not every one it missed.

Ticks are computed on this host's clock (ticks.py); the record makes the firing
exactly-once whatever the hosts' clocks say, a skewed clock only makes its supervisor
early or late to fire.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from handoff.config import Settings
from handoff.config.errors import ConfigError
from handoff.config.schedule_spec import ScheduleSpec, make_schedule
from handoff.errors import HandoffError, InvalidPayload
from handoff.protocol.queue import TaskQueue
from handoff.protocol.task import Task, derived_task_id, now_ms
from handoff.runtime.agents import AgentSpec, payload_for
from handoff.runtime.ticks import latest_tick_ms, next_tick_ms, tick_time

log = logging.getLogger(__name__)

MIN_DEDUPE_WINDOW_S = 300.0
MAX_WAIT_S = 5.0  # the longest sleep between looks: a wall-clock step is seen this soon
RETRY_S = 0.5  # after a failed look (Redis down): the tick stays due, tried again
KEY_PREFIX = "schedule:"

_REGISTRY: dict[str, ScheduleSpec] = {}


def schedule(
    name: str,
    *,
    agent: str,
    cron: str | None = None,
    every_s: float | None = None,
    payload: Any = None,
    timezone: str = "UTC",
    catch_up: str = "last",
    priority: int = 0,
) -> ScheduleSpec:
    """Declare a periodic schedule in the app module: at each tick of `cron` (read in
    `timezone`) or every `every_s` seconds, one task for `agent` with `payload`.

        schedule("nightly-report", cron="0 3 * * *", agent="reporter",
                 payload={"kind": "daily"}, timezone="Europe/Berlin")

    Checked now (one-line ConfigError naming the schedule); whether the agent exists is
    checked when a supervisor loads the app. The handler finds its tick in task.key
    (`schedule:<name>:<tick ms>`; tick_of(task) reads it)."""
    spec = make_schedule(
        name,
        agent=agent,
        cron=cron,
        every_s=every_s,
        payload=payload,
        timezone=timezone,
        catch_up=catch_up,
        priority=priority,
    )
    existing = _REGISTRY.get(name)
    if existing is not None and existing != spec:
        raise ConfigError(f"schedule {name!r} is declared twice, differently")
    _REGISTRY[name] = spec
    return spec


def registered_schedules() -> dict[str, ScheduleSpec]:
    """The schedules declared in code in this process (the loaded app's)."""
    return dict(_REGISTRY)


def declared_schedules(
    settings: Settings, agents: Mapping[str, AgentSpec] | None
) -> list[ScheduleSpec]:
    """Every schedule to run: the app's (code) and the config file's, checked against the
    app's agents when given (their names, and their payload types against the payload).
    One-line ConfigError naming the schedule for anything wrong."""
    code, config = registered_schedules(), settings.schedules
    both = sorted(set(code) & set(config))
    if both:
        raise ConfigError(
            f"schedule {both[0]!r} is declared both in code and in the config file: keep one"
        )
    schedules = [*code.values(), *config.values()]
    if schedules and settings.dedupe_window_s < MIN_DEDUPE_WINDOW_S:
        raise ConfigError(
            f"dedupe_window_s = {settings.dedupe_window_s:g}: schedules need at least "
            f"{MIN_DEDUPE_WINDOW_S:g} (a fired tick's key must stay refused while another "
            f"supervisor may still fire it); schedule {schedules[0].name!r} is declared"
        )
    if agents is not None:
        for spec in schedules:
            _check_against_app(spec, agents, settings)
    return schedules


def _check_against_app(spec: ScheduleSpec, agents: Mapping[str, AgentSpec], settings) -> None:
    where = f"schedule {spec.name!r}: "
    if spec.agent not in agents:
        known = ", ".join(sorted(agents)) or "none"
        raise ConfigError(
            f"{where}agent = {spec.agent!r}: not defined in app {settings.app!r} (defined: {known})"
        )
    try:
        blob = task_for(spec, 0, 0).to_json()
    except InvalidPayload as e:
        raise ConfigError(f"{where}payload: {e}") from None
    if len(blob) > settings.max_payload_bytes:
        raise ConfigError(
            f"{where}payload: its task is {len(blob)} bytes, over max_payload_bytes "
            f"({settings.max_payload_bytes})"
        )


def tick_key(name: str, tick_ms: int) -> str:
    """The idempotency key of one tick's task: the same on every supervisor."""
    return f"{KEY_PREFIX}{name}:{tick_ms}"


def tick_of(task: Task) -> tuple[str, int] | None:
    """(schedule name, tick ms) of a task a schedule fired, else None."""
    key = task.key or ""
    name, sep, tick = key.removeprefix(KEY_PREFIX).rpartition(":")
    if not key.startswith(KEY_PREFIX) or not sep or not tick.isdigit():
        return None
    return name, int(tick)


def task_for(spec: ScheduleSpec, tick_ms: int, at_ms: int) -> Task:
    """One tick's task (its id derived from the tick's key, as Client.enqueue(key=) does)."""
    key = tick_key(spec.name, tick_ms)
    return Task(
        id=derived_task_id(spec.agent, "key", key),
        agent=spec.agent,
        payload=payload_for(spec.agent, spec.payload),
        priority=spec.priority,
        created_at=at_ms,
        enqueued_at=at_ms,
        key=key,
    )


def task_id_for(spec: ScheduleSpec, tick_ms: int) -> str:
    return derived_task_id(spec.agent, "key", tick_key(spec.name, tick_ms))


def read_last_ticks(queue: TaskQueue, names: Iterable[str] | None = None) -> dict[str, int]:
    """Recorded last fired tick per schedule name (all recorded ones when names is None);
    one round trip. A schedule never fired is absent."""
    key = queue.keys.schedules
    if names is None:
        pairs = queue.manager.execute(lambda c: c.zrange(key, 0, -1, withscores=True))
        return {_text(name): int(score) for name, score in pairs}
    names = list(names)
    if not names:
        return {}
    scores = queue.manager.execute(lambda c: c.zmscore(key, names))
    return {n: int(s) for n, s in zip(names, scores, strict=True) if s is not None}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class Fired:
    """One tick a Scheduler fired: added=False when the task already existed (another
    supervisor enqueued it first)."""

    schedule: str
    tick_ms: int
    task_id: str
    added: bool


class Scheduler:
    """Fires the due ticks of a set of schedules through one TaskQueue.

    Runs in: a supervisor; step() in its main thread once at start (the catch-up), then
    run() in the side thread `supervisor-schedules`, which sleeps exactly until the next
    tick is due (so a tick fires within milliseconds of its time, not at the next 1 s
    look) and at most MAX_WAIT_S. clock_ms is the seam tests replace."""

    def __init__(
        self,
        queue: TaskQueue,
        schedules: Iterable[ScheduleSpec],
        *,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.queue = queue
        self._clock = clock_ms
        self._specs = {spec.name: spec for spec in schedules}
        self._next: dict[str, int | None] | None = None  # None until the records are read
        self._pending: list[ScheduleSpec] | None = None
        self._lock = threading.Lock()  # guards _pending (replace() comes from the main thread)
        self._last_error = 0.0

    @property
    def names(self) -> list[str]:
        return list(self._specs)

    def replace(self, schedules: Iterable[ScheduleSpec]) -> None:
        """New schedules (SIGHUP re-read the config): taken at the next step. An unchanged
        schedule keeps its place; a new or changed one starts with its next tick."""
        with self._lock:
            self._pending = list(schedules)

    def step(self) -> float:
        """Fire every due tick; return the seconds until the next one is due."""
        now = self._clock()
        self._take_pending(now)
        if self._next is None:
            self._next = self._start(now)
        due: dict[str, int] = {}
        for name, upcoming in self._next.items():
            if upcoming is not None and upcoming <= now:
                tick = latest_tick_ms(self._specs[name], now)
                due[name] = upcoming if tick is None else max(tick, upcoming)
        if due:
            self.fire(due)
            for name, tick in due.items():
                self._next[name] = next_tick_ms(self._specs[name], tick)
        return self._wait_s(self._clock())

    def run(self, stop: threading.Event) -> None:
        """step() until stop is set; a failed step (Redis down) is tried again soon, its
        ticks still due. One log line per 5 s of failures."""
        while True:
            try:
                wait_s = self.step()
            except Exception as e:  # the thread must outlive any one failure
                wait_s = RETRY_S
                if time.monotonic() - self._last_error > 5:
                    self._last_error = time.monotonic()
                    if isinstance(e, HandoffError):
                        log.error("schedules: Redis: %s (ticks stay due)", e)
                    else:
                        log.exception("schedules: step failed (ticks stay due)")
            if stop.wait(wait_s):
                return

    def fire(self, due: Mapping[str, int]) -> list[Fired]:
        """Enqueue each schedule's due tick unless the record says it was fired, then
        move the record on: three round trips for any number of schedules."""
        recorded = read_last_ticks(self.queue, due)
        todo = {name: tick for name, tick in due.items() if recorded.get(name, -1) < tick}
        if not todo:
            return []
        at = self._clock()
        tasks = [task_for(self._specs[name], tick, at) for name, tick in todo.items()]
        try:
            added = self.queue.enqueue(tasks)
        except InvalidPayload as e:  # checked at load; a tick that cannot be sent is skipped
            log.error("schedules %s: tick not enqueued: %s", ", ".join(todo), e)
            return []
        key = self.queue.keys.schedules
        self.queue.manager.execute(lambda c: c.zadd(key, todo, gt=True))
        fired = []
        for (name, tick), task, new in zip(todo.items(), tasks, added, strict=True):
            fired.append(Fired(name, tick, task.id, new))
            if new:
                when = tick_time(self._specs[name], tick).isoformat()
                log.info("schedule %s: fired tick %s: task %s", name, when, task.id)
        return fired

    def _start(self, now: int) -> dict[str, int | None]:
        """Each schedule's first tick to fire: the latest past one when it was missed and
        catch_up is "last", else the next one."""
        recorded = read_last_ticks(self.queue, self._specs)
        upcoming: dict[str, int | None] = {}
        for name, spec in self._specs.items():
            latest = latest_tick_ms(spec, now)
            last = recorded.get(name)
            if spec.catch_up == "last" and last is not None and latest is not None:
                if latest > last:
                    log.info("schedule %s: catching up the tick of %s (not recorded as "
                             "fired)", name, tick_time(spec, latest).isoformat())  # fmt: skip
                    upcoming[name] = latest
                    continue
            upcoming[name] = next_tick_ms(spec, now)
        return upcoming

    def _take_pending(self, now: int) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        old, self._specs = self._specs, {spec.name: spec for spec in pending}
        if self._next is not None:
            self._next = {
                name: self._next[name] if old.get(name) == spec else next_tick_ms(spec, now)
                for name, spec in self._specs.items()
            }
        log.info("schedules: now %s", ", ".join(self._specs) or "none")

    def _wait_s(self, now: int) -> float:
        upcoming = [t for t in (self._next or {}).values() if t is not None]
        if not upcoming:
            return MAX_WAIT_S
        return min(MAX_WAIT_S, max(0.0, (min(upcoming) - now) / 1000))
