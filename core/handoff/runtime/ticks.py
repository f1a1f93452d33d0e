"""When a schedule fires: its ticks as Unix milliseconds. Pure: no Redis, no clock.

Runs in: supervisors (firing) and `handoff schedules` (next fire time).

A tick is an instant, the same on every host, so it can name a task (the idempotency
key `schedule:<name>:<tick ms>`). every_s ticks are the multiples of every_s since the
Unix epoch. cron ticks are cronsim's forward sequence in the schedule's time zone, and
cronsim decides daylight saving time the way Debian's cron does:

- an expression with fixed minute and hour fields (`0 3 * * *`, `30 2 * * 1-5`) is
  matched on the wall clock: a time skipped by a spring-forward runs at the first valid
  minute after the gap (02:30 on that day in Europe/Berlin runs at 03:00 CEST, once),
  a time repeated by a fall-back runs on its first occurrence only (02:30 CEST, not again
  at 02:30 CET);
- an expression whose minute or hour field starts with `*` (`*/15 * * * *`, `0 * * * *`)
  follows real time: every quarter of an hour that exists, so the repeated hour's
  quarters run twice and the skipped hour's not at all.

cronsim's own iteration has two edges around a fall-back (started inside the repeated
hour, its wall-clock matching can answer a tick already past, and its reverse
iteration the day before); the functions here correct both, so for every instant t
`latest_tick_ms(t) <= t < next_tick_ms(latest_tick_ms(t))` and no tick lies between
(tests/test_schedules.py checks that minute by minute over both transitions).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from cronsim import CronSim

from handoff.config.schedule_spec import ScheduleSpec

_SECOND = timedelta(seconds=1)
_MAX_STEPS = 1000  # corrections per call; more would mean a broken library, not a schedule


def next_tick_ms(spec: ScheduleSpec, after_ms: int) -> int | None:
    """The first tick strictly after after_ms, or None when there is none (cron: within
    cronsim's 50-year horizon)."""
    every = spec.every_ms
    if every:
        return (after_ms // every + 1) * every
    return _cron_after(spec.cron or "", spec.zone, after_ms)


def latest_tick_ms(spec: ScheduleSpec, at_ms: int) -> int | None:
    """The last tick at or before at_ms, or None when there is none."""
    every = spec.every_ms
    if every:
        return at_ms // every * every
    expr, zone = spec.cron or "", spec.zone
    # cronsim's reverse iteration from one second past at_ms answers ticks before it, at
    # second resolution; in a repeated hour it may answer one too early or (pushed
    # forward out of a gap) one too late: step back until at or before, then forward.
    probe = (at_ms // 1000 + 1) * 1000
    found = None
    for _ in range(_MAX_STEPS):
        found = _cron_before(expr, zone, probe)
        if found is None or found <= at_ms:
            break
        probe = found
    if found is None:
        return None
    for _ in range(_MAX_STEPS):
        after = _cron_after(expr, zone, found)
        if after is None or after > at_ms:
            return found
        found = after
    return found


def _cron_after(expr: str, zone: ZoneInfo, after_ms: int) -> int | None:
    start = datetime.fromtimestamp(after_ms // 1000, UTC).astimezone(zone)
    ticks = CronSim(expr, start)
    for _ in range(_MAX_STEPS):
        try:
            tick = _ms(next(ticks))
        except StopIteration:
            return None
        if tick > after_ms:  # wall-clock matching inside a repeated hour can answer the past
            return tick
    return None


def _cron_before(expr: str, zone: ZoneInfo, before_ms: int) -> int | None:
    """The last tick strictly before before_ms (whole seconds), per cronsim's reverse."""
    start = datetime.fromtimestamp(before_ms // 1000, UTC).astimezone(zone)
    try:
        return _ms(next(CronSim(expr, start, reverse=True)))
    except StopIteration:
        return None


def _ms(moment: datetime) -> int:
    return int(moment.timestamp()) * 1000


def tick_time(spec: ScheduleSpec, tick_ms: int) -> datetime:
    """A tick as an aware datetime in the schedule's time zone (for people)."""
    return datetime.fromtimestamp(tick_ms / 1000, UTC).astimezone(spec.zone)
