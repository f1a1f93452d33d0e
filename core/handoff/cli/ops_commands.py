"""Operations commands: scale, health."""

from __future__ import annotations

import sys

import click

from handoff.cli.common import parse_counts
from handoff.errors import InvalidAgentName
from handoff.protocol.keys import check_agent


@click.command()
@click.argument("counts", nargs=-1, required=True)
@click.pass_obj
def scale(state, counts: tuple[str, ...]) -> None:
    """Change running supervisors' process counts: handoff scale AGENT=N [AGENT=N ...].

    Sent as a control message through Redis to every live supervisor (each runs N). On an
    autoscaled agent type a count pins it; AGENT=auto gives it back to the autoscaler.
    """
    from handoff.connection.manager import get_manager
    from handoff.protocol.keys import Keys
    from handoff.runtime.control import autoscaled_by_live_supervisors, send_scale

    parts = ",".join(counts).split(",")
    resumed = {p.partition("=")[0].strip(): "auto" for p in parts if p.strip().endswith("=auto")}
    fixed = ",".join(p for p in parts if not p.strip().endswith("=auto"))
    wanted: dict[str, int | str] = {**(parse_counts(fixed) if fixed or not resumed else {})}
    for name in resumed:
        try:
            check_agent(name)
        except InvalidAgentName as e:
            raise click.BadParameter(str(e)) from None
    settings = state.settings
    manager, keys = get_manager(settings.redis), Keys(settings.key_prefix)
    autoscaled = autoscaled_by_live_supervisors(manager, keys, list(resumed))
    for name in sorted(set(resumed) - autoscaled):
        click.echo(f"handoff: {name} is not autoscaled by any live supervisor: {name}=auto "
                   "changes nothing (start one with --autoscale)", err=True)  # fmt: skip
    wanted.update({name: "auto" for name in autoscaled})
    if not wanted:
        sys.exit(1)
    sent = send_scale(manager, keys, wanted)
    if not sent:
        click.echo("handoff: error: no live supervisor found", err=True)
        sys.exit(1)
    click.echo(f"scale {wanted} sent to {sent} supervisor(s)")


@click.command()
@click.argument("agent")
@click.argument("changes", nargs=-1)
@click.pass_obj
def limits(state, agent: str, changes: tuple[str, ...]) -> None:
    """Show or change an agent type's start-rate limit, live, on every worker at once:

    handoff limits AGENT [rate=5/s|rate=none|rate=default] [burst=N] [resume]
                         [group_rate=2/s|none|default] [group_concurrency=N|default]
                         [cost_limit=200000/min|none|default]

    rate=none lifts the limit, rate=default goes back to the code's (@agent(rate=...));
    resume ends a pause a handler's RateLimited began. group_rate and group_concurrency
    bound each group (enqueue(..., group=)); group_concurrency=0 lifts the cap. Workers
    read it at their next claim.
    """
    from handoff.client import Client
    from handoff.errors import InvalidPayload
    from handoff.protocol.live_limits import (
        apply_limit_changes,
        describe_live_limits,
        parse_limit_changes,
    )

    try:
        check_agent(agent)
        parsed = parse_limit_changes(changes)
    except (InvalidAgentName, InvalidPayload) as e:
        raise click.BadParameter(str(e)) from None
    with Client(settings=state.settings) as client:  # (not the process-wide manager)
        current, now = apply_limit_changes(client.queue.manager, client.queue.keys, agent, parsed)
    click.echo(describe_live_limits(agent, current, now))
