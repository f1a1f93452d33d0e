"""`handoff schedules`: every schedule, when it fires next, and what it fired last.

Runs in: the CLI process. The schedules are the app's (--app: those it declares with
schedule(...)) and the config file's; the last fired ticks come from Redis (one round
trip). A name Redis remembers that neither declares any more is listed too, marked.
"""

from __future__ import annotations

from typing import Any

import click

from handoff.cli.common import print_json, print_table
from handoff.config.schedule_spec import ScheduleSpec


@click.command("schedules")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def schedules(state, as_json: bool) -> None:
    """List the schedules: agent, cron or interval, next fire time, last fired tick and task.

    Reads the app (--app) for schedules declared in code, and the config file's
    [schedules.<name>] tables. Times are shown in each schedule's time zone.
    """
    from handoff.client import Client
    from handoff.protocol.task import now_ms
    from handoff.runtime.agents import load_app
    from handoff.runtime.schedules import declared_schedules, read_last_ticks

    settings = state.settings
    agents = load_app(settings.app) if settings.app else None  # errors: one line, exit 2
    specs = declared_schedules(settings, agents)
    with Client(settings=settings) as client:
        recorded = read_last_ticks(client.queue)
    rows = schedule_rows(specs, recorded, now_ms())
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo(
            "no schedules (declare them with schedule(...) in the app, or [schedules.<name>])"
        )
        return
    print_table(
        ["schedule", "agent", "when", "next", "last fired", "last task"],
        [
            [r["name"], r["agent"] or "-", r["when"], r["next"] or "-",
             r["last_tick"] or "never", r["last_task"] or "-"]
            for r in rows
        ],
    )  # fmt: skip


def schedule_rows(
    specs: list[ScheduleSpec], recorded: dict[str, int], at_ms: int
) -> list[dict[str, Any]]:
    """One dict per schedule (declared first, then names only Redis remembers)."""
    from handoff.runtime.schedules import task_id_for
    from handoff.runtime.ticks import next_tick_ms

    rows = []
    for spec in sorted(specs, key=lambda s: s.name):
        upcoming = next_tick_ms(spec, at_ms)
        last = recorded.get(spec.name)
        rows.append({
            "name": spec.name,
            "declared": True,
            "agent": spec.agent,
            "when": spec.describe(),
            "cron": spec.cron,
            "every_s": spec.every_s,
            "timezone": spec.timezone,
            "catch_up": spec.catch_up,
            "priority": spec.priority,
            "next": _shown(spec, upcoming),
            "next_ms": upcoming,
            "last_tick": _shown(spec, last),
            "last_tick_ms": last,
            "last_task": task_id_for(spec, last) if last is not None else None,
        })  # fmt: skip
    declared = {spec.name for spec in specs}
    for name in sorted(set(recorded) - declared):
        rows.append({
            "name": name, "declared": False, "agent": None, "when": "(not declared)",
            "cron": None, "every_s": None, "timezone": None, "catch_up": None,
            "priority": None, "next": None, "next_ms": None,
            "last_tick": _shown(None, recorded[name]), "last_tick_ms": recorded[name],
            "last_task": None,
        })  # fmt: skip
    return rows


def _shown(spec: ScheduleSpec | None, tick_ms: int | None) -> str | None:
    """A tick as local time in the schedule's zone (UTC when it has none), to the second."""
    from datetime import UTC, datetime

    if tick_ms is None:
        return None
    moment = datetime.fromtimestamp(tick_ms / 1000, UTC)
    if spec is not None:
        moment = moment.astimezone(spec.zone)
    return moment.isoformat(sep=" ", timespec="seconds")
