"""Commands that run processes: supervise, worker, redis."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import click

from handoff.cli.common import parse_counts
from handoff.errors import AppLoadError, HandoffError, UnsafeServer
from handoff.runtime import exits
from handoff.runtime.agents import get_spec


@click.command()
@click.option("--agents", "agents_arg", help="AGENT=N[,AGENT=N...]; default: the config's agents.")
@click.option(
    "--autoscale",
    "autoscale_arg",
    help="AGENT=MIN:MAX[:TARGET_WAIT_S][,...]: sized to the backlog; default: the config's.",
)
@click.pass_obj
def supervise(state, agents_arg: str | None, autoscale_arg: str | None) -> None:
    """Fork and keep N worker processes per agent type (or MIN to MAX, autoscaled).

    Signals: TERM/INT stop gracefully (a second one, a second later, stops fast);
    QUIT stops fast; HUP re-reads the config and rolls the workers one by one;
    TTIN/TTOU add/remove one worker per agent type.
    """
    from handoff.config.autoscale_spec import parse_autoscale
    from handoff.runtime.supervisor import Supervisor

    settings = state.settings
    agents = parse_counts(agents_arg) if agents_arg else dict(settings.agents)
    try:
        autoscale = parse_autoscale(autoscale_arg or settings.autoscale, settings.max_processes)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--autoscale'") from None
    if autoscale:  # an unknown agent type is a usage error here, before anything starts
        from handoff.runtime.agents import load_app

        try:
            defined = load_app(settings.app)
        except AppLoadError as e:
            click.echo(f"handoff: error: {e}", err=True)
            sys.exit(exits.EXIT_BOOT_ERROR)
        unknown = sorted(set(autoscale) - set(defined))
        if unknown:
            known = ", ".join(sorted(defined)) or "none"
            raise click.BadParameter(
                f"{', '.join(unknown)}: not defined in app {settings.app!r} (defined: {known})",
                param_hint="'--autoscale'",
            )
    both = sorted(set(agents) & set(autoscale))
    if both:
        raise click.UsageError(f"{', '.join(both)}: in both --agents and --autoscale")
    if not agents and not autoscale:
        raise click.UsageError(
            "no agents to supervise: pass --agents a=2,b=1 or --autoscale a=1:4, or set agents"
        )
    supervisor = Supervisor(
        settings, agents, autoscale=autoscale, reload_settings=state.reload_settings
    )
    try:
        code = supervisor.run()
    except (AppLoadError, UnsafeServer) as e:
        click.echo(f"handoff: error: {e}", err=True)
        sys.exit(exits.EXIT_BOOT_ERROR)
    sys.exit(code)


@click.command()
@click.argument("agent")
@click.pass_obj
def worker(state, agent: str) -> None:
    """Run one worker process for AGENT (no supervisor)."""
    from handoff.runtime.worker import Worker

    settings = state.settings
    try:
        spec = get_spec(settings.app, agent)
    except AppLoadError as e:
        click.echo(f"handoff: error: {e}", err=True)
        sys.exit(exits.EXIT_BOOT_ERROR)
    sys.exit(Worker(spec, settings).run())


@click.command()
@click.option("--port", type=int, default=0, help="Also listen on this TCP port (0 = socket only).")
@click.option(
    "--persist/--no-persist",
    default=True,
    show_default=True,
    help="Keep data across restarts: an append-only file in the run folder, fsync every second.",
)
@click.option(
    "--if-needed",
    is_flag=True,
    help="When REDIS_URL is set, start nothing and wait (for the Procfile).",
)
def redis(port: int, persist: bool, if_needed: bool) -> None:
    """Run the embedded development server on the project's well-known socket."""
    from handoff.connection.embedded_server import (
        default_run_dir,
        default_socket_path,
        find_server_binary,
        server_args,
    )
    from handoff.connection.foreground_server import serve

    if if_needed and os.environ.get("REDIS_URL"):
        from handoff.config import redact_url

        click.echo(f"REDIS_URL is set ({redact_url(os.environ['REDIS_URL'])}): no embedded server")
        stop_signals = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        signal.sigwait(stop_signals)
        return
    binary = find_server_binary()
    run_dir = default_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    sock = default_socket_path()
    if sock.exists():
        _refuse_if_running(sock)
        sock.unlink()
    args = server_args(
        binary, port=port, unix_socket=str(sock), data_dir=str(run_dir), appendonly=persist
    )
    click.echo(
        f"embedded server: {Path(binary).name} on unix://{sock}" + (f" and :{port}" if port else "")
    )
    sys.stdout.flush()
    sys.exit(serve(args, sock))


def _refuse_if_running(sock: Path) -> None:
    import redis as redis_py

    try:
        redis_py.Redis(unix_socket_path=str(sock), socket_timeout=1).ping()
    except (redis_py.ConnectionError, OSError):
        return  # a stale socket file from a previous run
    raise HandoffError(f"a server is already running at unix://{sock}")
