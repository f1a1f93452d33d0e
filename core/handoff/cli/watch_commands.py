"""`handoff watch ID`: a run's events, live, until it ends."""

from __future__ import annotations

import sys
from typing import Any

import click
import orjson

# The run's end, as the exit status: a script can tell how it went.
EXIT = {"done": 0, "dead": 1, "cancelled": 3, "expired": 4, "unknown": 5}
BAR = 24


@click.command()
@click.argument("task_id")
@click.option("--after", default="0-0", help="Resume after this event id.")
@click.pass_obj
def watch(state, task_id: str, after: str) -> None:
    """Print the events of the run TASK_ID belongs to as they happen (task.progress,
    task.emit, through every agent it hands off to) and exit when the run ends: 0 done,
    1 dead, 3 cancelled, 4 expired. On a terminal, progress is a bar per task; piped, one
    line per event."""
    from handoff.client import Client

    tty = sys.stdout.isatty()
    with Client(settings=state.settings) as client:
        bar_open = False
        for event in client.stream(task_id, after=after):
            if tty and event.kind == "progress":
                click.echo("\r\x1b[2K" + _bar(event), nl=False)
                bar_open = True
                continue
            if bar_open:
                click.echo()
                bar_open = False
            click.echo(_line(event))
        if bar_open:
            click.echo()
        status = _run_status(client, task_id)
    click.echo(f"run ended: {status}", err=True)
    sys.exit(EXIT.get(status, 5))


def _bar(event: Any) -> str:
    data = event.data if isinstance(event.data, dict) else {}
    fraction = float(data.get("fraction") or 0)
    filled = round(fraction * BAR)
    note = f" {data['note']}" if data.get("note") else ""
    bar = "#" * filled + "." * (BAR - filled)
    return f"{event.agent} {event.task} [{bar}] {fraction:4.0%}{note}"


def _line(event: Any) -> str:
    data = orjson.dumps(event.data).decode()
    retry = f" (delivery {event.delivery})" if event.delivery > 1 else ""
    return f"{event.agent} {event.task} {event.kind} #{event.seq}{retry} {data}"


def _run_status(client, task_id: str) -> str:
    from handoff.errors import ResultTimeout, TaskCancelled, TaskDead, TaskExpired

    try:
        client.result(task_id, 5, follow=True)
    except TaskCancelled:
        return "cancelled"
    except TaskExpired:
        return "expired"
    except TaskDead as e:
        return "expired" if "expired end" in str(e) else "dead"
    except ResultTimeout:
        return "unknown"
    return "done"
