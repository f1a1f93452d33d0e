"""Commands that watch: monitor, health, inspect workers."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from handoff.cli.common import print_json, print_table

log = logging.getLogger("handoff.observe.monitor")


def _monitor(state):
    from handoff.connection.manager import get_manager
    from handoff.observe.monitor import Monitor
    from handoff.protocol.queue import TaskQueue

    settings = state.settings
    return Monitor(TaskQueue(get_manager(settings.redis), settings))


@click.command()
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@click.option("--json", "as_json", is_flag=True, help="JSON output (with --once).")
@click.option("--interval-s", type=click.FloatRange(0.05, 3600), help="Refresh (default 1 s).")
@click.option("--metrics-port", type=click.IntRange(1, 65535), help="Serve Prometheus here.")
@click.option("--metrics-addr", default="127.0.0.1", show_default=True)
@click.pass_obj
def monitor(state, once, as_json, interval_s, metrics_port, metrics_addr) -> None:
    """Live aggregate view of agents and workers; writes the aggregate to Redis.

    On a terminal: a refreshing table. Otherwise (under honcho): a line per agent every
    10 s, and one log line whenever a worker's health changes.
    """
    from handoff.observe.view import render

    watcher = _monitor(state)
    if once:
        snapshot = watcher.snapshot()
        if as_json:
            print_json(snapshot)
        else:
            click.echo(render(snapshot))
        return
    from handoff.observe.watch import watch

    latest: dict = {}
    if metrics_port:
        from handoff.observe.metrics_export import serve

        serve(metrics_port, lambda: latest.get("snapshot"), addr=metrics_addr)
        log.info("monitor: Prometheus metrics on http://%s:%d/metrics", metrics_addr, metrics_port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        watch(
            watcher,
            interval_s or state.settings.monitor_interval_s,
            stop,
            tty=sys.stdout.isatty(),
            emit=click.echo,
            on_snapshot=lambda snapshot: latest.update(snapshot=snapshot),
        )
    except KeyboardInterrupt:
        pass


@click.command()
@click.pass_obj
def health(state) -> None:
    """Exit 0 when Redis and every worker are healthy, 1 otherwise (one line per problem)."""
    from handoff.observe.view import problem_lines

    snapshot = _monitor(state).snapshot()
    for line in problem_lines(snapshot):
        click.echo(line)
    if snapshot["healthy"]:
        click.echo(f"healthy: {len(snapshot['workers'])} worker(s)")
    sys.exit(0 if snapshot["healthy"] else 1)


def inspect_workers_command(inspect_group: click.Group) -> None:
    """Add `inspect workers` to the inspect group."""

    @inspect_group.command("workers")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.pass_obj
    def inspect_workers(state, as_json: bool) -> None:
        """Every live worker: state, load, memory, CPU, heartbeat and health."""
        from handoff.observe.view import WORKER_COLUMNS, worker_rows

        snapshot = _monitor(state).snapshot()
        if as_json:
            print_json(snapshot["workers"])
            return
        print_table(list(WORKER_COLUMNS), worker_rows(snapshot))
