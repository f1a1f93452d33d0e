"""`python -m benchmarks e2e|compare|runs|rates|waits|steps`: handoff beside Celery, Dramatiq,
Huey, RQ and arq, and handoff's own features measured beside a reference.

Runs from a checkout (./scripts/bench installs the peers first); not part of the wheel.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Cross-system benchmarks: same workloads, same machine, same run."""


@main.command("e2e")
@click.option("--quick", is_flag=True, help="Smaller workloads, 1 run (under 3 minutes).")
@click.option("--runs", type=click.IntRange(1, 20), default=None, help="Default 3; --quick 1.")
@click.option(
    "--systems",
    default=None,
    help="Comma-separated: handoff,handoff-pf32,handoff-typed,handoff-notree,handoff-groups,"
    "handoff-grouprate,celery,dramatiq,huey,rq,arq (default: all).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the table and chart go. Default docs/ (--quick: .run/bench/).",
)
@click.option(
    "--rtt-ms",
    default=None,
    help="Round-trip times added between the producer/worker hosts and Redis, e.g. 0,0.5,2 "
    "(network namespaces: needs root; 'direct' adds a round without the delaying proxy). "
    "Writes the rtt part of benchmarks.md (default docs/).",
)
def e2e(
    quick: bool, runs: int | None, systems: str | None, out_dir: Path | None, rtt_ms: str | None
) -> None:
    """handoff vs Celery, Dramatiq, Huey, RQ and arq: same workloads, same machine, one run."""
    from benchmarks.e2e import run_e2e
    from benchmarks.report import render_markdown

    chosen = [s.strip() for s in systems.split(",")] if systems else None
    if rtt_ms is not None:
        from benchmarks.rtt import main as rtt_main

        words = [x.strip() for x in rtt_ms.split(",") if x.strip()]
        rtts = [float(x) for x in words if x != "direct"]
        direct = "direct" in words  # also a round with no proxy: what the proxy costs
        target = out_dir or Path("docs")
        raise SystemExit(rtt_main(rtts, quick, runs or 1, chosen, target, direct=direct))
    target = out_dir or Path(".run/bench" if quick else "docs")
    results = run_e2e(quick, runs or (1 if quick else 3), chosen, target)
    click.echo(render_markdown(results))


@main.command("runs", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def runs_cmd(args: tuple[str, ...]) -> None:
    """Joins and run tracking: join and follow latency, memory per finished task."""
    from benchmarks.runs import main as runs_main

    raise SystemExit(runs_main(list(args)))


@main.command("waits", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def waits_cmd(args: tuple[str, ...]) -> None:
    """Waits: signal to then-handler start, a million waiting runs, drains beside waits."""
    from benchmarks.waits import main as waits_main

    raise SystemExit(waits_main(list(args)))


@main.command("steps", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def steps_cmd(args: tuple[str, ...]) -> None:
    """Steps and repeated keys: task.step's cost, drains beside steps, debounce's enqueue."""
    from benchmarks.steps import main as steps_main

    raise SystemExit(steps_main(list(args)))


@main.command("rates", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def rates_cmd(args: tuple[str, ...]) -> None:
    """The same 10/s limit over 4 worker processes: handoff beside Celery's rate_limit."""
    from benchmarks.rate_limits import main as rates_main

    rates_main(list(args))


@main.command("compare")
@click.argument(
    "raw_json",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=".run/bench/e2e.json",
)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default="docs")
def compare(raw_json: Path, out_dir: Path) -> None:
    """Re-render the comparison table and chart from a saved run (no re-run)."""
    import json

    from benchmarks.report import render_markdown, write

    results = json.loads(raw_json.read_text())
    write(results, out_dir)
    click.echo(render_markdown(results))


if __name__ == "__main__":
    main()
