"""`handoff signal EVENT [JSON]`: resume the Waits on an event."""

from __future__ import annotations

import click
import orjson

from handoff.errors import InvalidPayload


@click.command()
@click.argument("event")
@click.argument("data", required=False)
@click.pass_obj
def signal(state, event: str, data: str | None):
    """Signal EVENT, with DATA (JSON; none = null): every Wait on it resumes once, and one
    returned within signal_ttl_s after resumes at once. Prints how many it resumed."""
    from handoff.client import Client

    try:
        value = None if data is None else orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise InvalidPayload(f"DATA is not JSON: {e}") from None
    with Client(settings=state.settings) as client:
        resumed = client.signal(event, value)
    click.echo(f"event {event}: {resumed} wait(s) resumed")
