"""`handoff bench ...`: the benchmarks. A group: each benchmark is one subcommand.

Benchmarks start their own servers: the global --redis-url is not used by them. The
comparison with Celery, Dramatiq, Huey, RQ and arq runs from a checkout
(`./scripts/bench e2e`, benchmarks/), not from the installed package.
"""

from __future__ import annotations

import click


@click.group("bench")
def bench() -> None:
    """Benchmarks: medians of several runs, side by side with reference figures."""


@bench.command("pool")
@click.option(
    "--runs", type=click.IntRange(1, 100), default=5, show_default=True, help="Runs per figure."
)
@click.option("--quick", is_flag=True, help="A tenth of the operations (a smoke run).")
@click.option(
    "--transport",
    type=click.Choice(["both", "tcp", "unix"]),
    default="both",
    show_default=True,
    help="TCP compares fairly with the seed's figures; unix is what local workers use.",
)
@click.option("--json", "as_json", is_flag=True, help="Print every figure and sample as JSON.")
def pool(runs: int, quick: bool, transport: str, as_json: bool) -> None:
    """The Redis pool manager: single, batch, concurrent ops/s and connection overhead."""
    from handoff.bench.pool import TRANSPORTS, format_markdown, run_pool_bench

    transports = TRANSPORTS if transport == "both" else (transport,)
    result = run_pool_bench(
        runs=runs,
        quick=quick,
        transports=transports,
        progress=lambda line: click.echo(f"bench pool: {line}", err=True),
    )
    if as_json:
        from handoff.cli.common import print_json

        print_json(result)
    else:
        click.echo(format_markdown(result))


@bench.command("protocol")
@click.option(
    "--runs", type=click.IntRange(1, 100), default=5, show_default=True, help="Runs per figure."
)
@click.option("--quick", is_flag=True, help="A tenth of the tasks and at most 2 runs.")
@click.option("--json", "as_json", is_flag=True, help="Print every figure and sample as JSON.")
def protocol(runs: int, quick: bool, as_json: bool) -> None:
    """The queue protocol: enqueue and claim+ack tasks/s beside the bare-command limit."""
    from handoff.bench.protocol import format_markdown, run_protocol_bench

    result = run_protocol_bench(
        runs=runs,
        quick=quick,
        progress=lambda line: click.echo(f"bench protocol: {line}", err=True),
    )
    if as_json:
        from handoff.cli.common import print_json

        print_json(result)
    else:
        click.echo(format_markdown(result))


@bench.command("payloads")
@click.option(
    "--runs", type=click.IntRange(1, 100), default=5, show_default=True, help="Runs per figure."
)
@click.option("--quick", is_flag=True, help="A tenth of the tasks.")
@click.option("--json", "as_json", is_flag=True, help="Print every figure and sample as JSON.")
def payloads(runs: int, quick: bool, as_json: bool) -> None:
    """What a declared payload type (pydantic) costs per task, beside the untyped path."""
    from handoff.bench.payloads import format_markdown, run_payloads_bench

    result = run_payloads_bench(runs=runs, quick=quick)
    if as_json:
        from handoff.cli.common import print_json

        print_json(result)
    else:
        click.echo(format_markdown(result))
