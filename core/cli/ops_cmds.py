"""Operations commands: scale, health."""

from __future__ import annotations

import sys

import click
import orjson

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
    from handoff.protocol.task import now_ms

    parts = ",".join(counts).split(",")
    resumed = {p.partition("=")[0].strip(): "auto" for p in parts if p.strip().endswith("=auto")}
    fixed = ",".join(p for p in parts if not p.strip().endswith("=auto"))
    wanted: dict[str, int | str] = {**(parse_counts(fixed) if fixed or not resumed else {})}
    for name in resumed:
        try:
            check_agent(name)
        except InvalidAgentName as e:
            raise click.BadParameter(str(e)) from None
    wanted.update(resumed)
    settings = state.settings
    keys = Keys(settings.key_prefix)
    manager = get_manager(settings.redis)
    alive_since = now_ms() - 30_000
    supervisors = manager.execute(lambda c: c.zrangebyscore(keys.supervisors, alive_since, "+inf"))
    if not supervisors:
        click.echo("handoff: error: no live supervisor found", err=True)
        sys.exit(1)
    message = orjson.dumps({"op": "scale", "agents": wanted})

    def send(client) -> None:
        pipe = client.pipeline(transaction=False)
        for sid in supervisors:
            pipe.rpush(keys.control(sid.decode()), message)
        pipe.execute()

    manager.execute(send)
    click.echo(f"scale {wanted} sent to {len(supervisors)} supervisor(s)")
