"""A schedule's declaration, checked once: `schedule(...)` in code or `[schedules.<name>]`
in the TOML file.

Runs in: every process that loads the settings or imports the app. Pure: no Redis, no
app. What needs the app (is the agent defined, does its payload type take the payload)
is checked where the app is loaded (handoff.runtime.schedules.declared_schedules).

Every failure is one line naming the schedule: `schedule 'nightly': cron = '0 3 * *':
not a cron expression (Wrong number of fields)`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from cronsim import CronSim, CronSimError

from handoff.config.checks import check_range, fail, show
from handoff.config.errors import ConfigError
from handoff.config.names import AGENT_NAME_RE

CATCH_UP = ("last", "none")
# A tick more often than once a second is a loop, not a schedule; a year is the longest
# delay a task takes too.
MIN_EVERY_S, MAX_EVERY_S = 1.0, 366 * 86_400.0
# The task priority range (handoff.protocol.task.MIN_PRIORITY/MAX_PRIORITY; the config
# layer cannot import the protocol, a test checks the two agree).
MIN_PRIORITY, MAX_PRIORITY = -1000, 1000
TABLE_KEYS = ("cron", "every_s", "agent", "payload", "timezone", "catch_up", "priority")


@dataclass(frozen=True)
class ScheduleSpec:
    """One periodic schedule: which agent gets which payload at which ticks.

    Exactly one of cron (5 fields, or 6 with seconds first; read in `timezone`) and
    every_s (ticks at whole multiples of every_s since the Unix epoch, so every host
    computes the same ticks whatever its time zone) is set. catch_up says what a
    supervisor does on start with a tick missed while no supervisor ran: "last" fires the
    latest one once, "none" skips it."""

    name: str
    agent: str
    cron: str | None = None
    every_s: float | None = None
    payload: Any = field(default_factory=dict, hash=False)
    timezone: str = "UTC"
    catch_up: str = "last"
    priority: int = 0

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)  # cached by zoneinfo: one object per key

    @property
    def every_ms(self) -> int:
        return round((self.every_s or 0) * 1000)

    def describe(self) -> str:
        """'cron 0 3 * * * Europe/Berlin' or 'every 1s'."""
        if self.cron is not None:
            return f"cron {self.cron} {self.timezone}"
        return f"every {show(self.every_s)}s"

    def to_table(self) -> dict[str, Any]:
        """The TOML table form (`config show`): unset fields left out, name is the key."""
        table = {
            "cron": self.cron,
            "every_s": self.every_s,
            "agent": self.agent,
            "payload": self.payload,
            "timezone": self.timezone,
            "catch_up": self.catch_up,
            "priority": self.priority,
        }
        return {k: v for k, v in table.items() if v is not None}


def make_schedule(
    name: Any,
    *,
    agent: Any,
    cron: Any = None,
    every_s: Any = None,
    payload: Any = None,
    timezone: Any = "UTC",
    catch_up: Any = "last",
    priority: Any = 0,
) -> ScheduleSpec:
    """Check every field and build the ScheduleSpec; ConfigError (one line) otherwise."""
    if not isinstance(name, str) or not AGENT_NAME_RE.fullmatch(name):
        fail("schedule name", name, f"must match ^{AGENT_NAME_RE.pattern}$")
    where = f"schedule {name!r}: "
    if not isinstance(agent, str) or not AGENT_NAME_RE.fullmatch(agent):
        fail(f"{where}agent", agent, f"must be an agent name (^{AGENT_NAME_RE.pattern}$)")
    if (cron is None) == (every_s is None):
        both = "not both" if cron is not None else "one is needed"
        raise ConfigError(f"{where}give cron= or every_s=, {both}")
    zone = _zone(where, timezone)
    if cron is not None:
        _check_cron(where, cron, zone)
    else:
        every_s = float(check_range(f"{where}every_s", every_s, MIN_EVERY_S, MAX_EVERY_S))
    if catch_up not in CATCH_UP:
        fail(f"{where}catch_up", catch_up, f"must be one of {', '.join(CATCH_UP)}")
    check_range(f"{where}priority", priority, MIN_PRIORITY, MAX_PRIORITY, integer=True)
    if payload is None:
        payload = {}
    if not _is_model(payload):  # a model is checked against its agent's type at app load
        try:
            orjson.dumps(payload)
        except (TypeError, orjson.JSONEncodeError) as e:
            raise ConfigError(f"{where}payload is not JSON-serialisable: {e}") from None
    return ScheduleSpec(name, agent, cron, every_s, payload, timezone, catch_up, priority)


def _is_model(payload: Any) -> bool:
    return hasattr(payload, "model_dump")


def _zone(where: str, timezone: Any) -> ZoneInfo:
    if not isinstance(timezone, str) or not timezone:
        fail(f"{where}timezone", timezone, "must be an IANA time zone name like 'Europe/Berlin'")
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):  # ValueError: a malformed key ('../x')
        fail(f"{where}timezone", timezone, "unknown time zone (an IANA name like 'Europe/Berlin')")


def _check_cron(where: str, cron: Any, zone: ZoneInfo) -> None:
    if not isinstance(cron, str):
        fail(f"{where}cron", cron, "must be a cron expression like '0 3 * * *'")
    try:
        ticks = CronSim(cron, datetime.now(UTC).astimezone(zone))
    except CronSimError as e:
        fail(f"{where}cron", cron, f"not a cron expression ({e})")
    try:
        next(ticks)
    except StopIteration:  # cronsim looks 50 years ahead
        fail(f"{where}cron", cron, "never fires")


def schedules_from_tables(value: Any) -> dict[str, ScheduleSpec]:
    """The [schedules] table of the config file -> name -> ScheduleSpec."""
    if not isinstance(value, Mapping):
        fail("schedules", value, "must be a table of [schedules.<name>] tables")
    out: dict[str, ScheduleSpec] = {}
    for name, table in value.items():
        if isinstance(table, ScheduleSpec):  # Settings(schedules=...) built in code
            if table.name != name:
                fail(f"schedules.{name}", table.name, "a ScheduleSpec under another name")
            out[name] = table
            continue
        if not isinstance(table, Mapping):
            fail(f"schedules.{name}", table, "must be a table ([schedules.<name>])")
        for key in table:
            if key not in TABLE_KEYS:
                close = difflib.get_close_matches(str(key), TABLE_KEYS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"schedule {name!r}: unknown key {key!r}{hint}")
        if "agent" not in table:
            raise ConfigError(f'schedule {name!r}: agent is missing (agent = "NAME")')
        out[name] = make_schedule(name, **table)
    return out
