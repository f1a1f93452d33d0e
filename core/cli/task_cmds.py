"""Commands about tasks: enqueue, inspect, dead."""

from __future__ import annotations

import sys
from typing import Any

import click
import orjson

from core.cli.common import print_json, print_table
from core.errors import InvalidPayload
from core.keys import check_agent

STDIN_BATCH = 1000


def _client(state):
    from core.client import Client

    return Client(settings=state.settings)


@click.command()
@click.argument("agent")
@click.argument("payload")
@click.option("--priority", type=int, default=0, help="Lower runs first (-1000..1000).")
@click.option("--delay-s", type=float, default=0.0, help="Run no earlier than this from now.")
@click.option("--key", help="Idempotency key: the same key enqueues the task once.")
@click.pass_obj
def enqueue(state, agent: str, payload: str, priority: int, delay_s: float, key: str | None):
    """Enqueue one task (PAYLOAD is JSON), or JSON lines from stdin with PAYLOAD '-'.

    From stdin, lines are sent in batches of 1000, each validated whole before it is
    sent: a bad line is reported with its number and nothing of its batch is written.
    """
    check_agent(agent)
    client = _client(state)
    if payload != "-":
        value = _parse(payload, where="PAYLOAD")
        click.echo(client.enqueue(agent, value, priority=priority, delay_s=delay_s, key=key))
        return
    if key is not None:
        raise click.UsageError("--key applies to one task; not with '-'")
    total = 0
    batch: list[Any] = []
    for number, line in enumerate(sys.stdin, start=1):
        if not line.strip():
            continue
        try:
            batch.append(_parse(line, where=f"line {number}"))
        except InvalidPayload as e:
            raise InvalidPayload(
                f"{e} ({total} task(s) from earlier batches were enqueued)"
            ) from None
        if len(batch) >= STDIN_BATCH:
            total += len(client.enqueue_many(agent, batch, priority=priority, delay_s=delay_s))
            batch = []
    if batch:
        total += len(client.enqueue_many(agent, batch, priority=priority, delay_s=delay_s))
    click.echo(f"enqueued {total} task(s) for {agent}")


def _parse(text: str, *, where: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise InvalidPayload(f"{where}: invalid JSON: {e}") from None


@click.group()
def inspect() -> None:
    """One-shot views: queues, workers, one task."""


@inspect.command("queues")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def inspect_queues(state, as_json: bool) -> None:
    """Per agent type: queued, running, delayed, dead and counters."""
    stats = _client(state).queue_stats()
    if as_json:
        print_json(stats)
        return
    columns = ["queued", "running", "delayed", "dead", "done", "failed", "retried", "handed_off"]
    rows = [
        [name, *(s[c] for c in columns), f"{s['oldest_queued_age_s']:.1f}"]
        for name, s in sorted(stats.items())
    ]
    print_table(["agent", *columns, "oldest_s"], rows)


@inspect.command("task")
@click.argument("task_id")
@click.pass_obj
def inspect_task(state, task_id: str) -> None:
    """Everything known about one task (JSON)."""
    print_json(_client(state).task(task_id))


@click.group()
def dead() -> None:
    """The dead-letter queue of an agent type."""


@dead.command("list")
@click.argument("agent")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def dead_list(state, agent: str, limit: int, as_json: bool) -> None:
    """The oldest dead-lettered tasks, with reasons."""
    entries = _client(state).dead_list(check_agent(agent), limit)
    if as_json:
        print_json(entries)
        return
    print_table(["id", "reason"], [[e["id"], str(e.get("reason", ""))[:100]] for e in entries])


@dead.command("requeue")
@click.argument("agent")
@click.argument("ids", nargs=-1)
@click.option("--limit", type=click.IntRange(1, 1_000_000), default=1000)
@click.pass_obj
def dead_requeue(state, agent: str, ids: tuple[str, ...], limit: int) -> None:
    """Put dead tasks (IDS, or the oldest LIMIT) back in the queue with fresh attempts."""
    moved = _client(state).dead_requeue(check_agent(agent), ids, limit)
    click.echo(f"requeued {len(moved)} task(s)")


@dead.command("purge")
@click.argument("agent")
@click.argument("ids", nargs=-1)
@click.option("--limit", type=click.IntRange(1, 1_000_000), default=1000)
@click.option("--yes", is_flag=True, help="Do not ask.")
@click.pass_obj
def dead_purge(state, agent: str, ids: tuple[str, ...], limit: int, yes: bool) -> None:
    """Delete dead tasks (IDS, or the oldest LIMIT) and their payloads for good."""
    check_agent(agent)
    if not yes:
        click.confirm(f"purge dead tasks of {agent}?", abort=True)
    click.echo(f"purged {_client(state).dead_purge(agent, ids, limit)} task(s)")
