"""`handoff bench ...`: the benchmarks. A group: each benchmark is one subcommand.

Benchmarks start their own servers: the global --redis-url is not used by them. The
comparison with Celery, Dramatiq, Huey, RQ and arq runs from a checkout
(`./scripts/bench e2e`, benchmarks/), not from the installed package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


@click.group("bench")
def bench() -> None:
    """Benchmarks: medians of several runs, side by side with reference figures."""


def _figures_options(quick_help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--runs, --quick and --json: what every benchmark here takes."""

    def add(command: Callable[..., Any]) -> Callable[..., Any]:
        command = click.option(
            "--json", "as_json", is_flag=True, help="Print every figure and sample as JSON."
        )(command)
        command = click.option("--quick", is_flag=True, help=quick_help)(command)
        return click.option(
            "--runs", type=click.IntRange(1, 100), default=5, show_default=True,
            help="Runs per figure.",
        )(command)  # fmt: skip

    return add


def _show(result: dict[str, Any], as_json: bool, format_markdown: Callable[[dict], str]) -> None:
    if as_json:
        from handoff.cli.common import print_json

        print_json(result)
    else:
        click.echo(format_markdown(result))


def _progress(name: str) -> Callable[[str], None]:
    return lambda line: click.echo(f"bench {name}: {line}", err=True)


@bench.command("pool")
@_figures_options("A tenth of the operations (a smoke run).")
@click.option(
    "--transport",
    type=click.Choice(["both", "tcp", "unix"]),
    default="both",
    show_default=True,
    help="TCP compares fairly with the target figures; unix is what local workers use.",
)
def pool(runs: int, quick: bool, transport: str, as_json: bool) -> None:
    """The Redis pool manager: single, batch, concurrent ops/s and connection overhead."""
    from handoff.bench.pool_bench import TRANSPORTS, format_markdown, run_pool_bench

    transports = TRANSPORTS if transport == "both" else (transport,)
    result = run_pool_bench(
        runs=runs, quick=quick, transports=transports, progress=_progress("pool")
    )
    _show(result, as_json, format_markdown)


@bench.command("protocol")
@_figures_options("A tenth of the tasks and at most 2 runs.")
def protocol(runs: int, quick: bool, as_json: bool) -> None:
    """The queue protocol: enqueue and claim+ack tasks/s beside the bare-command limit."""
    from handoff.bench.protocol_bench import format_markdown, run_protocol_bench

    result = run_protocol_bench(runs=runs, quick=quick, progress=_progress("protocol"))
    _show(result, as_json, format_markdown)


@bench.command("payloads")
@_figures_options("A tenth of the tasks.")
def payloads(runs: int, quick: bool, as_json: bool) -> None:
    """What a declared payload type (pydantic) costs per task, beside the untyped path."""
    from handoff.bench.payloads import format_markdown, run_payloads_bench

    _show(run_payloads_bench(runs=runs, quick=quick), as_json, format_markdown)
