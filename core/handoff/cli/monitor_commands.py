"""Commands that watch: monitor, health, inspect workers."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time

import click

from handoff.cli.common import print_json, print_table

log = logging.getLogger("handoff.observe.monitor")
# `monitor --once`: the tasks/s it prints are measured over this interval by default.
ONCE_RATE_WINDOW_S = 1.0


def _monitor(state):
    from handoff.connection.manager import get_manager
    from handoff.observe.monitor import Monitor
    from handoff.protocol.queue import TaskQueue

    settings = state.settings
    return Monitor(TaskQueue(get_manager(settings.redis), settings))


@click.command()
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@click.option("--json", "as_json", is_flag=True, help="JSON output (with --once).")
@click.option(
    "--interval-s",
    type=click.FloatRange(0.05, 3600),
    help="Refresh (default 1 s); with --once, the interval its tasks/s are measured over.",
)
@click.option("--metrics-port", type=click.IntRange(1, 65535), help="Serve Prometheus here.")
@click.option("--metrics-addr", default="127.0.0.1", show_default=True)
@click.option(
    "--web",
    "web_addr",
    metavar="HOST:PORT",
    envvar="HANDOFF_MONITOR_WEB",
    help="Serve the dashboard here, e.g. 127.0.0.1:8321 (env HANDOFF_MONITOR_WEB).",
)
@click.option(
    "--web-token",
    envvar="HANDOFF_MONITOR_WEB_TOKEN",
    help="Allow the dashboard's actions to whoever gives this token "
    "(env HANDOFF_MONITOR_WEB_TOKEN); without it the dashboard is read-only.",
)
@click.option(
    "--web-max-connections",
    type=click.IntRange(8, 100_000),
    default=512,
    show_default=True,
    envvar="HANDOFF_MONITOR_WEB_MAX_CONNECTIONS",
    help="The most connections the dashboard holds open (fewer if the file limit says so).",
)
@click.option(
    "--web-header-timeout-s",
    type=click.FloatRange(0.5, 600),
    default=10.0,
    show_default=True,
    envvar="HANDOFF_MONITOR_WEB_HEADER_TIMEOUT_S",
    help="Close a dashboard connection that has not sent its whole request in this time.",
)
@click.pass_obj
def monitor(
    state, once, as_json, interval_s, metrics_port, metrics_addr, web_addr, web_token,
    web_max_connections, web_header_timeout_s,
) -> None:  # fmt: skip
    """Live aggregate view of agents and workers; writes the aggregate to Redis.

    On a terminal: a refreshing table. Otherwise (under honcho): a line per agent every
    10 s, and one log line whenever a worker's health changes. With --web, the same
    snapshots feed a dashboard in the browser (the `web` extra).
    """
    watcher = _monitor(state)
    if once:
        _print_once(watcher, interval_s or ONCE_RATE_WINDOW_S, as_json)
        return
    from handoff.connection.startup import wait_for_server
    from handoff.observe.monitor_loop import watch

    wait_for_server(watcher.queue.manager, log, "monitor")

    latest: dict = {}
    metrics_url = None
    if metrics_port:
        from handoff.observe.metrics_export import serve

        serve(metrics_port, lambda: latest.get("snapshot"), addr=metrics_addr)
        metrics_url = f"http://{metrics_addr}:{metrics_port}/metrics"
        log.info("monitor: Prometheus metrics on %s", metrics_url)
    limits = {"max_connections": web_max_connections, "header_timeout_s": web_header_timeout_s}
    web = _start_web(state, web_addr, web_token, metrics_url, limits) if web_addr else None

    def on_snapshot(snapshot: dict) -> None:
        latest.update(snapshot=snapshot)
        if web is not None:
            web.feed(snapshot)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        watch(
            watcher,
            interval_s or state.settings.monitor_interval_s,
            stop,
            tty=sys.stdout.isatty(),
            emit=click.echo,
            on_snapshot=on_snapshot,
        )
    except KeyboardInterrupt:
        pass
    finally:
        if web is not None:
            web.stop()


def _print_once(watcher, rate_window_s: float, as_json: bool) -> None:
    """One snapshot. A rate needs two counts: the second snapshot is taken rate_window_s
    after the first, and its tasks/s cover that interval."""
    from handoff.observe.view import render

    watcher.snapshot()
    time.sleep(rate_window_s)  # the interval the printed tasks/s are measured over
    snapshot = watcher.snapshot()
    if as_json:
        print_json(snapshot)
    else:
        click.echo(render(snapshot))


def _start_web(state, address: str, token: str | None, metrics_url: str | None, limits: dict):
    """The dashboard, serving in a thread (a usage error for a bad address or a missing
    extra, a one-line error when the address cannot be bound)."""
    try:
        from handoff.observe.web import server
    except ImportError as e:
        raise click.UsageError(
            f"--web needs the web extra ({e.name} is missing): pip install 'handoff[web]'"
        ) from None
    from handoff.client import Client

    try:
        server.parse_address(address)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--web") from None
    token = token or None  # an empty HANDOFF_MONITOR_WEB_TOKEN means unset, as elsewhere
    if token is not None and len(token) < 8:
        raise click.BadParameter("use a token of at least 8 characters", param_hint="--web-token")
    try:
        return server.start(address, Client(settings=state.settings), token=token,
                            metrics_url=metrics_url, **limits)  # fmt: skip
    except OSError as e:
        click.echo(f"handoff: error: dashboard: {e}", err=True)
        sys.exit(1)


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
