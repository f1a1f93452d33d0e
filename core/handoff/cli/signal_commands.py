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
    click.echo(f"event {event}: {resumed} wait(s) resumed{_kept(state.settings.signal_ttl_s)}")


def _kept(ttl_s: float) -> str:
    """What happens to a Wait returned later: an early signal is kept, and that is the
    point (an approval that comes before its agent asks is not lost), so it is said."""
    if ttl_s <= 0:
        return " (not kept: signal_ttl_s = 0)"
    return f"; kept {ttl_s:g}s for a Wait returned later"
