"""`handoff rerun RUN`: send a run's dead or cancelled tasks again (protocol/rerun.py)."""

from __future__ import annotations

import click

from handoff.cli.common import print_json


@click.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
@click.pass_obj
def rerun(state, run_id: str, as_json: bool) -> None:
    """Send every task of RUN_ID that ended dead or cancelled through again, reusing
    what finished: done tasks never run again, stored steps are reused, a join waits for
    its rerun branches and fires its then-task once they end. A run still in progress,
    or with nothing dead or cancelled, is left as it is (and the line says so)."""
    from handoff.client import Client

    with Client(settings=state.settings) as client:
        report = client.rerun(run_id)
    if as_json:
        print_json({
            "run": report.run_id, "requeued": report.requeued, "rearmed": report.rearmed,
            "open": report.open, "gone": report.gone,
        })  # fmt: skip
    else:
        click.echo(report.line())
