"""Commands about tasks: enqueue, inspect, dead."""

from __future__ import annotations

import sys
from typing import Any

import click
import orjson

from handoff.cli.common import print_json, print_table
from handoff.cli.schema_check import PublishedSchemaCheck
from handoff.errors import InvalidAgentName, InvalidPayload
from handoff.protocol.conflict import ON_CONFLICT
from handoff.protocol.keys import check_agent

STDIN_BATCH = 1000


def _client(state):
    """A Client for one command; use it in a with block so its pool is closed."""
    from handoff.client import Client

    return Client(settings=state.settings)


def _call(state, method: str, *args, **kwargs):
    with _client(state) as client:
        return getattr(client, method)(*args, **kwargs)


@click.command()
@click.argument("agent")
@click.argument("payload")
@click.option("--priority", type=int, default=0, help="Lower runs first (-1000..1000).")
@click.option("--delay-s", type=float, default=0.0, help="Run no earlier than this from now.")
@click.option("--key", help="Idempotency key: the same key enqueues the task once.")
@click.option(
    "--on-conflict",
    type=click.Choice(ON_CONFLICT),
    default="skip",
    show_default=True,
    help="What a repeated --key does to the task holding it (see the python API's enqueue).",
)
@click.option("--debounce-s", type=float, help="debounce: start this long after the last.")
@click.option("--debounce-max-s", type=float, help="debounce: at most this after the first.")
@click.pass_obj
def enqueue(
    state,
    agent: str,
    payload: str,
    priority: int,
    delay_s: float,
    key: str | None,
    on_conflict: str,
    debounce_s: float | None,
    debounce_max_s: float | None,
):
    """Enqueue one task (PAYLOAD is JSON), or JSON lines from stdin with PAYLOAD '-'.

    AGENT must be defined in the app (--app). From stdin, lines are sent in batches of
    1000, each validated whole before it is sent: a bad line is reported with its number
    and nothing of its batch is written. A repeated --key, by --on-conflict: skip (the
    task holding it stays), replace (a waiting one takes this payload; a running one is
    followed by this one), debounce (with --debounce-s, and --debounce-max-s),
    cancel_running (a running one is cancelled, this one follows it).
    """
    check_agent(agent)
    check_known_agent(state, agent)
    conflict = {
        "on_conflict": on_conflict, "debounce_s": debounce_s, "debounce_max_s": debounce_max_s
    }  # fmt: skip
    with _client(state) as client:
        # With the app loaded the client checks the declared type itself; without it, the
        # schema the agent's workers published is what can be checked.
        schema = None if state.settings.app else client.published_schema(agent)
        _enqueue(
            client, agent, payload, priority, delay_s, key, PublishedSchemaCheck(agent, schema),
            conflict,
        )  # fmt: skip


def _enqueue(
    client,
    agent: str,
    payload: str,
    priority: int,
    delay_s: float,
    key: str | None,
    schema: PublishedSchemaCheck,
    conflict: dict[str, Any],
):
    from handoff.errors import TaskRejected

    if payload != "-":
        value = _parse(payload, where="PAYLOAD")
        schema.check(value)
        click.echo(
            client.enqueue(agent, value, priority=priority, delay_s=delay_s, key=key, **conflict)
        )
        return
    if key is not None:
        raise click.UsageError("--key applies to one task; not with '-'")
    if conflict != {"on_conflict": "skip", "debounce_s": None, "debounce_max_s": None}:
        raise click.UsageError("--on-conflict and --debounce-* apply to one task; not with '-'")
    total = 0
    batch: list[Any] = []
    numbers: list[int] = []  # the line number of each task in the batch

    def send() -> int:
        try:
            return len(client.enqueue_many(agent, batch, priority=priority, delay_s=delay_s))
        except TaskRejected as e:
            raise InvalidPayload(_at_line(numbers[e.index], e.detail, total)) from None

    for number, line in enumerate(sys.stdin, start=1):
        if not line.strip():
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise InvalidPayload(_at_line(number, f"invalid JSON: {e}", total)) from None
        try:
            schema.check(value, where="payload")
        except InvalidPayload as e:
            raise InvalidPayload(_at_line(number, str(e), total)) from None
        batch.append(value)
        numbers.append(number)
        if len(batch) >= STDIN_BATCH:
            total += send()
            batch, numbers = [], []
    if batch:
        total += send()
    click.echo(f"enqueued {total} task(s) for {agent}")


def _at_line(number: int, problem: str, sent: int) -> str:
    note = f" ({sent} task(s) from earlier batches were enqueued)" if sent else ""
    return f"stdin line {number}: {problem}; nothing of its batch was enqueued{note}"


def check_known_agent(state, agent: str) -> None:
    """An agent nobody defines would wait forever: refuse it, naming the ones that exist.

    With --app, the app's definitions decide; without, the agent types this server has
    already seen (the registry), so a typo is refused without importing anything."""
    from handoff.runtime.agents import load_app

    app = state.settings.app
    if app:
        defined = load_app(app)
        if agent not in defined:
            known = ", ".join(sorted(defined)) or "none"
            raise InvalidAgentName(
                f"unknown agent {agent!r}: app {app!r} does not define it (defined: {known}; "
                "pass --app MODULE where it is defined)"
            )
        return
    seen = _call(state, "agents")
    if agent not in seen:
        known = ", ".join(seen) or "none"
        raise InvalidAgentName(
            f"unknown agent {agent!r}: this server has not seen it (known: {known}); "
            "pass --app MODULE to check it against your agent definitions"
        )


def _parse(text: str, *, where: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise InvalidPayload(f"{where}: invalid JSON: {e}") from None


@click.group()
def inspect() -> None:
    """One-shot views: queues, agents, one task, a run's tree."""


@inspect.command("queues")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def inspect_queues(state, as_json: bool) -> None:
    """Per agent type: queued, running, delayed, dead, counters, waiting (parked by a
    Wait), and a limit set live."""
    stats = _call(state, "queue_stats")
    if as_json:
        print_json(stats)
        return
    columns = [
        "queued", "running", "delayed", "dead", "done", "cancelled", "failed", "retried",
        "handed_off", "waiting",
    ]  # fmt: skip
    rows = [
        [name, *(s.get(c, 0) for c in columns), f"{s['oldest_queued_age_s']:.1f}", _limit_cell(s)]
        for name, s in sorted(stats.items())
    ]
    print_table(["agent", *columns, "oldest_s", "limit"], rows)
    for name, s in sorted(stats.items()):
        if s.get("busiest_groups"):
            shown = ", ".join(
                f"{g['group']} {g['ready']} ready {g['running']} running"
                + (f" waits {g['waiting_s']:.1f}s" if g["waiting_s"] else "")
                for g in s["busiest_groups"]
            )
            waiting = f"{s['groups_waiting']} waiting" if s["groups_waiting"] else "none waiting"
            click.echo(f"{name} groups: {s['groups_ready']} ready, {waiting}; busiest: {shown}")


def _limit_cell(stats: dict[str, Any]) -> str:
    """A rate set live (the code's own shows as "-": only its workers know it), a pause."""
    cell = stats.get("rate_live") or "-"
    if stats.get("paused_s"):
        cell += f" paused {stats['paused_s']:.1f}s"
    return cell


@inspect.command("agents")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with JSON Schemas).")
@click.pass_obj
def inspect_agents(state, as_json: bool) -> None:
    """The agents the app (--app) defines: limits, and payload and result types."""
    from handoff.runtime.agents import app_agents
    from handoff.runtime.agents import describe as describe_agent

    if not state.settings.app:
        raise click.UsageError("inspect agents reads the app's definitions: pass --app MODULE")
    specs = sorted(app_agents(state.settings.app).items())
    described = {name: describe_agent(spec) for name, spec in specs}
    if as_json:
        print_json(described)
        return
    columns = ["max_concurrent", "global_limit", "timeout_s", "max_attempts", "payload", "result"]
    rows = [
        [name, *(d[c] if d[c] is not None else "-" for c in columns)]
        for name, d in described.items()
    ]
    print_table(["agent", *columns], rows)


@click.command()
@click.argument("task_id")
@click.option("--run", "whole_run", is_flag=True, help="Cancel every task of its run.")
@click.option("--json", "as_json", is_flag=True, help="Print what was found as JSON.")
@click.pass_obj
def cancel(state, task_id: str, whole_run: bool, as_json: bool) -> None:
    """Cancel a task (queued, delayed or running), or with --run every task of its run.

    Queued and delayed tasks never start; running handlers are told at once. Cancelling
    a finished or unknown task changes nothing and says so."""
    report = _call(state, "cancel", task_id, run=whole_run)
    if as_json:
        print_json({"task": report.task_id, "run": report.run, "was": dict(report.was)})
    else:
        click.echo(report.line())


@inspect.command("task")
@click.argument("task_id")
@click.pass_obj
def inspect_task(state, task_id: str) -> None:
    """Everything known about one task (JSON)."""
    print_json(_call(state, "task", task_id))


@inspect.command("tree")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the tree as nested JSON.")
@click.pass_obj
def inspect_tree(state, run_id: str, as_json: bool) -> None:
    """A run as a tree: every task handed off from RUN_ID, with status, attempts and
    times, joins and their then-tasks (finished tasks are kept for run_ttl_s)."""
    from handoff.cli.tree_view import tree_lines

    tree = _call(state, "tree", run_id)
    if as_json:
        print_json(tree)
        return
    for line in tree_lines(tree):
        click.echo(line)


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
    entries = _call(state, "dead_list", check_agent(agent), limit)
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
    moved = _call(state, "dead_requeue", check_agent(agent), ids, limit)
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
    click.echo(f"purged {_call(state, 'dead_purge', agent, ids, limit)} task(s)")
