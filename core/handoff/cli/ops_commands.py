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
    from handoff.protocol.keys import Keys
    from handoff.protocol.limits import check_burst, parse_rate

    try:
        check_agent(agent)
    except InvalidAgentName as e:
        raise click.BadParameter(str(e)) from None
    sets: dict[str, str] = {}
    drops: list[str] = []
    for change in changes:
        name, _, value = change.partition("=")
        try:
            if change == "rate=none":
                sets["rate"] = "none"
            elif change == "rate=default":
                drops += ["rate", "burst"]
            elif name == "rate":
                rate = parse_rate(value)
                sets["rate"] = f"{rate.count:g}/{rate.window_ms}"
            elif name == "burst":
                sets["burst"] = str(check_burst(int(value) if value.isdigit() else value))
            elif change == "resume":
                drops.append("paused_until")
            elif change == "cost_limit=none":
                sets["cost_limit"] = "none"
            elif change == "cost_limit=default":
                drops.append("cost_limit")
            elif name == "cost_limit":
                rate = parse_rate(value, "cost_limit")
                sets["cost_limit"] = f"{rate.count:g}/{rate.window_ms}"
            elif change == "group_rate=none":
                sets["group_rate"] = "none"
            elif change in ("group_rate=default", "group_concurrency=default"):
                drops.append(name)
            elif name == "group_rate":
                rate = parse_rate(value, "group_rate")
                sets["group_rate"] = f"{rate.count:g}/{rate.window_ms}"
            elif name == "group_concurrency" and value.isdigit() and int(value) <= 1_000_000:
                sets["group_concurrency"] = str(int(value))
            else:
                raise click.BadParameter(
                    f"{change!r}: expected rate=N/s|N/min|N/h|none|default, burst=N, resume, "
                    "group_rate=N/s|none|default, group_concurrency=N|default or "
                    "cost_limit=N/min|none|default"
                )
        except InvalidPayload as e:
            raise click.BadParameter(str(e)) from None
    key = Keys(state.settings.key_prefix).agent(agent).limits

    def apply(client) -> dict:
        pipe = client.pipeline(transaction=False)
        if sets:
            pipe.hset(key, mapping=sets)
        if drops:
            pipe.hdel(key, *drops)
        pipe.hgetall(key)
        replies = pipe.execute()
        return {"limits": replies[-1], "now": client.time()}  # (no TIME in a cluster pipeline)

    with Client(settings=state.settings) as client:  # (not the process-wide manager)
        shown = client.queue.manager.execute(apply)
    current = {k.decode(): v.decode() for k, v in shown["limits"].items()}
    now = shown["now"][0] * 1000 + shown["now"][1] // 1000
    live = current.get("rate")
    if live is None:
        rate_text = "the code's (@agent(rate=...))"
    elif live == "none":
        rate_text = "none (lifted live)"
    else:
        count, _, window = live.partition("/")
        unit = {"1000": "s", "60000": "min", "3600000": "h"}.get(window, f"{window}ms")
        rate_text = f"{count}/{unit} (set live)"
    line = f"{agent}: rate {rate_text}"
    if "burst" in current:
        line += f", burst {current['burst']}"
    paused = float(current.get("paused_until", 0)) - now
    if paused > 0:
        line += f", paused {paused / 1000:.1f}s more"
    if "group_rate" in current:
        group_rate = current["group_rate"]
        if group_rate != "none":
            count, _, window = group_rate.partition("/")
            unit = {"1000": "s", "60000": "min", "3600000": "h"}.get(window, f"{window}ms")
            group_rate = f"{count}/{unit}"
        line += f", group_rate {group_rate} (set live)"
    if "group_concurrency" in current:
        line += f", group_concurrency {current['group_concurrency']} (set live)"
    click.echo(line)
