"""`handoff bench ...`: the benchmarks. A group: each benchmark is one subcommand.

Benchmarks start their own servers: the global --redis-url is not used by them.
"""

from __future__ import annotations

from pathlib import Path

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
    from core.bench.pool import TRANSPORTS, format_markdown, run_pool_bench

    transports = TRANSPORTS if transport == "both" else (transport,)
    result = run_pool_bench(
        runs=runs,
        quick=quick,
        transports=transports,
        progress=lambda line: click.echo(f"bench pool: {line}", err=True),
    )
    if as_json:
        from core.cli.common import print_json

        print_json(result)
    else:
        click.echo(format_markdown(result))


@bench.command("e2e")
@click.option("--quick", is_flag=True, help="Smaller workloads, 1 run (under 3 minutes).")
@click.option("--runs", type=click.IntRange(1, 20), default=None, help="Default 3; --quick 1.")
@click.option(
    "--systems",
    default=None,
    help="Comma-separated: handoff,handoff-pf32,celery,dramatiq,huey,rq,arq (default: all).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the table and chart go. Default docs/ (--quick: .run/bench/).",
)
def e2e(quick: bool, runs: int | None, systems: str | None, out_dir: Path | None) -> None:
    """handoff vs Celery, Dramatiq, Huey, RQ and arq: same workloads, same machine, one run."""
    from core.bench.e2e import run_e2e
    from core.bench.report import render_markdown

    chosen = [s.strip() for s in systems.split(",")] if systems else None
    target = out_dir or Path(".run/bench" if quick else "docs")
    results = run_e2e(quick, runs or (1 if quick else 3), chosen, target)
    click.echo(render_markdown(results))


@bench.command("compare")
@click.argument(
    "raw_json",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=".run/bench/e2e.json",
)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default="docs")
def compare(raw_json: Path, out_dir: Path) -> None:
    """Re-render the comparison table and chart from a saved run (no re-run)."""
    import json

    from core.bench.report import render_markdown, write

    results = json.loads(raw_json.read_text())
    write(results, out_dir)
    click.echo(render_markdown(results))


@bench.command("protocol")
@click.option(
    "--runs", type=click.IntRange(1, 100), default=5, show_default=True, help="Runs per figure."
)
@click.option("--quick", is_flag=True, help="A tenth of the tasks and at most 2 runs.")
@click.option("--json", "as_json", is_flag=True, help="Print every figure and sample as JSON.")
def protocol(runs: int, quick: bool, as_json: bool) -> None:
    """The queue protocol: enqueue and claim+ack tasks/s beside the bare-command limit."""
    from core.bench.protocol import format_markdown, run_protocol_bench

    result = run_protocol_bench(
        runs=runs,
        quick=quick,
        progress=lambda line: click.echo(f"bench protocol: {line}", err=True),
    )
    if as_json:
        from core.cli.common import print_json

        print_json(result)
    else:
        click.echo(format_markdown(result))
